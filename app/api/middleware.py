"""Pure ASGI middleware: answers decided before any route, or any body parser, has read a byte.

``BodyGuard``: a request body is read only once its sender is known (the bearer key, when API_KEY is set)
and its size is within the limit. Starlette's multipart parser spools an upload to a temporary file
before the route runs, so a check in the route came after the whole body was on disk: an unauthenticated
or oversized upload is now answered (401 / 413) at its headers, and a body without a length (chunked) is
cut off with a 413 as soon as it passes the limit.

``RelativeRedirects``: a redirect never echoes the request's ``Host`` header (Starlette builds the
absolute URL of a trailing-slash redirect from it).
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response
from app.api.security import UNAUTHORIZED_MESSAGE, bearer_key_matches, is_public
from app.core.config import Settings

_FORM_TYPES = ("multipart/", "application/x-www-form-urlencoded")


class _BodyTooLarge(Exception):
    pass


class BodyGuard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        lengths = headers.getlist("content-length")
        chunked = "transfer-encoding" in headers
        declared = _content_length(lengths)
        if not chunked and declared == 0:  # no body: the routes' own checks answer
            await self.app(scope, receive, send)
            return
        if (self.settings.api_key and not is_public(scope["path"])
                and not bearer_key_matches(headers.get("authorization"), self.settings.api_key)):
            await error_response(401, UNAUTHORIZED_MESSAGE, headers={"WWW-Authenticate": "Bearer"})(
                scope, receive, send)
            return
        if declared is None:
            await error_response(400, "Content-Length is not one non-negative number")(scope, receive, send)
            return
        limit, which = self._limit(headers.get("content-type", ""))
        too_large = error_response(413, f"the request body is over the limit of {limit} bytes ({which})")
        if declared > limit:
            await too_large(scope, receive, send)
            return
        await self._capped(scope, receive, send, limit, too_large)

    def _limit(self, content_type: str) -> tuple[int, str]:
        if content_type.lower().startswith(_FORM_TYPES):
            return self.settings.max_form_body_bytes, "MAX_UPLOAD_BYTES and 64 KiB for the form"
        return self.settings.max_json_body_bytes, "the largest valid /classify request"

    async def _capped(self, scope: Scope, receive: Receive, send: Send, limit: int, too_large) -> None:
        """Run the app with a receive that stops at ``limit`` bytes; past it, the answer is ``too_large``
        (whatever the app made of the aborted body is dropped)."""
        received = 0
        over = started = False

        async def receive_capped() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise _BodyTooLarge
            return message

        async def send_unless_over(message: Message) -> None:
            nonlocal started
            if over:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive_capped, send_unless_over)
        except Exception:
            if not over or started:
                raise
        if over and not started:
            await too_large(scope, receive, send)


def _content_length(values: list[str]) -> int | None:
    """The declared body length: 0 when none is declared, None when the header is malformed."""
    if not values:
        return 0
    value = values[0].strip()
    if len(set(values)) != 1 or not value.isascii() or not value.isdigit():
        return None
    return int(value) if len(value) <= 18 else 10**18  # int() refuses over 4,300 digits; any such is too large


class RelativeRedirects:
    """A redirect's ``Location`` on the request's own ``Host`` becomes a path (RFC 9110 allows it), so a
    forged ``Host`` header is never sent back as a redirect target. Starlette's trailing-slash redirects
    (``GET /datasets/`` → ``/datasets``) are built that way and stay as they are otherwise."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host")

        async def send_relative(message: Message) -> None:
            if message["type"] == "http.response.start" and 300 <= message["status"] < 400 and host:
                message = {**message, "headers": [
                    (name, _relative(value, host) if name.lower() == b"location" else value)
                    for name, value in message.get("headers", [])]}
            await send(message)

        await self.app(scope, receive, send_relative)


def _relative(location: bytes, host: str) -> bytes:
    parts = urlsplit(location.decode("latin-1"))
    if not parts.netloc or parts.netloc.lower() != host.lower():
        return location
    return urlunsplit(("", "", parts.path or "/", parts.query, parts.fragment)).encode("latin-1")
