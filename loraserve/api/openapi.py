"""GET /openapi.json: the API as it really is, for schemathesis and for client generators.

FastAPI writes the paths, parameters and the success bodies the routes declare (`openapi_models.py`,
`openai/schemas.py`); this adds what it cannot know: the bearer scheme, and the errors every account
route may answer, in the Workers AI envelope or (on /v1) in OpenAI's shape. FastAPI's own 422 is
dropped: this server answers a bad request with 400 and the envelope (handlers.py).
"""

from __future__ import annotations

import copy
import importlib.metadata
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from loraserve import catalog
from loraserve.api.context import AppContext
from loraserve.api.openai.responses import OpenAIError
from loraserve.api.openapi_models import ErrorEnvelope
from loraserve.api.session import MAX_SESSION_CHARS, SESSION_HEADER
from loraserve.errors import WorkersAIError

ACCOUNT_PREFIX = "/client/v4/accounts/{account_id}/ai"  # as app.py mounts the account routes
SECURITY_SCHEME = "bearerAuth"
_REF = "#/components/schemas/{model}"

DESCRIPTION = """A self-hosted, Workers AI-compatible server for one base LLM and many LoRA finetunes.

Every route under `/client/v4/accounts/{account_id}/ai` wants `Authorization: Bearer <token>`, a token
of that account (`loraserve token create`). Errors come in the Workers AI envelope
`{"result": null, "success": false, "errors": [{"code": N, "message": "..."}], "messages": []}`,
except on the OpenAI-compatible `/v1` routes, where they take OpenAI's `{"error": {...}}` shape."""

# What each status means here (errors.py has the codes).
_STATUS_TEXT = {
    400: "Bad input (5006), a missing or broken body (3003), an unknown model (5007), "
         "an invalid finetune file (3039)",
    401: "Missing or wrong bearer token (10000)",
    404: "No such account or route (7003), no such finetune (3037)",
    405: "The model takes no LoRA adapters (5005)",
    408: "The request took longer than the server's timeout (3007)",
    413: "The body is too large (3006; an adapter file over the limit is 400/3039), "
         "or prompt plus max_tokens exceed the context window (5021)",
    429: "Rate limited or too many finetunes (3036), or the engine's queue is full (3040)",
    500: "A bug on the server's side (3043); the log has the details",
}
_ACCOUNT_ERRORS = (400, 401, 404, 413, 429, 500)
_GENERATION_ERRORS = (*_ACCOUNT_ERRORS, 405, 408)  # /run and the OpenAI completions
_GENERATING = ("/run/{model}", "/v1/chat/completions", "/v1/completions")
# Read by hand (session.py), so FastAPI cannot list it.
_SESSION_PARAMETER = {
    "name": SESSION_HEADER, "in": "header", "required": False,
    "description": "An opaque key for a session whose requests share a prompt prefix (prompt caching): "
                   "a server of several engines sends them to the same one. Printable ASCII.",
    "schema": {"type": "string", "maxLength": MAX_SESSION_CHARS, "pattern": "^[ -~]*$"},
}


class DocumentedApp(FastAPI):
    """The app, whose /openapi.json is `openapi_document` (built once, on first request)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = openapi_document(self)
        return self.openapi_schema


def _component(schemas: dict[str, Any], model: type[BaseModel]) -> dict[str, str]:
    schema = model.model_json_schema(ref_template=_REF, mode="serialization")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    return {"$ref": _REF.format(model=model.__name__)}


def _error_responses(ref: dict[str, str], statuses: tuple[int, ...]) -> dict[str, Any]:
    return {
        str(status): {"description": _STATUS_TEXT[status], "content": {"application/json": {"schema": ref}}}
        for status in sorted(statuses)
    }


def openapi_document(app: FastAPI) -> dict[str, Any]:
    # A copy: FastAPI's document shares the routes' `openapi_extra` dicts, which the edits below must not
    # reach (they are cached, and several apps may live in one process).
    doc = copy.deepcopy(get_openapi(
        title="loraserve", version=importlib.metadata.version("loraserve"), description=DESCRIPTION,
        routes=app.routes,
    ))
    components = doc.setdefault("components", {})
    schemas: dict[str, Any] = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    envelope = _component(schemas, ErrorEnvelope)
    openai = _component(schemas, OpenAIError)
    components["securitySchemes"] = {
        SECURITY_SCHEME: {"type": "http", "scheme": "bearer",
                          "description": "An API token of the account named in the path."},
    }
    context = app.state.loraserve
    metrics_token = isinstance(context, AppContext) and context.settings.metrics_token is not None
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            responses: dict[str, Any] = operation.setdefault("responses", {})
            responses.pop("422", None)
            if path.startswith(ACCOUNT_PREFIX):
                route = path.removeprefix(ACCOUNT_PREFIX)
                operation["security"] = [{SECURITY_SCHEME: []}]
                statuses = _GENERATION_ERRORS if route in _GENERATING else _ACCOUNT_ERRORS
                if route in _GENERATING:
                    operation.setdefault("parameters", []).append(dict(_SESSION_PARAMETER))
                if route == "/finetunes" and method == "post":
                    statuses = (*statuses, 405)  # a base model without LoRA support
                ref = openai if route.startswith("/v1/") else envelope
                responses.update(_error_responses(ref, statuses))
            elif path == "/metrics" and metrics_token:
                operation["security"] = [{SECURITY_SCHEME: []}]
                responses.update(_error_responses(envelope, (401, 413)))
            else:
                responses.update(_error_responses(envelope, (413,)))
    if isinstance(context, AppContext):
        _name_served_models(doc["paths"], sorted(context.backends))
    return doc


def _name_served_models(paths: dict[str, Any], served: list[str]) -> None:
    """Where a model must be one this server serves, the document lists them (it describes this server)."""
    # A "-lora" id is also reached by its base name (catalog.resolve).
    names = sorted({*served, *(m.removesuffix(catalog.LORA_SUFFIX) for m in served)})
    create = (
        paths[ACCOUNT_PREFIX + "/finetunes"]["post"]
        ["requestBody"]["content"]["application/json"]["schema"]
    )
    create["properties"]["model"]["enum"] = [m for m in names if _takes_lora(m, served)]
    for parameter in paths[ACCOUNT_PREFIX + "/models/schema"]["get"]["parameters"]:
        if parameter["name"] == "model":
            parameter["schema"]["enum"] = names
    for path in ("/run/{model}", "/v1/models/{model}"):
        for operation in paths[ACCOUNT_PREFIX + path].values():
            for parameter in operation["parameters"]:
                if parameter["name"] == "model":
                    parameter["schema"]["examples"] = served


def _takes_lora(model: str, served: list[str]) -> bool:
    try:
        catalog.resolve(model, served, lora=True)
    except WorkersAIError:
        return False
    return True
