"""Look up one row by primary key, or raise the 404 the API shows for a missing resource."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy.orm import Session

from app.services.errors import NotFoundError

RowT = TypeVar("RowT")


def get_row(session: Session, model: type[RowT], key: str, noun: str) -> RowT:
    row = session.get(model, key)
    if row is None:
        raise NotFoundError(f"{noun} '{key}' not found")
    return row
