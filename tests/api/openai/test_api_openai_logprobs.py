"""Log-probabilities on the OpenAI face, against a live server: completions' `logprobs` and `echo` (the
prompt scored, as lm-evaluation-harness asks), chat's `logprobs` and `top_logprobs`, streamed and not,
with and without a finetune, checked against log_softmax of transformers' logits on the served weights
(their shapes and bad values: test_api_openai_logprobs_shapes.py)."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from openai import OpenAI

from loraserve.api.openai.logprobs import token_text
from loraserve.engine.loader import random_model
from loraserve.engine.weights.token_bytes import TokenBytes
from loraserve.types import ChatMessage

from conftest import LORA_MODEL, Account, LiveServer, create_finetune

ATOL = 1e-4
PROMPT = "The quick brown fox jumps over the lazy dog, again and again."
MESSAGES: list[Any] = [{"role": "user", "content": "Say something."}]
FINETUNE = "scored"


@pytest.fixture
def client(server: LiveServer, account: Account) -> Iterator[OpenAI]:
    with OpenAI(api_key=account.token, base_url=f"{server.ai_url(account)}/v1", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tuned(server: LiveServer, peft_adapter: Any) -> tuple[Account, Path]:
    owner = server.new_account("logprobs")
    folder = peft_adapter()
    create_finetune(server, owner, FINETUNE, folder)
    return owner, folder


@pytest.fixture(scope="module")
def oracle(tiny_backend: Any, tuned: tuple[Account, Path]) -> dict[str | None, Any]:
    """transformers' Llama on the served random:tiny weights (the same seed), and it with the finetune's
    PEFT adapter: None -> the base model, FINETUNE -> the adapted one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers/peft deprecation chatter
        from peft import PeftModel
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg, state = random_model("tiny", tiny_backend.tokenizer)
        base = LlamaForCausalLM(LlamaConfig(**cfg.to_hf()))
        base.load_state_dict(state, strict=False)  # the head is tied to the embedding
        base.eval()
        adapted = PeftModel.from_pretrained(copy.deepcopy(base), str(tuned[1])).eval()
    return {None: base, FINETUNE: adapted}


@torch.no_grad()
def log_softmax(model: Any, ids: list[int]) -> torch.Tensor:
    """[len, V]: row p is the distribution of token p + 1."""
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def completion(server: LiveServer, account: Account, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{server.ai_url(account)}/v1/completions", headers=account.headers,
                          json={"model": LORA_MODEL, "prompt": PROMPT, "temperature": 0, **body}, timeout=60)
    assert response.status_code == 200, response.text
    out: dict[str, Any] = response.json()
    return out


