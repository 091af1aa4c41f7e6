"""Generated requests, good and bad, from the server's own /openapi.json (schemathesis), against the live
test server: no answer of 500 or above, every error in the Workers AI envelope with its integer code
(OpenAI's error shape on /v1), every answer as the document says (status, content type, body, event-stream
events), and bodies that break the schema refused.

Every operation gets EXAMPLES cases of valid data and as many of invalid data (schemathesis' fuzzing
phase), deterministically. The checks and hooks are shared with scripts/fuzz-api, which runs all of
schemathesis' phases with many more cases (tests/api_fuzz.py).

schemathesis' own pytest integration (`schemathesis.pytest.from_fixture`) does not run on pytest 9 (it
reads `Function._nodeid`), so the cases are driven with hypothesis directly: one test per operation
and mode, ~1300 cases in all.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from typing import Any

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.errors import FailureGroup

from loraserve.api.handlers import CatchAllMiddleware
from loraserve.api.schemas import FinetuneCreate
from loraserve.errors import WorkersAIError
from loraserve.registry.names import check_name

import api_fuzz
from conftest import LORA_MODEL, Account, LiveServer

EXAMPLES = 50  # per operation and mode
FINETUNE = "fuzz-target"
OPERATIONS = [  # (method, path under the account's /ai), as the document lists them
    ("POST", "/run/{model}"), ("POST", "/finetunes"), ("GET", "/finetunes"), ("GET", "/finetunes/public"),
    ("GET", "/finetunes/{ref}"), ("DELETE", "/finetunes/{ref}"), ("POST", "/finetunes/{ref}/finetune-assets"),
    ("GET", "/models/search"), ("GET", "/models/schema"), ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/v1/models/{model}"),
]
ACCOUNT_PREFIX = "/client/v4/accounts/{account_id}/ai"


@dataclass(frozen=True)
class Target:
    schema: Any  # schemathesis' OpenApiSchema
    account_id: str
    finetune_id: str

    def path_parameters(self, method: str, path: str) -> dict[str, str]:
        """What the fuzz config pins (`api_fuzz.fuzz_config`), which as_strategy() leaves to the engine."""
        pinned = {"account_id": self.account_id, "model": LORA_MODEL}
        if method == "POST" and path.endswith("/finetunes/{ref}/finetune-assets"):
            pinned["ref"] = self.finetune_id
        elif method == "GET" and path.endswith("/finetunes/{ref}"):
            pinned["ref"] = FINETUNE
        return {name: value for name, value in pinned.items() if "{" + name + "}" in path}


@pytest.fixture(scope="module")
def target(server: LiveServer) -> Target:
    account = server.new_account("fuzz")
    created = httpx.post(f"{server.ai_url(account)}/finetunes", headers=account.headers,
                         json={"model": LORA_MODEL, "name": FINETUNE})
    assert created.status_code == 200, created.text
    finetune_id = created.json()["result"]["id"]
    config = api_fuzz.fuzz_config(
        account.id, account.token, finetune_id, FINETUNE, max_examples=EXAMPLES, seed=1
    )
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json",
                                           config=schemathesis.config.SchemathesisConfig.from_dict(config))
    return Target(schema, account.id, finetune_id)


def test_the_document_lists_every_route(target: Target) -> None:
    listed = {(op.ok().method.upper(), op.ok().path) for op in target.schema.get_all_operations()}
    expected = {(method, ACCOUNT_PREFIX + path) for method, path in OPERATIONS}
    assert listed == expected | {("GET", "/healthz"), ("GET", "/metrics")}


CASES = [
    *((method, path, mode) for method, path in OPERATIONS
      for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)),
    ("GET", "/healthz", GenerationMode.POSITIVE),  # nothing to get wrong: no parameters, no body
    ("GET", "/metrics", GenerationMode.POSITIVE),
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=lambda v: getattr(v, "value", v))
def test_generated_requests(target: Target, method: str, path: str, mode: GenerationMode) -> None:
    full = path if path in ("/healthz", "/metrics") else ACCOUNT_PREFIX + path
    strategy = target.schema[full][method].as_strategy(
        generation_mode=mode, path_parameters=target.path_parameters(method, full)
    )
    failures: dict[str, str] = {}  # first line -> the whole report, one per distinct failure
    sent = collections.Counter[int]()

    @settings(
        max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.large_base_example],
    )
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        response = case.call(timeout=60)
        sent[response.status_code] += 1
        try:
            case.validate_response(response)
        except (AssertionError, FailureGroup) as exc:
            # Collected, not raised: every distinct failure is reported, and no time goes to shrinking.
            report = str(exc).strip()
            failures.setdefault(report.splitlines()[0] if report else repr(exc), report)

    run()
    print(f"{method} {path} {mode.value}: {sum(sent.values())} cases, {dict(sorted(sent.items()))}")
    assert sent, "no case was generated"
    assert not [s for s in sent if s >= 500], sent
    assert not failures, "\n\n".join(failures.values())


# -- what the fuzzing found, pinned down ------------------------------------------------------------


def envelope_error(response: httpx.Response, status: int, code: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["result"] is None and body["success"] is False and body["messages"] == [], body
    assert [e["code"] for e in body["errors"]] == [code], body
    message: str = body["errors"][0]["message"]
    return message


def test_the_document_is_served_without_a_token(server: LiveServer) -> None:
    doc = httpx.get(f"{server.base_url}/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "An API token of the account named in the path."}
    for path, item in doc["paths"].items():
        for operation in item.values():
            assert "422" not in operation["responses"]  # FastAPI's; this server answers 400 (5006)
            if path.startswith(ACCOUNT_PREFIX):
                assert operation["security"] == [{"bearerAuth": []}]
                assert {"400", "401", "404", "500"} <= set(operation["responses"])
    models = doc["paths"][ACCOUNT_PREFIX + "/models/schema"]["get"]["parameters"]
    assert next(p for p in models if p["name"] == "model")["schema"]["enum"] == sorted(
        {*server.backends, LORA_MODEL.removesuffix("-lora")})
    for hidden in ("/docs", "/redoc"):
        assert httpx.get(server.base_url + hidden).status_code == 404


@pytest.mark.parametrize("query", ["offset=2.5e-42", "offset=1e300", "offset=inf", "offset=1e20", "limit=2.5",
                                   "limit=nan"])
def test_public_paging_takes_whole_numbers_only(server: LiveServer, account: Account, query: str) -> None:
    # offset=2.5e-42 passed pydantic's multiple_of; 1e300 and inf reached SQLite as integers (500).
    response = httpx.get(f"{server.ai_url(account)}/finetunes/public?{query}", headers=account.headers)
    envelope_error(response, 400, 5006)


@pytest.mark.parametrize("query", ["offset=9007199254740992", "limit=10.0", "offset=0"])
def test_public_paging_still_takes_what_the_sdk_sends(
    server: LiveServer, account: Account, query: str
) -> None:
    response = httpx.get(f"{server.ai_url(account)}/finetunes/public?{query}", headers=account.headers)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("route", ["/run/" + LORA_MODEL, "/finetunes", "/v1/chat/completions"])
def test_a_body_nested_too_deeply_is_a_bad_request(server: LiveServer, account: Account, route: str) -> None:
    # json.loads gave up with RecursionError, which was a 500.
    deep = b"[" * 10_000 + b"]" * 10_000
    response = httpx.post(server.ai_url(account) + route, headers=account.headers, content=deep)
    if route.startswith("/v1/"):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "3003"
    else:
        assert "nested too deeply" in envelope_error(response, 400, 3003)


@pytest.mark.parametrize(("body", "ok"), [
    ({"raw": "true"}, True), ({"raw": "false", "stream": False}, True), ({"max_tokens": 2.0}, True),
    ({"temperature": 1}, True), ({"max_tokens": "2"}, False), ({"stream": 0}, False), ({"raw": "yes"}, False),
    ({"temperature": True}, False), ({"max_tokens": True}, False), ({"seed": 3.5}, False),
])
def test_run_takes_json_types_with_two_leniencies(server: LiveServer, account: Account, body: dict[str, Any],
                                                   ok: bool) -> None:
    """The published schema's types: only "true"/"false" for booleans and 5.0 for 5 beyond them."""
    response = httpx.post(server.run_url(account), headers=account.headers,
                          json={"prompt": "hi", "max_tokens": 1, **body}, timeout=60)
    if ok:
        assert response.status_code == 200, response.text
    else:
        envelope_error(response, 400, 5006)


