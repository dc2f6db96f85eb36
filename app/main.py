"""The FastAPI application: thin routes over services; errors mapped to status codes here."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.deps import require_api_key
from app.api.docs import add_docs
from app.api.errors import error_responses, http_error_handler, service_error_handler, validation_error_handler
from app.api.middleware import BodyGuard, RelativeRedirects
from app.api.request_metrics import RequestMetricsMiddleware
from app.api.routes import classify, configs, datasets, evaluations, health, jobs, metrics, models, reports, ui
from app.core.config import Settings, get_settings
from app.core.db import run_migrations
from app.services.datasets import remove_stale_staging
from app.services.errors import ServiceError
from app.services.metrics import ServiceMetrics

log = logging.getLogger("intent_tuner")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        run_migrations(settings)
        for folder in (settings.datasets_dir, settings.jobs_dir, settings.reports_dir):
            folder.mkdir(parents=True, exist_ok=True)
        for name in remove_stale_staging(settings):
            log.warning("removed %s, left behind by an upload that was interrupted", name)
        yield

    app = FastAPI(
        title="intent-tuner",
        version="0.1.0",
        description="Fine-tune LLMs with QLoRA for customer-service intent classification, and serve them. "
                    "Upload a dataset, start a job, classify, read the reports.",
        lifespan=lifespan,
        docs_url=None,  # served with local assets by add_docs
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = ServiceMetrics(settings)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    # Outermost: the key and the size of a request body are checked before anything reads it.
    app.add_middleware(RelativeRedirects)
    app.add_middleware(BodyGuard, settings=settings)

    # Every error answer has one body, app.schemas.ErrorResponse, as the OpenAPI document says.
    app.add_exception_handler(ServiceError, service_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)

    app.include_router(health.router)
    add_docs(app)
    app.include_router(metrics.router)  # open unless METRICS_REQUIRE_KEY
    ui.add_console(app)  # the page itself is public; it asks for the key its API calls need
    # Without a key nothing is protected, and the OpenAPI document then declares no security either.
    protected = {}
    if settings.api_key:
        protected = {"dependencies": [Depends(require_api_key)], "responses": error_responses(401)}
    for module in (datasets, jobs, configs, models, classify, evaluations, reports):
        app.include_router(module.router, **protected)
    return app


