"""Request dependencies: settings, a database session, the bearer-key check, the inference backend."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.api.security import UNAUTHORIZED_MESSAGE, bearer_key_matches
from app.core.config import Settings
from app.core.db import session_factory

_bearer = HTTPBearer(auto_error=False, description="Bearer API_KEY (required when API_KEY is set)")


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    session = session_factory(settings)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def require_api_key(request: Request, settings: SettingsDep,
                    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """401 without the key. ``_bearer`` declares the scheme in OpenAPI; the decision is ``bearer_key_matches``,
    the same one the body guard makes before a request body is read."""
    if settings.api_key and not bearer_key_matches(request.headers.get("authorization"), settings.api_key):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, UNAUTHORIZED_MESSAGE, headers={"WWW-Authenticate": "Bearer"})


_registry_lock = threading.Lock()


def get_backend(request: Request):
    """The app's inference backend (``app.ml.infer.base``), created on first use (importing torch is not free)."""
    state = request.app.state
    with _registry_lock:
        if getattr(state, "classifiers", None) is None:
            from app.services.inference import make_backend

            state.classifiers = make_backend(state.settings, bounded_queue=True)
    return state.classifiers
