"""Turning pydantic's errors and raw bodies into Workers AI's input errors (5006, 3003)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from loraserve.errors import BadInput, MissingBody

ModelT = TypeVar("ModelT", bound=BaseModel)


def describe_validation_error(errors: Sequence[Any]) -> str:
    """One line naming each offending field, e.g. "max_tokens: Input should be greater than or equal to 1"."""
    parts: list[str] = []
    for error in errors:
        # FastAPI prefixes where the value came from ("body", "query", "path"): the field is what matters.
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or "body"
        parts.append(f"{field}: {error.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid input"


def validate(model: type[ModelT], data: dict[str, Any]) -> ModelT:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadInput(describe_validation_error(exc.errors())) from exc


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, whatever the Content-Type says.

    The docs' curl sends JSON as `-d` (form-urlencoded) and wrangler sends it as text/plain, so the
    header cannot be trusted; the size limit is enforced while the body streams in (BodyLimitMiddleware).
    """
    raw = await request.body()
    if not raw.strip():
        raise MissingBody("Bad request: the request body is missing")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MissingBody("Bad request: the request body is not valid JSON") from exc
    except RecursionError as exc:  # `[[[[...` a few thousand deep: the parser gives up
        raise MissingBody("Bad request: the request body is nested too deeply") from exc
    if not isinstance(data, dict):
        raise BadInput("body: must be a JSON object")
    return data
