"""The HTTP side of /metrics: the middleware that counts every response by route, status and Workers
AI code, and the GET /metrics endpoint (optionally behind a bearer token)."""

from __future__ import annotations

import hmac
import json
import time

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraserve.api.auth import bearer_token
from loraserve.api.context import get_context
from loraserve.api.metrics import Metrics
from loraserve.errors import AuthenticationError

_ACCOUNT_ROUTE_PREFIX = "/client/v4/accounts/{account_id}/ai"
_UNMATCHED_ROUTE = "unmatched"


def route_label(scope: Scope) -> str:
    """The matched route's template, e.g. "/run/{model:path}": bounded, whatever the URL held.

    Account routes are labelled relative to /client/v4/accounts/{account_id}/ai (FastAPI's route
    objects carry their router's own path; a full one is cut to the same label).
    """
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return _UNMATCHED_ROUTE
    return path.removeprefix(_ACCOUNT_ROUTE_PREFIX) or "/"


def _error_code(body: bytes) -> str:
    """The Workers AI code of an error envelope (or of an OpenAI-shaped error), "unknown" if none."""
    try:
        data = json.loads(body)
    except ValueError:
        return "unknown"
    if isinstance(data, dict):
        errors = data.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict) and "code" in errors[0]:
            return str(errors[0]["code"])
    return "unknown"


class MetricsMiddleware:
    """Counts every HTTP response by route, method and status, and errors by Workers AI code.

    Sits inside the OpenAI error translation, so it sees every error as the Workers AI envelope.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        error_body: bytes | None = None

        async def observing_send(message: Message) -> None:
            nonlocal status, error_body
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and status >= 400 and error_body is None:
                error_body = bytes(message.get("body", b""))  # error bodies are small, one message
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        except Exception:
            self._record(scope, 500, b'{"errors":[{"code":3043}]}', started)
            raise
        self._record(scope, status, error_body, started)

    def _record(self, scope: Scope, status: int, error_body: bytes | None, started: float) -> None:
        route = route_label(scope)
        m = self.metrics
        m.requests.labels(route, scope.get("method", ""), str(status)).inc()
        elapsed = time.perf_counter() - started
        m.duration.labels(route).observe(elapsed)
        if status == 429:
            m.refusal_duration.observe(elapsed)
        if status >= 400:
            m.errors.labels(route, str(status), _error_code(error_body or b"")).inc()


def get_metrics(request: Request) -> Metrics:
    metrics = request.app.state.metrics
    assert isinstance(metrics, Metrics)  # set by create_app
    return metrics


async def metrics_endpoint(request: Request) -> Response:
    """Open by default (the server listens on loopback unless told otherwise); with a metrics token set,
    the scraper must send it as a bearer token, since the series name finetune ids and their traffic."""
    required = get_context(request).settings.metrics_token
    if required is not None and not hmac.compare_digest(bearer_token(request).encode(), required.encode()):
        raise AuthenticationError()
    return Response(get_metrics(request).exposition(), media_type=CONTENT_TYPE_LATEST)
