"""One error body for every 4xx: service errors, request validation errors and HTTP errors alike.

``{"detail": {"message": ..., "field": ..., "row": ..., "errors": [...]}}`` (``app.schemas.ErrorResponse``);
``error_responses`` declares it in OpenAPI for the status codes a route can answer with.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.schemas import ErrorResponse
from app.services.errors import ServiceError, field_path

_DESCRIPTIONS = {
    400: "The body could not be read (not UTF-8 JSON, or not multipart form data).",
    401: "Missing or wrong bearer API key (only when API_KEY is set).",
    404: "Not found: detail.message names what.",
    409: "Conflict with the resource's state: detail.message says which.",
    413: "Too large: detail.message names the limit (a setting).",
    422: "Invalid request: detail.field names the field (detail.row the row of an upload), detail.errors lists "
         "every problem of a malformed request.",
    503: "Not ready or overloaded: detail.message says why; Retry-After (seconds) when a retry may succeed.",
}


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for these error status codes, all with the ErrorResponse body."""
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]} for code in status_codes}


def error_body(message: str, *, field: str | None = None, row: int | None = None,
               errors: list[dict] | None = None) -> dict:
    detail: dict[str, Any] = {"message": message}
    if field is not None:
        detail["field"] = field
    if row is not None:
        detail["row"] = row
    if errors is not None:
        detail["errors"] = errors
    return {"detail": detail}


def error_response(status_code: int, message: str, *, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An error answer with the API's error body, e.g. from a middleware that answers before the routes."""
    return JSONResponse(error_body(message, field=field), status_code=status_code, headers=headers)


def _validation_errors(exc: RequestValidationError) -> list[dict]:
    out = []
    for error in exc.errors():
        message = str(error.get("msg", "invalid"))
        message = message.removeprefix("Value error, ")
        out.append({"field": field_path(error.get("loc", ())), "message": message,
                    "type": str(error.get("type", "value_error"))})
    return out


async def service_error_handler(_request: Request, exc: ServiceError) -> JSONResponse:
    retry_after = getattr(exc, "retry_after", None)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail()}, headers=headers)


async def validation_error_handler(_request: Request, exc: RequestValidationError) -> JSONResponse:
    # The input itself is not echoed back: it may be a 100k-character dialogue.
    errors = _validation_errors(exc)
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    shown = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return JSONResponse(status_code=422, content=error_body(shown + more, field=first["field"], errors=errors))


async def http_error_handler(_request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    detail = exc.detail
    body = {"detail": detail} if isinstance(detail, dict) and "message" in detail else error_body(str(detail))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