@pytest.mark.parametrize("body", [{"public": 0}, {"public": "yes"}, {"name": "0x" + "a" * 30},
                                  {"name": "0123456789abcdef0123456789abcd_e"}])
def test_finetune_create_refuses_what_the_schema_refuses(server: LiveServer, account: Account,
                                                         body: dict[str, Any]) -> None:
    response = httpx.post(f"{server.ai_url(account)}/finetunes", headers=account.headers,
                          json={"model": LORA_MODEL, "name": "typed", **body})
    envelope_error(response, 400, 5006)


async def test_an_unexpected_error_on_v1_takes_openais_shape() -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("a bug")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    for path, shape in (
        ("/client/v4/accounts/a/ai/v1/models", "openai"), ("/client/v4/accounts/a/ai/run/m", "envelope")
    ):
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)  # noqa: B023 (each loop's list, used within the loop)

        scope = {"type": "http", "method": "GET", "path": path, "headers": []}
        await CatchAllMiddleware(broken)(scope, receive, send)
        assert sent[0]["status"] == 500
        body = json.loads(sent[1]["body"])
        if shape == "openai":
            assert body["error"]["code"] == "3043" and body["error"]["type"] == "server_error"
        else:
            assert body["errors"] == [{"code": 3043, "message": "Internal server error"}]


@pytest.mark.parametrize("name", [
    "ok", "a.b_c-d", "...", ".a", "cf-public-x", "CF-Public-x", "cf-publicx", "a" * 128, "a" * 129, "a b",
    "a:b", "9f88f4fe-a705-4042-a7c1-5459152b26ed", "9f88f4fea7054042a7c15459152b26ed",
    "-9f88f4fe-a705-4042-a7c1-5459152b26ed-",
    "0x" + "a" * 30, "0X_" + "a" * 29, "0123456789abcdef0123456789abcd_e", "0123456789abcdef0123456789abc__e",
    "9f88f4fea7054042a7c15459152b26e", "9f88f4fea7054042a7c15459152b26edd", "g" * 32,
])
def test_the_name_schema_is_the_registrys_rule(name: str) -> None:
    """The published name pattern mirrors registry/names.py: a drift there shows here."""
    schema = FinetuneCreate.model_json_schema()["properties"]["name"]
    try:
        check_name(name)
        registry_ok = True
    except WorkersAIError:
        registry_ok = False
    assert jsonschema.Draft202012Validator(schema).is_valid(name) == registry_ok
