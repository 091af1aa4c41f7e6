"""schemathesis against a live loraserve: the checks and hooks that tests/api/test_api_schemathesis.py and
scripts/fuzz-api share (the script loads this module as schemathesis hooks: SCHEMATHESIS_HOOKS=api_fuzz).

Importing it registers, for every schemathesis run in the process:
- the check `error_shape`: every error is the Workers AI envelope with an integer code and a message,
  or, on the /v1 routes, OpenAI's `{"error": {...}}`;
- a `before_call` hook that keeps generation cheap (max_tokens at most MAX_TOKENS, whatever was
  generated), points most OpenAI-style bodies at the served model (a random model name only tests
  5007), and sends some cases with a wrong token, none, or to an account that does not exist (their
  answer must be 401/10000 or 404/7003, whatever else is wrong with them);
- an `after_call` hook that tallies the statuses (`STATUSES`; scripts/fuzz-api prints them).
"""

from __future__ import annotations

import atexit
import collections
import itertools
import json
import os
import threading
from typing import Any

import schemathesis

SERVED_MODEL = "@cf/meta-llama/llama-2-7b-chat-hf-lora"
MAX_TOKENS = 3
# Of every AUTH_CYCLE calls, one goes out with a wrong token, one with none, one to an unknown account.
AUTH_CYCLE = 12
_GENERATING = ("/run/{model}", "/v1/chat/completions", "/v1/completions")

STATUSES: collections.Counter[int] = collections.Counter()
_BAD_AUTH: set[str] = set()  # ids of the cases sent with a wrong token, none, or to an unknown account
_calls = itertools.count()
_lock = threading.Lock()


def is_openai_route(path: str) -> bool:
    return "/ai/v1/" in path


def _generates(path: str) -> bool:
    return path.endswith(_GENERATING)


def _cap_generation(case: schemathesis.Case) -> None:
    body = case.body
    if not isinstance(body, dict) or not _generates(case.path):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if type(value) is int and value > MAX_TOKENS:
            body[key] = MAX_TOKENS
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS


def _served_model(case: schemathesis.Case, n: int) -> None:
    """Three positive OpenAI-style cases in four name the served model: a random name is only a 5007."""
    body = case.body
    meta = case.meta
    positive = meta is None or not meta.generation.mode.is_negative
    if positive and is_openai_route(case.path) and isinstance(body, dict) and "model" in body and n % 4:
        body["model"] = SERVED_MODEL


def _vary_auth(case: schemathesis.Case, n: int) -> None:
    """Some calls go with a wrong token, none, or to an account that does not exist."""
    turn = n % AUTH_CYCLE
    if not case.path.startswith("/client/") or turn not in (3, 7, 11):
        return
    if turn == 3:
        case.path_parameters = {**(case.path_parameters or {}), "account_id": "no-such-account"}
    else:
        headers = dict(case.headers or {})
        headers.pop("Authorization", None)
        if turn == 7:
            headers["Authorization"] = "Bearer not-a-token-of-anyone"
        case.headers = headers  # type: ignore[assignment]
    _BAD_AUTH.add(case.id)


def fuzz_config(account_id: str, token: str, finetune_id: str, finetune_name: str, *,
                max_examples: int, seed: int) -> dict[str, Any]:
    """schemathesis' configuration (as schemathesis.toml would hold it): the account in every path and
    its token, the served model, and an existing finetune for the upload and lookup routes."""
    return {
        "seed": seed,
        "auth": {"openapi": {"bearerAuth": {"bearer": token}}},
        "parameters": {"path.account_id": account_id, "path.model": SERVED_MODEL},
        "generation": {"max-examples": max_examples},
        "checks": {
            # A wrong method is Workers AI's 404/7003 ("could not route"), not 405: by design.
            "unsupported_method": {"enabled": False},
            # Valid by the schema yet refused by what no schema can know: unknown finetunes, a prompt
            # longer than the context window, a chat template's rules. The refusals are checked
            # (`error_shape`, status and schema conformance), not that there are none.
            "positive_data_acceptance": {"enabled": False},
        },
        "operations": [
            # One filter each: several are alternatives, not conditions that must all hold.
            {"include-name-regex": "^POST .*/finetune-assets$", "parameters": {"path.ref": finetune_id}},
            {"include-name-regex": "^GET .*/finetunes/[{]ref[}]$", "parameters": {"path.ref": finetune_name}},
        ],
    }


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    n = next(_calls)
    _cap_generation(case)
    _served_model(case, n)
    _vary_auth(case, n)


@schemathesis.hook
def after_call(
    context: schemathesis.HookContext, case: schemathesis.Case, response: schemathesis.Response
) -> None:
    with _lock:
        STATUSES[response.status_code] += 1


@schemathesis.check
def error_shape(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool:
    """Errors in the Workers AI envelope with its code (OpenAI's shape on /v1); a wrong token is 401."""
    status = response.status_code
    if case.id in _BAD_AUTH and status not in (401, 404):  # 404: no such account, or no route (7003)
        raise AssertionError(
            f"{status} for a wrong token, none, or a wrong account: {response.content[:200]!r}"
        )
    if status < 400:
        return True
    try:
        data = json.loads(response.content)
    except ValueError as exc:
        raise AssertionError(f"{status} with a body that is not JSON: {response.content[:200]!r}") from exc
    if is_openai_route(case.path):
        error = data.get("error") if isinstance(data, dict) else None
        if not (isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]
                and isinstance(error.get("type"), str) and isinstance(error.get("code"), str)):
            raise AssertionError(f"{status} without OpenAI's error shape: {data!r}")
        return True
    if not (isinstance(data, dict) and data.get("success") is False and data.get("result") is None
            and data.get("messages") == [] and isinstance(data.get("errors"), list) and data["errors"]):
        raise AssertionError(f"{status} without the Workers AI envelope: {data!r}")
    for error in data["errors"]:
        if not (isinstance(error, dict) and type(error.get("code")) is int
                and isinstance(error.get("message"), str) and error["message"]):
            raise AssertionError(f"{status} with an error that lacks an integer code or a message: {error!r}")
    if status == 401 and data["errors"][0]["code"] != 10000:
        raise AssertionError(f"401 with code {data['errors'][0]['code']}, not 10000")
    return True


def _dump_statuses() -> None:
    path = os.environ.get("LORASERVE_FUZZ_STATUSES")
    if path:
        with open(path, "w") as out:
            json.dump({str(k): v for k, v in sorted(STATUSES.items())}, out)


atexit.register(_dump_statuses)
