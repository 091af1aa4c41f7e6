"""Shared builders for the engine tests.

The oracle is always an independent implementation: a tiny random `transformers` LlamaForCausalLM and
PEFT adapters saved with `save_pretrained`, compared with our engine built from the same weights.
Nothing here replaces an engine component: `run_traced` drives the real scheduler, model runner and
model the way `LLMEngine.step` does, and only asks the model for the logits of every computed row.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loraserve.engine.config import EngineConfig, ModelConfig
from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.lora.sgmv import SgmvPart
from loraserve.engine.process import configure_process
from loraserve.types import LORA_TARGETS

ALL_TARGETS: tuple[str, ...] = LORA_TARGETS
QV_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")
MLP_TARGETS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")


# Adapters of every kind the engine must mix in one batch: ranks 1 to 64 (three rank buckets), subsets of
# the projections, lora_alpha, rsLoRA, per-module rank and alpha.
ADAPTER_SPECS: dict[str, dict[str, Any]] = {
    "r1-qv": dict(r=1, targets=QV_TARGETS, lora_alpha=2, std=0.2),
    "r2-mlp": dict(r=2, targets=MLP_TARGETS, lora_alpha=4, std=0.15),
    "r8-all": dict(r=8, targets=ALL_TARGETS, lora_alpha=16),
    "r16-all-rslora": dict(r=16, targets=ALL_TARGETS, lora_alpha=8, use_rslora=True),
    "r64-attn": dict(r=64, targets=("q_proj", "k_proj", "v_proj", "o_proj"), lora_alpha=32, std=0.03),
    # Per-module rank and alpha, keyed by the short names PEFT matches as suffixes.
    "r4-patterns": dict(r=4, targets=ALL_TARGETS, lora_alpha=8, rank_pattern={"v_proj": 2},
                        alpha_pattern={"down_proj": 24}),
}


def hf_config(**overrides: Any) -> LlamaConfig:
    """A tiny Llama: GQA (4 heads, 2 KV heads), untied head. `initializer_range` is larger than HF's
    default so that logits are well spread and a greedy argmax is never a near tie."""
    kw: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def hf_model(seed: int = 0, **overrides: Any) -> Any:
    """A LlamaForCausalLM in eval mode (typed Any: transformers' own annotations are loose)."""
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(hf_config(**overrides))
    model.eval()
    # HF initialises norms to ones; random norms catch a swapped input/post-attention norm.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def model_config(model: LlamaForCausalLM) -> ModelConfig:
    return ModelConfig.from_hf(model.config.to_dict())


def legacy_hf_dict(model: LlamaForCausalLM) -> dict[str, Any]:
    """`model.config` as a transformers 4.x config.json spells it (the Hub's Llama files): top-level
    `rope_theta` and `rope_scaling` instead of transformers 5's `rope_parameters`."""
    d = model.config.to_dict()
    rope = dict(d.pop("rope_parameters", None) or {})
    d["rope_theta"] = rope.pop("rope_theta", 10000.0)
    d["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    return d


def build_engine(model: LlamaForCausalLM, context_window: int | None = None, cfg: ModelConfig | None = None,
                 **engine_options: Any) -> LLMEngine:
    """Our engine on a copy of `model`'s weights (the engine pops tensors out of the dict it is given).
    `cfg` defaults to `ModelConfig.from_hf(model.config.to_dict())`."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # One thread: the test machine is shared and small; oversubscribed OpenMP threads spin and crawl.
    options: dict[str, Any] = dict(block_size=4, threads=1)
    options.update(engine_options)
    # Small token budgets force chunked prefill; the batch must not outnumber the budget.
    options.setdefault("max_num_seqs", min(64, options.get("max_num_batched_tokens", 1024)))
    ecfg = EngineConfig(**options)
    configure_process(ecfg)
    return LLMEngine(cfg or model_config(model), state, ecfg, context_window=context_window)


def make_adapter(base: LlamaForCausalLM, folder: Path, *, seed: int, r: int, targets: tuple[str, ...],
                 lora_alpha: int | None = None, use_rslora: bool = False, std: float = 0.05,
                 **extra: Any) -> Path:
    """Save a PEFT adapter for `base` with random A and B (both N(0, std)), so it changes the outputs."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=lora_alpha if lora_alpha is not None else r,
                        target_modules=list(targets), use_rslora=use_rslora, init_lora_weights=False,
                        task_type="CAUSAL_LM", **extra)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0.0, std)
    peft_model.save_pretrained(str(folder))
    return folder


