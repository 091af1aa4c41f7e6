"""The benchmark's workload: random PEFT adapters on disk, an S-LoRA-style request stream, and the driver.

Adapters: `adapters` distinct random weight sets are written as real PEFT folders; `registered` folders
exist in all, the ones past the distinct sets hard-linking their weights file. The engine keys its
caches by adapter key, so 1000 registered adapters behave as 1000 different adapters (each is loaded,
parsed and copied into a slot on its own) while the disk holds only `adapters` weight files.

Requests draw their adapter from the registered ones by popularity (power law as in S-LoRA, or
uniform); every request has a `prompt_len`-token random prompt and generates exactly `output_len`
tokens (`ignore_eos`), so every run does the same work.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.config import ModelConfig, module_name
from loraserve.engine.llm_engine import LLMEngine, StepOutput
from loraserve.tools.bench.figures import StreamTiming, stream_figures
from loraserve.types import LORA_TARGETS, AdapterRef, Backend, FinishReason, SamplingParams

# Random prompt ids start here: low ids are the specials of most vocabularies (<s>, <|im_start|>, ...).
_FIRST_PROMPT_ID = 100


class Popularity(enum.Enum):
    POWERLAW = "powerlaw"  # adapter k (0-based) drawn with weight (k + 1) ** -alpha, as S-LoRA's workloads
    UNIFORM = "uniform"


@dataclass(frozen=True)
class WorkloadSpec:
    adapters: int = 16  # distinct random weight sets
    registered: int = 16  # adapter folders (keys) requests draw from; >= adapters
    rank: int = 16
    targets: tuple[str, ...] = LORA_TARGETS
    popularity: Popularity = Popularity.POWERLAW
    alpha: float = 1.0
    no_adapter_fraction: float = 0.0
    requests: int = 32
    concurrency: int = 32  # closed loop: this many requests in flight; also the HF baseline's batch
    rate: float | None = None  # open loop: Poisson arrivals per second instead of a closed loop
    prompt_len: int = 128
    # The first tokens of every prompt are the same (a system prompt): what prefix caching can reuse.
    shared_prefix: int = 0
    output_len: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("adapters", "rank", "requests", "concurrency", "prompt_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 <= self.shared_prefix <= self.prompt_len:
            raise ValueError("shared_prefix must be in [0, prompt_len]")
        if self.registered < self.adapters:
            raise ValueError("registered must be >= adapters (the extra ones reuse their weights)")
        if not self.targets or any(t not in LORA_TARGETS for t in self.targets):
            raise ValueError(f"targets must be a non-empty subset of {', '.join(LORA_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError("targets must not repeat")
        if self.alpha < 0:
            raise ValueError("alpha must be >= 0")
        if not 0.0 <= self.no_adapter_fraction <= 1.0:
            raise ValueError("no_adapter_fraction must be in [0, 1]")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError("rate must be a positive number of requests per second")


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int]
    adapter: AdapterRef | None
    arrival_s: float = 0.0  # open loop: seconds after the run starts


# -- adapters on disk ---------------------------------------------------------------------------------
def _random_lora(cfg: ModelConfig, spec: WorkloadSpec, gen: torch.Generator,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    shapes = cfg.lora_shapes()
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(cfg.num_layers):
        for target in spec.targets:
            fan_in, fan_out = shapes[target]
            name = f"base_model.model.{module_name(layer, target)}"
            # B is not zero (a fresh PEFT init would be): the delta must really change the output.
            tensors[f"{name}.lora_A.weight"] = (torch.randn(spec.rank, fan_in, generator=gen)
                                                / math.sqrt(fan_in)).to(dtype)
            tensors[f"{name}.lora_B.weight"] = (torch.randn(fan_out, spec.rank, generator=gen)
                                                * 0.02).to(dtype)
    return tensors


def write_adapters(root: Path, cfg: ModelConfig, spec: WorkloadSpec, dtype: torch.dtype) -> list[AdapterRef]:
    """`spec.registered` PEFT folders under `root`; returns their refs, most popular first."""
    conf = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": spec.rank, "lora_alpha": 2 * spec.rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(spec.targets), "use_rslora": False, "fan_in_fan_out": False,
        "inference_mode": True,
    }
    gen = torch.Generator().manual_seed(spec.seed)
    refs = []
    for j in range(spec.registered):
        folder = root / f"adapter-{j:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps(conf))
        weights = folder / "adapter_model.safetensors"
        if j < spec.adapters:
            save_file(_random_lora(cfg, spec, gen, dtype), str(weights))
        else:
            source = root / f"adapter-{j % spec.adapters:04d}" / "adapter_model.safetensors"
            try:
                os.link(source, weights)
            except OSError:  # a file system without hard links
                weights.symlink_to(source)
        refs.append(AdapterRef(f"bench-{j:04d}", str(folder)))
    return refs


# -- the request stream -------------------------------------------------------------------------------
def popularity_weights(spec: WorkloadSpec) -> np.ndarray:
    if spec.popularity is Popularity.UNIFORM:
        w = np.ones(spec.registered)
    else:
        w = np.arange(1, spec.registered + 1, dtype=np.float64) ** -spec.alpha
    probs: np.ndarray = w / w.sum()
    return probs


def make_requests(spec: WorkloadSpec, vocab_size: int, refs: list[AdapterRef]) -> list[BenchRequest]:
    if len(refs) != spec.registered:
        raise ValueError("one ref per registered adapter expected")
    rng = np.random.default_rng(spec.seed)
    low = min(_FIRST_PROMPT_ID, vocab_size - 1)
    prompts = rng.integers(low, vocab_size, size=(spec.requests, spec.prompt_len))
    prompts[:, :spec.shared_prefix] = prompts[0, :spec.shared_prefix]
    picks = rng.choice(spec.registered, size=spec.requests, p=popularity_weights(spec))
    bare = rng.random(spec.requests) < spec.no_adapter_fraction
    arrivals = (np.cumsum(rng.exponential(1.0 / spec.rate, size=spec.requests)) if spec.rate
                else np.zeros(spec.requests))
    return [BenchRequest([int(t) for t in prompts[i]], None if bare[i] else refs[int(picks[i])],
                         float(arrivals[i]))
            for i in range(spec.requests)]


def without_adapters(requests: list[BenchRequest]) -> list[BenchRequest]:
    return [BenchRequest(r.prompt, None, r.arrival_s) for r in requests]


# -- the driver ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestResult:
    submitted: float
    first: float | None  # first token event
    last: float | None  # last token event
    num_output: int
    error: str | None
    prompt_tokens: int = 0


@dataclass
class StepCounts:
    steps: int = 0
    busy_s: float = 0.0  # time inside step(): the rest of the wall time the engine waited for work
    decode_steps: int = 0  # steps of single-token decodes only, the ones the linear ceiling describes
    decode_tokens: int = 0
    decode_s: float = 0.0
    peak: dict[str, float] = field(default_factory=dict)  # max of each engine gauge after any step


@contextmanager
def count_steps(engine: LLMEngine) -> Iterator[StepCounts]:
    """Counts the engine's steps by shadowing `step` on the instance (the step thread looks it up on
    every iteration), so the bench learns batch sizes and step times without the engine knowing."""
    counts = StepCounts()
    inner = engine.step
    sched = engine.scheduler

    def step() -> list[StepOutput]:
        # Runs on the step thread, so reading the scheduler here is safe. With nobody waiting and every
        # running sequence one token short, the step can only be a batch of decodes.
        decode_only = not sched.waiting and all(s.num_uncomputed == 1 for s in sched.running)
        t = time.perf_counter()
        out = inner()
        dt = time.perf_counter() - t
        counts.steps += 1
        counts.busy_s += dt
        # Sampled here, on the step thread, after every step: a consumer reading gauges per token event
        # can lag the engine by whole requests (they finish before their events are read).
        for key, value in engine.stats().items():
            counts.peak[key] = max(counts.peak.get(key, value), value)
        if decode_only and out:
            counts.decode_steps += 1
            counts.decode_tokens += sum(1 for o in out if o.token is not None)
            counts.decode_s += dt
        return out

    vars(engine)["step"] = step
    try:
        yield counts
    finally:
        vars(engine).pop("step", None)


@dataclass
class RunResult:
    label: str
    wall_s: float
    results: list[RequestResult]
    steps: StepCounts
    peak: dict[str, float] = field(default_factory=dict)  # max of each engine gauge seen during the run
    final: dict[str, float] = field(default_factory=dict)  # engine gauges when the run ended

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.results if r.error is None and r.first is not None and r.last is not None]
        done = [StreamTiming(r.prompt_tokens, r.first - r.submitted, r.last - r.first, r.num_output)
                for r in ok if r.first is not None and r.last is not None]
        s = self.steps
        return {
            **stream_figures(done, self.wall_s, output_tokens=sum(r.num_output for r in self.results),
                             prompt_tokens=sum(r.prompt_tokens for r in self.results),
                             failed=len(self.results) - len(ok)),
            "steps": s.steps,
            "engine_busy": s.busy_s / self.wall_s if s.steps else None,  # no steps counted: not known
            "mean_step_ms": s.busy_s * 1e3 / s.steps if s.steps else None,
            "decode_steps": s.decode_steps,
            "mean_batch": s.decode_tokens / s.decode_steps if s.decode_steps else None,  # decode steps
            "decode_step_ms": s.decode_s * 1e3 / s.decode_steps if s.decode_steps else None,
            "peak": dict(self.peak),
            "final": dict(self.final),
        }


async def drive(backend: Backend, requests: list[BenchRequest], spec: WorkloadSpec, label: str,
                max_tokens: int | None = None) -> RunResult:
    """Run `requests` through the engine: closed loop of `spec.concurrency`, or open loop at `spec.rate`.
    Steps are counted where the engine runs in this process; through an engine process (EngineClient)
    only what its streams and gauges show is."""
    params = SamplingParams(max_tokens=max_tokens or spec.output_len, temperature=0.0, ignore_eos=True)

    async def one(i: int, req: BenchRequest) -> RequestResult:
        submitted = time.perf_counter()
        first = last = None
        n, error = 0, None
        # The phase is the prefix-cache scope: warm-up and earlier phases must not speed up this one.
        async for ev in backend.generate(f"{label}-{i}", req.prompt, params, req.adapter, cache_salt=label):
            now = time.perf_counter()
            if ev.completion_tokens > n:
                first = now if first is None else first
                last, n = now, ev.completion_tokens
            if ev.finish_reason not in (None, FinishReason.LENGTH):
                error = ev.error or f"finished with {ev.finish_reason}"
        return RequestResult(submitted, first, last, n, error, len(req.prompt))

    results: list[RequestResult] = []
    counting: AbstractContextManager[StepCounts] = (
        count_steps(backend.engine) if isinstance(backend, AsyncEngine) else nullcontext(StepCounts()))
    with counting as counts:
        start = time.perf_counter()
        if spec.rate is None:
            todo = iter(enumerate(requests))  # shared by the workers: each takes the next request when free

            async def worker() -> None:
                for i, req in todo:
                    results.append(await one(i, req))

            await asyncio.gather(*(worker() for _ in range(min(spec.concurrency, len(requests)))))
        else:
            tasks = []
            for i, req in enumerate(requests):
                delay = start + req.arrival_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i, req)))
            results = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - start
        final = await _settled(backend)
    return RunResult(label, wall, results, counts, dict(counts.peak), final)


async def _settled(backend: Backend, timeout_s: float = 2.0) -> dict[str, float]:
    # The step thread refreshes its gauges just after it emits a step's events, so the last event can
    # arrive before the gauges show the finished requests gone.
    deadline = time.perf_counter() + timeout_s
    stats = backend.stats()
    while stats.get("running", 0) and time.perf_counter() < deadline:
        await asyncio.sleep(0.001)
        stats = backend.stats()
    return stats
