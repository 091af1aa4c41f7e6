"""The shapes the server answers with, as pydantic models, and the JSON Schemas it publishes.

Routes build their answers as plain dicts (`envelope.success`, `Finetune.to_api`,
`openai/shapes.ResponseShape`); these models only describe them, for /openapi.json (`openapi.py`) and
/models/schema. The request bodies are described by the very models the routes validate with
(`schemas.py`, `openai/schemas.py`).
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraserve.api.schemas import FinetuneCreate, MessagesInput, PromptInput
from loraserve.registry.records import AssetFile

# -- the Workers AI envelope ------------------------------------------------------------------------


class Out(BaseModel):
    """An answer's shape: exactly these fields, so that a field added by a route shows up as undocumented."""

    model_config = ConfigDict(extra="forbid")


class ErrorItem(Out):
    code: int
    message: str


class ErrorEnvelope(Out):
    """Every error outside the OpenAI-compatible routes (errors.py has the codes)."""

    result: None
    success: Literal[False]
    errors: list[ErrorItem] = Field(min_length=1)
    messages: list[Any]


class _Envelope(Out):
    success: Literal[True]
    errors: list[ErrorItem] = Field(max_length=0)
    messages: list[Any]


class PromptTokensDetails(Out):
    cached_tokens: int = Field(description="Prompt tokens served from the prefix cache instead of computed "
                               "(prompt caching; 0 when none were).")


class RunUsage(Out):
    """The same object as the OpenAI-compatible routes' `usage`."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class RunOutput(Out):
    """What a /run that is not streamed returns as `result` (routes_run builds exactly this)."""

    response: str
    usage: RunUsage


class RunEnvelope(_Envelope):
    result: RunOutput


class RunChunk(Out):
    """One event of a streamed /run (sse.py): text with random padding `p`, then the usage."""

    response: str
    p: str | None = None
    usage: RunUsage | None = None


class FinetuneOut(Out):
    id: str
    name: str
    description: str
    model: str
    public: bool
    created_at: str
    modified_at: str


class FinetuneEnvelope(_Envelope):
    result: FinetuneOut


class FinetuneListEnvelope(_Envelope):
    result: list[FinetuneOut]


class AssetOut(Out):
    id: str
    finetune_id: str
    file_name: str
    bucket_name: str
    created_at: str
    modified_at: str


class AssetEnvelope(_Envelope):
    result: AssetOut


class ModelTask(Out):
    id: str
    name: str
    description: str


class ModelProperty(Out):
    property_id: str
    value: str


class ModelOut(Out):
    id: str
    name: str
    description: str
    source: int
    task: ModelTask
    tags: list[str]
    properties: list[ModelProperty]


class ResultInfo(Out):
    page: int
    per_page: int
    count: int
    total_count: int


class ModelSearchEnvelope(_Envelope):
    result: list[ModelOut]
    result_info: ResultInfo


class ModelSchemas(Out):
    input: dict[str, Any]
    output: dict[str, Any]


class ModelSchemaEnvelope(_Envelope):
    result: ModelSchemas


class Health(Out):
    status: Literal["ok"]
    models: list[str]


# -- JSON Schemas -----------------------------------------------------------------------------------


def inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with its `$defs` references replaced by what they name: every part stands alone
    (none of these models is recursive)."""
    defs: dict[str, Any] = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: walk(v) for k, v in node.items() if k != "$ref"}
                return {**walk(defs[ref.removeprefix("#/$defs/")]), **rest}
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    out: dict[str, Any] = walk(schema)
    return out


def request_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A request body's schema, self-contained, exactly as `model` validates it."""
    return inlined(model.model_json_schema(mode="validation"))


@cache
def input_schema() -> dict[str, Any]:
    """The two /run input shapes as one schema: exactly the pydantic models the endpoint validates,
    and (as `schemas.parse_run_input` insists) never both `prompt` and `messages`."""
    prompt = {**request_schema(PromptInput), "not": {"required": ["messages"]}}
    messages = {**request_schema(MessagesInput), "not": {"required": ["prompt"]}}
    return {"type": "object", "oneOf": [prompt, messages]}


@cache
def output_schema() -> dict[str, Any]:
    whole = inlined(RunOutput.model_json_schema(mode="serialization"))
    return {
        "oneOf": [
            {**whole, "contentType": "application/json"},
            {"type": "string", "contentType": "text/event-stream", "format": "binary"},
        ]
    }


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its JSON body by hand (any Content-Type is accepted)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


@cache
def finetune_create_body() -> dict[str, Any]:
    return json_body(request_schema(FinetuneCreate))


@cache
def upload_body() -> dict[str, Any]:
    """One adapter file as multipart/form-data, the way wrangler uploads it."""
    names = [f.value for f in AssetFile]
    form = {
        "type": "object",
        "required": ["file"],
        "properties": {
            "file_name": {
                "type": "string", "enum": names,
                "description": "Which adapter file this is; defaults to the file part's own filename.",
            },
            "file": {"type": "string", "format": "binary"},
        },
    }
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}


def event_stream(*payloads: type[BaseModel]) -> dict[str, Any]:
    """A text/event-stream response whose events carry one of `payloads` as JSON, then `[DONE]`."""
    payload = {"anyOf": [inlined(m.model_json_schema(mode="serialization")) for m in payloads]}
    data = {"type": "string", "if": {"const": "[DONE]"},
            "else": {"contentMediaType": "application/json", "contentSchema": payload}}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {"text/event-stream": {"itemSchema": event}}


@cache
def run_responses() -> dict[int | str, dict[str, Any]]:
    return {200: {"model": RunEnvelope, "content": event_stream(RunChunk, ErrorEnvelope)}}