def make_adapters(base: LlamaForCausalLM, root: Path, names: list[str]) -> dict[str, Path]:
    """The `ADAPTER_SPECS` adapters named, each with its own fixed seed, saved under `root`."""
    return {name: make_adapter(base, root / name, seed=100 + i, **spec)
            for i, (name, spec) in enumerate(ADAPTER_SPECS.items()) if name in names}


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Prompts of random token ids (3 and up: 0-2 are the tiny model's special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


def peft_reference(base: LlamaForCausalLM, adapters: dict[str, Path]) -> PeftModel:
    """One PeftModel holding every adapter under its name (switch with `set_adapter`)."""
    names = list(adapters)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model.eval()


@torch.no_grad()
def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(input_ids=torch.tensor([prompt]),
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    ids: list[int] = out[0, len(prompt):].tolist()
    return ids


def reference_greedy(base: LlamaForCausalLM, peft_model: PeftModel | None, prompt: list[int],
                     adapter: str | None, max_new_tokens: int) -> list[int]:
    if adapter is None:
        return hf_greedy(base, prompt, max_new_tokens)
    assert peft_model is not None
    peft_model.set_adapter(adapter)
    return hf_greedy(peft_model, prompt, max_new_tokens)


@torch.no_grad()
def hf_logits(model: Any, token_ids: list[int]) -> torch.Tensor:
    """[len, V] logits of every position (position p predicts token p + 1)."""
    logits: torch.Tensor = model(input_ids=torch.tensor([token_ids])).logits[0].float()
    return logits


def reference_logits(base: LlamaForCausalLM, peft_model: PeftModel | None, token_ids: list[int],
                     adapter: str | None) -> torch.Tensor:
    if adapter is None:
        return hf_logits(base, token_ids)
    assert peft_model is not None
    peft_model.set_adapter(adapter)
    return hf_logits(peft_model, token_ids)


@dataclass
class Trace:
    """What `run_traced` saw: per sequence, (position, logits) of every computed row, in step order."""

    rows: dict[int, list[tuple[int, torch.Tensor]]] = field(default_factory=lambda: defaultdict(list))
    # LoraBatch paths used: "padded" / "heavy" / "singles" (torch), "sgmv" (the CPU kernel)
    lora_paths: set[str] = field(default_factory=set)
    num_steps: int = 0
    max_step_tokens: int = 0
    mixed_steps: int = 0  # steps with decode rows and prefill chunks together


def wait_adapters_in_host(engine: LLMEngine, keys: set[str], timeout_s: float = 30.0) -> None:
    """Block until every adapter in `keys` is parsed into host memory, so the next `schedule()` admits
    all their requests in one step (without this the first step's batch depends on loader timing)."""
    from loraserve.engine.core.scheduler import AdapterState

    deadline = time.monotonic() + timeout_s
    while (pending := {k for k in keys if engine.adapters.state(k) is not AdapterState.READY}):
        if time.monotonic() > deadline:
            raise TimeoutError(f"adapters not loaded: {sorted(pending)}")
        time.sleep(0.002)


def run_traced(engine: LLMEngine, timeout_s: float = 60.0) -> Trace:
    """Run `engine` to completion with greedy sampling, as `LLMEngine.step` does, recording logits.

    Every row's logits are computed (not only the sampled rows), so prefill chunks are checked at each
    position. A sequence stops after `params.max_tokens` tokens (EOS is ignored).
    """
    trace = Trace()
    deadline = time.monotonic() + timeout_s
    while engine.has_work():
        if time.monotonic() > deadline:
            raise TimeoutError("engine did not finish")
        sched = engine.scheduler.schedule()
        assert not sched.failed, "run_traced expects loadable adapters"
        if not sched.scheduled:
            time.sleep(0.002)  # an adapter is loading in the background
            continue
        meta, order = engine.runner.prepare(sched.scheduled)
        num_rows = int(meta.input_ids.shape[0])
        if meta.lora is not None:
            for part in meta.lora.parts:
                if isinstance(part, SgmvPart):
                    trace.lora_paths.add("sgmv")
                    continue
                trace.lora_paths |= {name for name, used in (("padded", part.padded is not None),
                                                             ("heavy", bool(part.heavy)),
                                                             ("singles", bool(part.singles))) if used}
        logits = engine.model.forward(
            replace(meta, logits_indices=torch.arange(num_rows, device=engine.device)), engine.kv
        )
        trace.num_steps += 1
        trace.max_step_tokens = max(trace.max_step_tokens, num_rows)
        if 0 < meta.num_decode < len(order):
            trace.mixed_steps += 1
        row = 0
        sampled: list[tuple[Any, int]] = []
        for s in order:
            seq = s.seq
            for j in range(s.num_new):
                trace.rows[seq.seq_id].append((seq.num_computed + j, logits[row + j].clone()))
            if s.samples:
                sampled.append((seq, int(logits[row + s.num_new - 1].argmax())))
            row += s.num_new
        for s in order:
            s.seq.num_computed += s.num_new
        for seq, tok in sampled:
            seq.append(tok)
            if seq.num_output >= seq.params.max_tokens:
                engine.abort(seq.request_id)
    return trace


def assert_trace_matches(trace: Trace, seq: Any, reference: torch.Tensor, atol: float = 1e-4,
                         rtol: float = 1e-4, first: int = 0) -> None:
    """Every recorded row of `seq` equals the reference logits at its position; `first` is the first
    position the trace saw (earlier ones were computed before `run_traced` started)."""
    rows = trace.rows[seq.seq_id]
    assert rows, f"no rows were computed for {seq.request_id}"
    positions = {p for p, _ in rows}
    # Every position was computed: the prompt, then each output token but the last (it ends the run).
    assert positions == set(range(first, seq.num_tokens - 1))
    for pos, got in rows:
        try:
            torch.testing.assert_close(got, reference[pos], atol=atol, rtol=rtol)
        except AssertionError as exc:
            raise AssertionError(f"{seq.request_id} position {pos}: {exc}") from None
