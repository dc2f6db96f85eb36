"""/docs (Swagger UI) and /redoc served with their assets from the service itself: an offline deployment
renders them too. The bundles (Swagger UI 5.32.6, ReDoc 2.5.3, the FastAPI favicon) ship in the pinned
``fastapi-offline`` package; only its static files are used, through FastAPI's documented
``get_swagger_ui_html`` / ``get_redoc_html`` (ReDoc without Google Fonts)."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.api.security import DOCS_ASSETS_PATH

ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"


def add_docs(app: FastAPI) -> None:
    """Mount the assets and the two pages; create the app with ``docs_url=None, redoc_url=None``."""
    app.mount(DOCS_ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    def urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "")
        return root + app.openapi_url, root + DOCS_ASSETS_PATH

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        openapi_url, assets = urls(request)
        return get_swagger_ui_html(openapi_url=openapi_url, title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{assets}/swagger-ui.css",
                                   swagger_favicon_url=f"{assets}/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no badge from swagger.io

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        openapi_url, assets = urls(request)
        return get_redoc_html(openapi_url=openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{assets}/redoc.standalone.js",
                              redoc_favicon_url=f"{assets}/favicon.png", with_google_fonts=False)
