"""The shipped model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers on the same file.

transformers dequantizes the GGUF itself (through gguf-py) and runs its own LlamaForCausalLM; PEFT
applies the adapters on top of it. Greedy continuations must be token-identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraserve.engine.config import EngineConfig
from loraserve.engine.loader import load_engine
from loraserve.engine.sources import embedded_gguf_path
from loraserve.types import AdapterRef, ChatMessage, FinishReason, SamplingParams

from engine_helpers import ALL_TARGETS, hf_greedy, make_adapter, peft_reference

pytestmark = [
    # peft asks transformers for `is_gradient_checkpointing`, which transformers 5 deprecates.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    # peft's save_pretrained looks for the base model's config.json next to the GGUF, and there is none.
    pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning"),
]

NEW_TOKENS = 16
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


@pytest.fixture(scope="module")
def ours() -> Any:
    # One thread (also for transformers: torch's thread count is per process); see
    # engine_helpers.build_engine. float32: the file dequantized, for exact parity with transformers
    # (dtype auto would multiply its blocks as stored: tests/engine/test_gguf_dtype.py).
    return load_engine("embedded", EngineConfig(max_num_seqs=8, threads=1, dtype="float32"))


@pytest.fixture(scope="module")
def hf() -> Any:
    path = embedded_gguf_path()
    model: Any = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def prompts(ours: Any) -> list[list[int]]:
    _, tokenizer = ours
    return [tokenizer.encode(tokenizer.chat_template.render([ChatMessage("user", q)])) for q in QUESTIONS]


@pytest.fixture(scope="module")
def hf_plain(hf: Any, prompts: list[list[int]]) -> list[int]:
    """transformers' greedy continuation of the first prompt (computed once: CPU generation is slow)."""
    return hf_greedy(hf, prompts[0], NEW_TOKENS)


@pytest.fixture(scope="module")
def adapters(hf: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smollm2-adapters")
    return {
        "attn-r8": make_adapter(hf, root / "attn-r8", seed=1, r=8,
                                targets=("q_proj", "k_proj", "v_proj", "o_proj"), lora_alpha=16, std=0.07),
        "all-r16": make_adapter(hf, root / "all-r16", seed=2, r=16, targets=ALL_TARGETS, lora_alpha=32,
                                std=0.05),
    }


def test_chat_prompt_is_what_transformers_would_see(ours: Any, prompts: list[list[int]]) -> None:
    engine, tokenizer = ours
    assert engine.cfg.num_layers == 30 and engine.cfg.num_kv_heads == 3
    text = tokenizer.decode(prompts[0], skip_special_tokens=False)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    assert QUESTIONS[0] in text


def test_greedy_chat_completion_matches_transformers(ours: Any, prompts: list[list[int]],
                                                     hf_plain: list[int]) -> None:
    engine, tokenizer = ours
    # In a batch with the other prompts (their own correctness is the mixed-adapter test's business).
    outs = engine.generate(prompts, GREEDY)
    assert outs[0] == hf_plain
    assert "Paris" in tokenizer.decode(outs[0])


def test_chat_completion_stops_at_end_of_turn(ours: Any, prompts: list[list[int]]) -> None:
    """Without ignore_eos the answer ends at <|im_end|> (the tokenizer's end-of-turn token)."""
    engine, tokenizer = ours
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert im_end in engine.eos_ids
    (seq,) = [engine.add_request("eot", prompts[2], SamplingParams(max_tokens=200, temperature=0))]
    while engine.has_work():
        engine.step()
    assert seq.finish_reason is FinishReason.STOP and seq.output_ids[-1] == im_end
    assert im_end not in seq.output_ids[:-1]


def test_mixed_adapter_batch_matches_peft(ours: Any, hf: Any, prompts: list[list[int]], hf_plain: list[int],
                                          adapters: dict[str, Path]) -> None:
    engine, _ = ours
    reference = peft_reference(hf, adapters)  # on its own copy of the model
    refs = {name: AdapterRef(f"smol-{name}", str(path)) for name, path in adapters.items()}
    rows: list[str | None] = ["attn-r8", None, "all-r16"]
    outs = engine.generate([prompts[0]] * 3, GREEDY, [refs[a] if a else None for a in rows])
    assert outs[1] == hf_plain
    for name, out in zip(rows, outs, strict=True):
        if name is not None:
            reference.set_adapter(name)
            assert out == hf_greedy(reference, prompts[0], NEW_TOKENS), name
    # The adapters really steer the model, so the comparison above says something.
    assert outs[0] != hf_plain and outs[2] != hf_plain and outs[0] != outs[2]
    assert engine.stats()["adapters_pinned"] == 0 and engine.blocks.num_used == 0