def check_echoed_prompt(logprobs: dict[str, Any], ids: list[int], reference: torch.Tensor,
                        names: TokenBytes, k: int) -> float:
    """The prompt's entries equal the reference (`k` alternatives each); returns their sum."""
    n = len(ids)
    assert logprobs["tokens"][:n] == [token_text(names(i)) for i in ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    want = [float(reference[p - 1, ids[p]]) for p in range(1, n)]
    assert logprobs["token_logprobs"][1:n] == pytest.approx(want, abs=ATOL)
    for p in range(1, n):
        top = logprobs["top_logprobs"][p]
        values, best = reference[p - 1].topk(k)
        # The k most likely tokens and the prompt's own, each with its logprob.
        want_top = {token_text(names(t)): v for t, v in zip(best.tolist(), values.tolist(), strict=True)}
        want_top.setdefault(token_text(names(ids[p])), float(reference[p - 1, ids[p]]))
        assert top == pytest.approx(want_top, abs=ATOL)
        assert top[token_text(names(ids[p]))] == logprobs["token_logprobs"][p]
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    return float(sum(want))


def test_echo_with_max_tokens_zero_scores_the_prompt(server: LiveServer, account: Account, tiny_backend: Any,
                                                     oracle: dict[str | None, Any]) -> None:
    ids = tiny_backend.encode(PROMPT)
    out = completion(server, account, echo=True, logprobs=1, max_tokens=0)
    [choice] = out["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    # Positions whose logprobs are asked for are computed, never taken from the prefix cache.
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids),
                            "prompt_tokens_details": {"cached_tokens": 0}}
    logprobs = choice["logprobs"]
    assert {len(v) for v in logprobs.values()} == {len(ids)}
    reference = log_softmax(oracle[None], ids)
    total = check_echoed_prompt(logprobs, ids, reference, TokenBytes(tiny_backend.tokenizer), 1)
    # The perplexity a client computes from the answer is the model's.
    direct = sum(float(reference[p - 1, ids[p]]) for p in range(1, len(ids)))
    ppl = math.exp(-sum(logprobs["token_logprobs"][1:]) / (len(ids) - 1))
    assert ppl == pytest.approx(math.exp(-direct / (len(ids) - 1)), rel=1e-4)
    assert total == pytest.approx(direct, abs=1e-3)
    # Without echo, max_tokens 0 generates nothing, and there is nothing to score.
    bare = completion(server, account, logprobs=1, max_tokens=0)["choices"][0]
    assert bare["text"] == "" and bare["logprobs"] == {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                       "text_offset": []}
    assert completion(server, account, echo=True, max_tokens=0)["choices"][0]["logprobs"] is None


