"""Every failure becomes the envelope: our errors, FastAPI's own 404/405/422, and bugs.

Bugs are caught by an outermost ASGI middleware instead of an `Exception` handler, because Starlette
re-raises after running such a handler, which turns one bug into a second traceback in uvicorn's log.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraserve.api.envelope import InternalError, error_response
from loraserve.api.openai.errors import is_openai_path, openai_error
from loraserve.api.validation import describe_validation_error
from loraserve.errors import BadInput, MissingBody, RequestTooLarge, RouteNotFound, WorkersAIError

logger = logging.getLogger("loraserve.api")


async def _workers_ai_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WorkersAIError)  # registered for this class only
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError | ValidationError)
    return error_response(BadInput(describe_validation_error(exc.errors())))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: WorkersAIError
    if exc.status_code in (404, 405):
        error = RouteNotFound(request.url.path)
    elif exc.status_code == 413:
        error = RequestTooLarge()
    elif exc.status_code == 400:
        # Starlette's only 400s come from a body it could not parse (a broken multipart form).
        error = MissingBody(f"Bad request: {exc.detail}")
    else:
        logger.warning("unexpected HTTP error %s on %s", exc.status_code, request.url.path)
        error = InternalError()
    return error_response(error)


async def _client_disconnect(request: Request, exc: Exception) -> Response:
    # The client hung up before its body was read (overload makes this common) or before its answer was
    # ready (stream_driver): not a bug, nobody is there to answer; 499 (nginx's "client closed request")
    # is what the access log and metrics record.
    return Response(status_code=499)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(WorkersAIError, _workers_ai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)


class CatchAllMiddleware:
    """The last line: an unhandled exception is logged and answered with the envelope (3043)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            # The path is logged, never the headers: they carry the bearer token.
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                error = InternalError()
                # Outside OpenAIErrorMiddleware, so the /v1 routes' own shape is chosen here.
                response = (JSONResponse(openai_error(error), status_code=error.status)
                            if is_openai_path(scope["path"]) else error_response(error))
                await response(scope, receive, send)
