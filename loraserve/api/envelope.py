"""The Workers AI response envelope, for successes and for every error the API returns."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from loraserve.errors import WorkersAIError


class InternalError(WorkersAIError):
    """A bug on our side. The caller only learns that it happened; the log has the rest."""

    code, status = 3043, 500

    def __init__(self) -> None:
        super().__init__("Internal server error")


def success(result: Any) -> dict[str, Any]:
    return {"result": result, "success": True, "errors": [], "messages": []}


def success_response(result: Any) -> JSONResponse:
    return JSONResponse(success(result))


def error_response(exc: WorkersAIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(exc.envelope(), status_code=exc.status, headers=headers)
