"""GET /metrics: the Prometheus text exposition (outside the OpenAPI document: it is not a JSON API)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from app.api.deps import SettingsDep, require_api_key

router = APIRouter(tags=["metrics"])


def require_key_when_configured(request: Request, settings: SettingsDep) -> None:
    """The bearer API_KEY, only when METRICS_REQUIRE_KEY is set (Prometheus can send it: authorization)."""
    if settings.metrics_require_key:
        require_api_key(request, settings, None)


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(require_key_when_configured)])
def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})
