"""The FastAPI application: Workers AI's REST face over a registry and loaded models."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, PlainTextResponse

from loraserve.api import (
    playground,
    routes_finetunes,
    routes_models,
    routes_run,
    routes_tokens,
)
from loraserve.api.bodylimit import BodyLimit, BodyLimitMiddleware
from loraserve.api.context import AppContext, attach, get_context
from loraserve.api.handlers import CatchAllMiddleware, install_error_handlers
from loraserve.api.metrics import Metrics
from loraserve.api.metrics_http import MetricsMiddleware, metrics_endpoint
from loraserve.api.openai import routes as openai_routes
from loraserve.api.openai.errors import OpenAIErrorMiddleware
from loraserve.api.openapi import DocumentedApp
from loraserve.api.openapi_models import Health
from loraserve.api.ratelimit import rate_limiter_for
from loraserve.api.settings import MULTIPART_OVERHEAD_BYTES, ServerSettings
from loraserve.errors import InvalidFinetune
from loraserve.registry import Registry
from loraserve.types import Backend

API_PREFIX = "/client/v4"
ACCOUNT_PREFIX = API_PREFIX + "/accounts/{account_id}/ai"


def create_app(
    registry: Registry, backends: Mapping[str, Backend], settings: ServerSettings | None = None
) -> FastAPI:
    """`backends` maps each served model id to its loaded model (one model may serve several ids)."""
    if not backends:
        raise ValueError("create_app needs at least one model to serve")
    settings = settings or ServerSettings()
    # The Workers AI surface is exactly the routes below plus /openapi.json; no docs pages to collide with it.
    app = DocumentedApp(
        title="loraserve", docs_url=None, redoc_url=None, openapi_url="/openapi.json", redirect_slashes=False
    )
    # Every backend is wrapped once so that all generation is measured for /metrics.
    metrics = app.state.metrics = Metrics()
    served = metrics.instrument(backends)
    attach(app, AppContext(registry, served, settings, rate_limiter_for(settings)))
    install_error_handlers(app)
    app.include_router(routes_run.router, prefix=ACCOUNT_PREFIX)
    app.include_router(routes_finetunes.router, prefix=ACCOUNT_PREFIX)
    app.include_router(routes_models.router, prefix=ACCOUNT_PREFIX)
    app.include_router(openai_routes.router, prefix=ACCOUNT_PREFIX)
    app.include_router(routes_tokens.router, prefix=API_PREFIX)
    app.include_router(playground.router)
    app.add_api_route("/healthz", healthz, methods=["GET"], responses={200: {"model": Health}})
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], response_class=PlainTextResponse)
    file_limit = registry.limits.max_file_bytes
    # Which of the two files it was is in the multipart fields, not read yet: the message names the limit.
    upload = BodyLimit(file_limit + MULTIPART_OVERHEAD_BYTES, lambda: InvalidFinetune(
        f"upload: an adapter file exceeds {file_limit} bytes; nothing was stored"))
    run, small = BodyLimit(settings.max_run_body_bytes), BodyLimit(settings.max_json_body_bytes)

    def body_limit(path: str) -> BodyLimit:
        if path.endswith("/finetune-assets"):
            return upload
        if "/ai/run/" in path or "/ai/v1/" in path:
            return run
        return small

    app.add_middleware(BodyLimitMiddleware, limit_for_path=body_limit)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # sees every error as the Workers AI envelope
    app.add_middleware(OpenAIErrorMiddleware)  # then /v1 errors take OpenAI's shape
    app.add_middleware(CatchAllMiddleware)  # added last: the outermost layer
    return app


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "models": sorted(get_context(request).backends)})
