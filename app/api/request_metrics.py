"""ASGI middleware: the latency and status of every HTTP request, by route template (``/jobs/{job_id}``,
not the raw URL, so a scrape stays small however many ids are asked for)."""

from __future__ import annotations

import time

from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "<unmatched>"  # 404s for paths no route has: one series, whatever the path


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    if route is None:
        return UNMATCHED
    if isinstance(route, Mount):
        return f"{route.path}/{{path}}"
    return getattr(route, "path", UNMATCHED)


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception before any answer is what the client sees as a 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.observe_request(scope["method"], route_template(scope), status,
                                         time.perf_counter() - started)