def test_lm_eval_loglikelihood_request(server: LiveServer, account: Account, tiny_backend: Any,
                                       oracle: dict[str | None, Any]) -> None:
    """What lm-evaluation-harness' local-completions sends for a loglikelihood: echo, logprobs 1,
    max_tokens 1; it reads the prompt's entries ([ctxlen:-1]) and whether each was the greedy choice."""
    ids = tiny_backend.encode(PROMPT)
    names = TokenBytes(tiny_backend.tokenizer)
    logprobs = completion(server, account, echo=True, logprobs=1, max_tokens=1)["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 1
    reference = log_softmax(oracle[None], ids)
    check_echoed_prompt(logprobs, ids, reference, names, 1)
    # The generated (greedy) token: the top one, with the distribution after the whole prompt.
    best = int(reference[-1].argmax())
    assert logprobs["tokens"][-1] == token_text(names(best))
    assert logprobs["token_logprobs"][-1] == max(logprobs["top_logprobs"][-1].values())
    assert logprobs["token_logprobs"][-1] == pytest.approx(float(reference[-1, best]), abs=ATOL)
    greedy = [lp == max(top.values()) for lp, top in zip(logprobs["token_logprobs"][1:-1],
                                                        logprobs["top_logprobs"][1:-1], strict=True)]
    assert greedy == [ids[p] == int(reference[p - 1].argmax()) for p in range(1, len(ids))]


def test_generated_tokens_and_the_finetune_in_one_batch(server: LiveServer, tuned: tuple[Account, Path],
                                                        tiny_backend: Any,
                                                        oracle: dict[str | None, Any]) -> None:
    owner, _ = tuned
    ids = tiny_backend.encode(PROMPT)
    names = TokenBytes(tiny_backend.tokenizer)
    models = [LORA_MODEL, f"{LORA_MODEL}:{FINETUNE}"] * 3  # sent together: the engine mixes them
    with ThreadPoolExecutor(len(models)) as pool:
        outs = list(pool.map(lambda m: completion(server, owner, model=m, logprobs=3, max_tokens=6,
                                                  echo=True), models))
    for model, out in zip(models, outs, strict=True):
        adapter = FINETUNE if ":" in model else None
        logprobs = out["choices"][0]["logprobs"]
        generated = out["usage"]["completion_tokens"]  # 6, or fewer if the model ended its text
        assert generated > 0 and len(logprobs["tokens"]) == len(ids) + generated
        full = list(ids)
        for _ in range(generated):  # greedy: each generated token is the reference's argmax
            reference = log_softmax(oracle[adapter], full)
            full.append(int(reference[-1].argmax()))
        reference = log_softmax(oracle[adapter], full)
        check_echoed_prompt(logprobs, ids, reference, names, 3)
        for i in range(len(ids), len(full)):
            assert logprobs["tokens"][i] == token_text(names(full[i]))
            assert logprobs["token_logprobs"][i] == pytest.approx(float(reference[i - 1, full[i]]), abs=ATOL)
            values, top = reference[i - 1].topk(3)
            got = logprobs["top_logprobs"][i]
            assert list(got) == [token_text(names(t)) for t in top.tolist()]  # the chosen one is the first
            assert list(got.values()) == pytest.approx(values.tolist(), abs=ATOL)
    assert outs[0]["choices"][0]["logprobs"] != outs[1]["choices"][0]["logprobs"]  # the adapter counts
    assert all(out["choices"][0] == outs[i % 2]["choices"][0] for i, out in enumerate(outs))


def test_streamed_completion_logprobs_add_up_to_the_whole(client: OpenAI) -> None:
    whole = client.completions.create(model=LORA_MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=5,
                                      temperature=0)
    chunks = list(client.completions.create(model=LORA_MODEL, prompt=PROMPT, echo=True, logprobs=2,
                                            max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert whole.choices[0].text.startswith(PROMPT)
    assert chunks[0].choices[0].text.startswith(PROMPT)  # the prompt comes first, with its logprobs
    assert chunks[-1].choices[0].logprobs is None and chunks[-1].choices[0].finish_reason == "length"
    parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert len(parts) > 1
    expected = whole.choices[0].logprobs
    assert expected is not None
    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for p in parts for v in getattr(p, name)] == getattr(expected, name), name


def test_chat_logprobs(client: OpenAI, tiny_backend: Any, oracle: dict[str | None, Any]) -> None:
    out = client.chat.completions.create(model=LORA_MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=3)
    [choice] = out.choices
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert out.usage is not None and len(content) == out.usage.completion_tokens > 0
    names = TokenBytes(tiny_backend.tokenizer)
    full = tiny_backend.encode(_chat_prompt(tiny_backend))
    n = len(full)
    for _ in content:
        full.append(int(log_softmax(oracle[None], full)[-1].argmax()))
    reference = log_softmax(oracle[None], full)
    for i, entry in enumerate(content):
        token = full[n + i]
        assert entry.token == token_text(names(token)) and entry.bytes == list(names(token))
        assert entry.logprob == pytest.approx(float(reference[n + i - 1, token]), abs=ATOL)
        values, top = reference[n + i - 1].topk(3)
        assert [t.token for t in entry.top_logprobs] == [token_text(names(t)) for t in top.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=ATOL)
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the chosen one is the top one
    # logprobs without top_logprobs: each token's own, no alternatives.
    plain = client.chat.completions.create(model=LORA_MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                           logprobs=True)
    assert plain.choices[0].logprobs is not None and plain.choices[0].logprobs.content is not None
    assert [(e.token, e.logprob, e.top_logprobs) for e in plain.choices[0].logprobs.content] == [
        (e.token, e.logprob, []) for e in content]
    # Streamed: the same entries, chunk by chunk; the role and finish chunks carry none.
    chunks = list(client.chat.completions.create(model=LORA_MODEL, messages=MESSAGES, max_tokens=5,
                                                 temperature=0, logprobs=True, top_logprobs=3, stream=True))
    assert chunks[0].choices[0].logprobs is None and chunks[-1].choices[0].logprobs is None
    streamed = [e for c in chunks if c.choices[0].logprobs is not None
                for e in c.choices[0].logprobs.content or []]
    assert streamed == content
    assert client.chat.completions.create(model=LORA_MODEL, messages=MESSAGES,
                                          max_tokens=2).choices[0].logprobs is None


def _chat_prompt(backend: Any) -> str:
    return str(backend.render_chat([ChatMessage(m["role"], m["content"]) for m in MESSAGES]))
