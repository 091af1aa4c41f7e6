"""The reference point: the same weights, adapters and requests on Hugging Face transformers + PEFT.

This is how one would serve many LoRAs without a multi-LoRA engine: static batches of `concurrency`
requests (left padded), `generate` with PEFT's mixed-adapter batches (`adapter_names=[...]`, which
splits every LoRA layer's batch by adapter), greedy, exactly `output_len` new tokens. Every adapter
the requests use is loaded before timing starts, which is HF's best case (no cache, no eviction).
"""

from __future__ import annotations

import contextlib
import enum
import io
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraserve.engine.config import ModelConfig
from loraserve.engine.loader import random_model
from loraserve.engine.sources import EMBEDDED, RANDOM_PREFIX, embedded_gguf_path
from loraserve.engine.weights.tokenizer import Tokenizer
from loraserve.tools.bench.workload import BenchRequest

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" inside a mixed batch


class SourceKind(enum.Enum):
    GGUF = enum.auto()
    HF_DIR = enum.auto()
    RANDOM = enum.auto()


def source_kind(source: str) -> SourceKind:
    if source == EMBEDDED or source.endswith(".gguf"):
        return SourceKind.GGUF
    if source.startswith(RANDOM_PREFIX):
        return SourceKind.RANDOM
    if Path(source).is_dir():
        return SourceKind.HF_DIR
    raise ValueError(f"no HF baseline for model source {source!r}")


@dataclass(frozen=True)
class BaselineResult:
    label: str
    wall_s: float
    output_tokens: int
    requests: int
    batch_s: tuple[float, ...]  # each generate call
    threads: int  # torch's CPU threads while it ran

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    def summary(self) -> dict[str, Any]:
        return {"wall_s": self.wall_s, "output_tokens": self.output_tokens, "output_tok_s": self.output_tok_s,
                "request_s": self.requests / self.wall_s, "completed": self.requests,
                "batch_s": list(self.batch_s), "threads": self.threads}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # transformers/PEFT warn about generation flags and GGUF conversion; that is their noise, not the
    # benchmark's, and it would fail a test run under `-W error`.
    from transformers.utils import logging as hf_logging

    log: Any = hf_logging  # untyped
    verbosity = log.get_verbosity()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.set_verbosity(verbosity)
        log.enable_progress_bar()


def load_hf_model(source: str, cfg: ModelConfig, tokenizer: Tokenizer, device: torch.device,
                  dtype: torch.dtype, seed: int) -> Any:
    """The engine's weights in the transformers model of their family, on `device` in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model: Any

    kind = source_kind(source)
    if kind is SourceKind.GGUF:
        path = embedded_gguf_path() if source == EMBEDDED else Path(source)
        with contextlib.redirect_stderr(io.StringIO()):  # its GGUF conversion draws a tqdm bar regardless
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    elif kind is SourceKind.HF_DIR:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    else:
        # The engine popped its copy of the random state dict; the same seed makes the same weights again.
        rcfg, state = random_model(source.removeprefix(RANDOM_PREFIX), tokenizer, seed=seed)
        if rcfg != cfg:
            raise ValueError("random model config differs from the engine's")
        with torch.device(device):  # initialised where it runs (fast on a GPU), then overwritten
            auto: Any = AutoModelForCausalLM  # transformers' from_config is untyped
            model = auto.from_config(AutoConfig.for_model(**cfg.to_hf()), dtype=dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()


def _left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def _generate(model: Any, batch: list[BenchRequest], new_tokens: int, pad_id: int,
              adapter_names: list[str] | None) -> int:
    device = next(model.parameters()).device
    ids, mask = _left_pad([r.prompt for r in batch], pad_id, device)
    extra: dict[str, Any] = {} if adapter_names is None else {"adapter_names": adapter_names}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id, **extra)
    made = int(out.shape[1] - ids.shape[1])
    if made != new_tokens:
        raise RuntimeError(f"HF generated {made} tokens, expected {new_tokens}")
    return made * len(batch)


def _timed(label: str, model: Any, requests: list[BenchRequest], batch_size: int, new_tokens: int,
           pad_id: int, mixed: bool) -> BaselineResult:
    device = next(model.parameters()).device

    def names(batch: list[BenchRequest]) -> list[str] | None:
        return [r.adapter.key if r.adapter else BASE_ADAPTER for r in batch] if mixed else None

    # Not counted: HF's first calls at a new batch shape are several times slower than later ones.
    warm = requests[:batch_size]
    for _ in range(2):
        _generate(model, warm, 2, pad_id, names(warm))
    batch_s, total = [], 0
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        t = time.perf_counter()
        total += _generate(model, batch, new_tokens, pad_id, names(batch))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        batch_s.append(time.perf_counter() - t)
    return BaselineResult(label, sum(batch_s), total, len(requests), tuple(batch_s), torch.get_num_threads())


def run_baseline(source: str, cfg: ModelConfig, tokenizer: Tokenizer, requests: list[BenchRequest],
                 batch_size: int, new_tokens: int, device: torch.device, dtype: torch.dtype, seed: int,
                 no_adapter: bool) -> list[BaselineResult]:
    """HF without adapters (if `no_adapter`) and HF + PEFT on the mixed-adapter requests."""
    from peft import PeftModel

    results = []
    pad_id = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else 0
    with _quiet():
        model = load_hf_model(source, cfg, tokenizer, device, dtype, seed)
        if no_adapter:
            bare = [BenchRequest(r.prompt, None) for r in requests]
            results.append(_timed("HF no adapter", model, bare, batch_size, new_tokens, pad_id, mixed=False))
        used = list({r.adapter.key: r.adapter for r in requests if r.adapter is not None}.values())
        if used:
            # autocast_adapter_dtype=False: keep adapters in the run's dtype (PEFT would upcast bf16 to fp32).
            peft_model = PeftModel.from_pretrained(model, used[0].path, adapter_name=used[0].key,
                                                   autocast_adapter_dtype=False)
            for ref in used[1:]:
                peft_model.load_adapter(ref.path, adapter_name=ref.key, autocast_adapter_dtype=False)
            peft_model.to(device).eval()
            label = f"HF+PEFT mixed ({len(used)} adapters)"
            results.append(_timed(label, peft_model, requests, batch_size, new_tokens, pad_id, mixed=True))
            del peft_model
        del model
    return results
