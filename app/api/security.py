"""The bearer API key: which paths are open, and the one comparison that the route dependency
(``app.api.deps.require_api_key``) and the body guard (``app.api.middleware.BodyGuard``) both use."""

from __future__ import annotations

import secrets

from fastapi.security.utils import get_authorization_scheme_param

# Open with API_KEY set: the probes and the API's documentation with its assets.
PUBLIC_PATHS = frozenset({"/health", "/health/ready", "/docs", "/redoc", "/openapi.json"})
DOCS_ASSETS_PATH = "/docs-assets"
UNAUTHORIZED_MESSAGE = "missing or wrong bearer API key"


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(DOCS_ASSETS_PATH + "/")


def bearer_key_matches(authorization: str | None, api_key: str) -> bool:
    """Whether an ``Authorization`` header value carries ``Bearer <api_key>``.

    Compared as bytes in constant time: the header's own bytes (Starlette hands headers over decoded as
    latin-1) against the key's UTF-8. ``secrets.compare_digest`` raises on a non-ASCII str, which made
    a non-ASCII token a 500; as bytes it is a mismatch like any other, and a UTF-8 key can match.
    """
    scheme, token = get_authorization_scheme_param(authorization)
    if scheme.lower() != "bearer" or not token:
        return False
    try:
        presented = token.encode("latin-1")
    except UnicodeEncodeError:  # not a header value as an ASGI server hands it over
        return False
    return secrets.compare_digest(presented, api_key.encode("utf-8"))
