"""The llama.cpp reference point: the same GGUF file, threads, prompts and output lengths, run by llama.cpp
through llama-cpp-python (`pip install 'loraserve[bench]'`: an optional extra, compiled from source).

llama.cpp runs one sequence at a time here, greedy, EOS ignored, with the adapters given as GGUF LoRA
files written from the very PEFT folders our engine reads (`gguf_lora.py`). Three workloads:
- no adapter, one request after another (single stream);
- the workload's most used adapter on every request (single stream with a LoRA);
- each request with its own adapter, one at a time: the only way llama.cpp serves them, since its server
  never batches requests whose LoRA sets differ. The adapters are loaded before timing (as its server
  takes them all at start) and switched between requests, which is part of what is timed.
Every adapter is applied at scale 1, its file's alpha / rank doing the scaling as PEFT's does.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.util
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loraserve.engine.config import ModelConfig
from loraserve.engine.weights.gguf_meta import GGUFFile, gguf_field
from loraserve.tools.bench.figures import StreamTiming, stream_figures
from loraserve.tools.bench.gguf_lora import write_gguf_lora
from loraserve.tools.bench.workload import BenchRequest
from loraserve.types import AdapterRef

INSTALL_HINT = ("pip install 'loraserve[bench]' (llama-cpp-python, compiled from source: "
                "about 10 minutes on 2 cores)")


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class Workload(enum.Enum):
    """The JSON key of each llama.cpp run."""

    NO_ADAPTER = "llamacpp_no_adapter"
    ONE_ADAPTER = "llamacpp_one_adapter"
    DISTINCT = "llamacpp_distinct"


@dataclass(frozen=True)
class LlamaCppResult:
    workload: Workload
    label: str
    timings: tuple[StreamTiming, ...]
    wall_s: float
    threads: int

    def summary(self) -> dict[str, Any]:
        t = self.timings
        return {**stream_figures(t, self.wall_s, output_tokens=sum(x.output_tokens for x in t),
                                 prompt_tokens=sum(x.prompt_tokens for x in t), failed=0),
                "threads": self.threads}


def check_model_file(path: Path, cfg: ModelConfig) -> str:
    """The file's general.architecture, after checking its shape is the engine's model's: llama.cpp
    would run a different model without a word."""
    reader = GGUFFile(str(path))

    def field(key: str) -> Any:
        if (value := gguf_field(reader, key)) is None:
            raise ValueError(f"{path}: not a model GGUF (no {key})")
        return value

    arch = str(field("general.architecture"))
    want = {"block_count": cfg.num_layers, "embedding_length": cfg.hidden_size,
            "feed_forward_length": cfg.intermediate_size, "attention.head_count": cfg.num_heads,
            "attention.head_count_kv": cfg.num_kv_heads}
    have = {key: field(f"{arch}.{key}") for key in want}
    if have != want:
        raise ValueError(f"{path} is not the benchmarked model: {have} against {want}")
    return arch


class LlamaCppRunner:
    """One llama.cpp context over the model, with every adapter the workload uses loaded once.
    `options` go to `llama_cpp.Llama` as they are (the tests ask for a float32 KV cache); `logits_all` keeps
    every evaluated position's logits (the perplexity tool), not only the last one's."""

    def __init__(self, model_path: Path, n_ctx: int, threads: int, n_batch: int = 512,
                 logits_all: bool = False, **options: Any) -> None:
        import llama_cpp

        self.lib: Any = llama_cpp
        self.llm: Any = llama_cpp.Llama(
            model_path=str(model_path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
            n_batch=n_batch, logits_all=logits_all, verbose=False, **options)
        self.n_vocab = int(self.llm.n_vocab())
        self.adapters: dict[Path, Any] = {}

    def load_adapter(self, path: Path) -> None:
        if path not in self.adapters:
            handle = self.lib.llama_adapter_lora_init(self.llm.model, str(path).encode())
            if not handle:
                raise RuntimeError(f"llama.cpp could not load the LoRA adapter {path}")
            self.adapters[path] = handle  # freed with the model (llama.h)

    def use(self, path: Path | None) -> None:
        """Run the next requests with this adapter (None: none), as llama-server switches per request."""
        lib = self.lib
        if not hasattr(lib, "llama_set_adapters_lora"):
            raise RuntimeError(f"llama-cpp-python {lib.__version__} is older than this bench's LoRA calls "
                               f"(llama_set_adapters_lora); {INSTALL_HINT}")
        handles = [] if path is None else [self.adapters[path]]
        array = (lib.llama_adapter_lora_p_ctypes * len(handles))(*handles)
        scales = (ctypes.c_float * len(handles))(*[1.0] * len(handles))
        if rc := lib.llama_set_adapters_lora(self.llm.ctx, array, len(handles), scales):
            raise RuntimeError(f"llama.cpp refused the LoRA adapter {path} ({rc})")

    def last_logits(self) -> np.ndarray:
        """The logits of the last token evaluated (a view of llama.cpp's buffer)."""
        ptr = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        logits: np.ndarray = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return logits

    def next_token(self, tokens: list[int]) -> int:
        """Evaluate `tokens` after what is in the context; the greedy next token."""
        self.llm.eval(tokens)
        return int(self.last_logits().argmax())

    def generate(self, prompt: list[int], new_tokens: int) -> StreamTiming:
        self.llm.reset()
        start = time.perf_counter()
        token = self.next_token(prompt)
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = self.next_token([token])
        return StreamTiming(len(prompt), first - start, time.perf_counter() - first, new_tokens)

    def close(self) -> None:
        self.llm.close()


def gguf_adapters(refs: list[AdapterRef], cfg: ModelConfig, arch: str, out: Path) -> dict[str, Path]:
    """A GGUF LoRA file per distinct weights file (registered adapters past the distinct ones hard-link
    theirs: llama.cpp loads each set once), keyed by adapter key."""
    out.mkdir(parents=True, exist_ok=True)
    by_file: dict[tuple[int, int], Path] = {}
    files: dict[str, Path] = {}
    for ref in refs:
        st = os.stat(Path(ref.path) / "adapter_model.safetensors")
        ident = (st.st_dev, st.st_ino)
        if ident not in by_file:
            by_file[ident] = write_gguf_lora(Path(ref.path), out / f"{ref.key}.gguf", cfg, arch)
        files[ref.key] = by_file[ident]
    return files


def run_llamacpp(model_path: Path, cfg: ModelConfig, requests: list[BenchRequest], new_tokens: int,
                 threads: int, workdir: Path) -> list[LlamaCppResult]:
    """The three workloads on `requests` (adapter workloads only if some request has an adapter)."""
    arch = check_model_file(model_path, cfg)
    used = list({r.adapter.key: r.adapter for r in requests if r.adapter is not None}.values())
    files = gguf_adapters(used, cfg, arch, workdir / "gguf-lora")
    n_ctx = max(len(r.prompt) for r in requests) + new_tokens
    results = []
    runner = LlamaCppRunner(model_path, n_ctx, threads)
    try:
        for file in files.values():
            runner.load_adapter(file)
        # Not counted: the first evaluations (and the first with an adapter) build and size graphs.
        warm: list[Path | None] = [None, *list(files.values())[:1]]
        for adapter in warm:
            runner.use(adapter)
            runner.generate(requests[0].prompt[:8], 2)

        def timed(workload: Workload, label: str, adapters: list[Path | None]) -> None:
            timings = []
            start = time.perf_counter()
            for req, path in zip(requests, adapters, strict=True):
                runner.use(path)
                timings.append(runner.generate(req.prompt, new_tokens))
            results.append(LlamaCppResult(workload, label, tuple(timings), time.perf_counter() - start,
                                          threads))

        timed(Workload.NO_ADAPTER, "llama.cpp, no adapter", [None] * len(requests))
        if used:
            top, _ = Counter(r.adapter.key for r in requests if r.adapter).most_common(1)[0]
            timed(Workload.ONE_ADAPTER, "llama.cpp, one adapter", [files[top]] * len(requests))
            timed(Workload.DISTINCT, f"llama.cpp, own adapter each ({len(set(files.values()))} loaded)",
                  [files[r.adapter.key] if r.adapter else None for r in requests])
    finally:
        runner.close()
    return results
