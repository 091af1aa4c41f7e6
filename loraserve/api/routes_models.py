"""GET /accounts/{account_id}/ai/models/search and /models/schema (contract section 5).

The search lists the models this server serves, in Workers AI's shape. The schema endpoint returns
JSON Schemas generated from the very pydantic models /run validates with (`schemas.py`, via
`openapi_models.py`), so the
published schema and the validation cannot drift apart.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse

from loraserve import catalog
from loraserve.api.auth import Account
from loraserve.api.context import AppContext, get_context
from loraserve.api.envelope import success, success_response
from loraserve.api.openapi_models import ModelSchemaEnvelope, ModelSearchEnvelope, input_schema, output_schema
from loraserve.errors import NoSuchModel

router = APIRouter(prefix="/models")

# Stable ids: the same model has the same id on every server (Workers AI's ids are UUIDs too).
_ID_NAMESPACE = uuid.UUID("6f2c7a2e-6a51-4a8e-9d0c-6c6f72617365")
SOURCE_ID = 1  # Workers AI's "source" of its own catalog models
TEXT_GENERATION = {
    "id": str(uuid.uuid5(_ID_NAMESPACE, "task:Text Generation")),
    "name": "Text Generation",
    "description": "Family of generative text models, such as large language models (LLM), that can be "
    "adapted for a variety of natural language tasks.",
}
MAX_PER_PAGE = 1000


def author_of(model_id: str) -> str:
    """"@cf/meta-llama/llama-2-7b-chat-hf-lora" -> "meta-llama"."""
    parts = model_id.split("/")
    return parts[1] if len(parts) >= 3 else ""


def describe(context: AppContext, model_id: str) -> dict[str, Any]:
    entry = catalog.find(model_id)
    backend = context.backends[model_id]
    lora = catalog.supports_lora(model_id)
    return {
        "id": str(uuid.uuid5(_ID_NAMESPACE, "model:" + model_id)),
        "name": model_id,
        "description": entry.description if entry is not None else f"{model_id}, served by loraserve.",
        "source": SOURCE_ID,
        "task": dict(TEXT_GENERATION),
        "tags": [],
        "properties": [
            {"property_id": "context_window",
             "value": str(catalog.listed_context_window(model_id, backend.info.context_window))},
            {"property_id": "lora", "value": "true" if lora else "false"},
            # Workers AI marks its "-lora" models beta.
            {"property_id": "beta", "value": "true" if model_id.endswith(catalog.LORA_SUFFIX) else "false"},
        ],
    }


def _matches(model: dict[str, Any], search: str | None, task: str | None, author: str | None,
             source: int | None) -> bool:
    if search and search.lower() not in f"{model['name']}\n{model['description']}".lower():
        return False
    if task and task.lower() not in (model["task"]["name"].lower(), model["task"]["id"]):
        return False
    if author and author.lower() != author_of(model["name"]).lower():
        return False
    return source is None or source == model["source"]


@router.get("/search", responses={200: {"model": ModelSearchEnvelope}})
async def search_models(
    request: Request,
    account: Account,
    search: str | None = None,
    task: str | None = None,
    author: str | None = None,
    source: int | None = None,
    page: Annotated[int, Query(ge=1)] = 1,
    per_page: Annotated[int, Query(ge=1, le=MAX_PER_PAGE)] = 50,
) -> JSONResponse:
    context = get_context(request)
    models = [describe(context, model_id) for model_id in sorted(context.backends)]
    found = [m for m in models if _matches(m, search, task, author, source)]
    start = (page - 1) * per_page
    shown = found[start : start + per_page]
    body = success(shown)
    body["result_info"] = {"page": page, "per_page": per_page, "count": len(shown), "total_count": len(found)}
    return JSONResponse(body)


@router.get("/schema", responses={200: {"model": ModelSchemaEnvelope}})
async def model_schema(request: Request, account: Account, model: str) -> JSONResponse:
    context = get_context(request)
    if model not in context.backends and model + catalog.LORA_SUFFIX not in context.backends:
        raise NoSuchModel(model, catalog.how_to_serve(model))
    return success_response({"input": input_schema(), "output": output_schema()})
