"""The synchronous engine: add requests, `step()` them together, read tokens out. Knows nothing of HTTP."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from loraserve.engine.config import EngineConfig, ModelConfig, physical_memory
from loraserve.engine.core.block_manager import BlockManager
from loraserve.engine.core.scheduler import Scheduler
from loraserve.engine.core.sequence import Sequence, TokenScores
from loraserve.engine.lora.cache import AdapterCache
from loraserve.engine.lora.sgmv import SgmvLora
from loraserve.engine.models.decoder import Decoder
from loraserve.engine.models.step import KVCache
from loraserve.engine.ops.select import select_ops
from loraserve.engine.runner.decode_graphs import DecodeGraphs
from loraserve.engine.runner.model_runner import ModelRunner
from loraserve.engine.thread_governor import AdaptiveThreads
from loraserve.engine.weights.hf import StateDict
from loraserve.types import AdapterRef, FinishReason, QueueFull, SamplingParams, check_context_window

# The CPU's default KV budget: 1 GiB (~22k tokens of SmolLM2 in float32), or 8192 tokens where a token's
# K/V is larger (a 7B's is 1 MiB in float32: 1 GiB held 1k tokens, and 16 requests of 160 tokens were
# preempted and recomputed, BENCHMARKS.md); never over a quarter of the machine's memory. The cache is
# allocated and zeroed at start, so the memory a server takes is known when it starts, not under load.
_CPU_KV_BYTES = 1 << 30
_CPU_KV_TOKENS = 8192
_CPU_KV_MEMORY_SHARE = 4


def cpu_kv_budget(per_token: int, want: int, memory: int) -> int:
    """Default KV bytes on the CPU: `want` (every sequence's full window) within the caps above.
    per_token: one token's K/V bytes, all layers; memory: the machine's physical memory in bytes."""
    cap = min(max(_CPU_KV_BYTES, _CPU_KV_TOKENS * per_token), memory // _CPU_KV_MEMORY_SHARE)
    return min(want, cap)


@dataclass
class StepOutput:
    seq: Sequence
    token: int | None  # None when the sequence finished without a new token (error, abort, max_tokens 0)
    finished: bool
    logprobs: TokenScores | None = None  # the token's, when params.logprobs asks
    # The whole prompt's (tokens 1, 2, ...), once: with the first token, or when max_tokens 0 ends the
    # request after its prefill. Set when params.prompt_logprobs asks.
    prompt_scores: list[TokenScores] | None = None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(ecfg: EngineConfig, device: torch.device) -> torch.dtype:
    """The compute dtype: activations, KV cache, float weights."""
    if ecfg.dtype == "gguf":  # quantized weights, float32 activations
        return torch.float32
    if ecfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[ecfg.dtype]


def resolve_kv_dtype(ecfg: EngineConfig, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type beside the compute dtype `dtype` (EngineConfig.kv_dtype)."""
    if ecfg.kv_dtype == "auto":
        return torch.float16 if ecfg.dtype == "gguf" else dtype
    return _DTYPES[ecfg.kv_dtype]


def resolve_lora_dtype(ecfg: EngineConfig, dtype: torch.dtype, kernel: bool) -> torch.dtype:
    """The adapter slots' element type beside the compute dtype `dtype` (EngineConfig.lora_dtype); `kernel`:
    the CPU LoRA kernel applies them, the one backend that reads another type than the model's."""
    if ecfg.lora_dtype == "auto":
        # Beside quantized weights a decode step's LoRA is bound by reading the slots, and fp16's rounding
        # (2^-11) is far under the 4- or 8-bit base's
        return torch.float16 if ecfg.dtype == "gguf" and kernel else dtype
    lora_dtype = _DTYPES[ecfg.lora_dtype]
    if lora_dtype != dtype and not kernel:
        raise ValueError(f"lora_dtype {ecfg.lora_dtype} needs the CPU LoRA kernel: device cpu, dtype float32 "
                         f"or gguf, native_kernels on and a C compiler")
    return lora_dtype


class LLMEngine:
    def __init__(self, cfg: ModelConfig, state: StateDict, ecfg: EngineConfig | None = None,
                 context_window: int | None = None) -> None:
        self.cfg = cfg
        self.ecfg = ecfg = ecfg or EngineConfig()
        self.device = torch.device(ecfg.device)
        self.dtype = resolve_dtype(ecfg, self.device)
        self.kv_dtype = resolve_kv_dtype(ecfg, self.dtype)
        self.ops = select_ops(cfg, self.dtype, self.device, ecfg.native_kernels)
        self.model = Decoder(cfg, state, self.dtype, self.device, self.ops)
        self.context_window = min(context_window or cfg.max_position_embeddings, cfg.max_position_embeddings)
        bs = ecfg.block_size
        num_blocks = self._num_kv_blocks()
        self.kv = KVCache(cfg, num_blocks * bs, self.kv_dtype, self.ops.zeros)
        self.blocks = BlockManager(num_blocks, bs, ecfg.prefix_caching)
        lora_dtype = resolve_lora_dtype(ecfg, self.dtype, isinstance(self.ops.lora, SgmvLora))
        self.adapters = AdapterCache(cfg, ecfg, lora_dtype, self.device, self.ops.lora)
        self.scheduler = Scheduler(self.blocks, ecfg.max_num_seqs, ecfg.max_num_batched_tokens,
                                   gate=self.adapters, max_waiting=ecfg.max_queue)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(ecfg.seed)
        # CUDA graphs replay pure decode steps (runner/decode_graphs.py); they need a GPU.
        graphs = (DecodeGraphs(self.model, self.kv, ecfg.max_num_seqs)
                  if ecfg.cuda_graphs and self.device.type == "cuda" else None)
        self.runner = ModelRunner(self.model, self.kv, bs, self.adapters, gen, graphs)
        self.eos_ids = frozenset(cfg.eos_token_ids)
        self._by_request: dict[str, Sequence] = {}
        # The last step scheduled nothing although work is waiting (its adapters are still loading):
        # callers should wait for the loader rather than step again at once.
        self.stalled = False
        # CPU: fewer threads while other work waits for the cores (thread_governor.py)
        self.threads = (AdaptiveThreads(ecfg.threads, torch.set_num_threads)
                        if ecfg.adaptive_threads and self.device.type == "cpu" else None)

    def _num_kv_blocks(self) -> int:
        cfg, ecfg = self.cfg, self.ecfg
        per_token = 2 * cfg.num_layers * cfg.kv_size * self.kv_dtype.itemsize
        # Never less than one full context window: a request that fits the window must be able to run alone.
        floor = -(-self.context_window // ecfg.block_size) + 1
        if ecfg.kv_cache_bytes:
            budget = ecfg.kv_cache_bytes
        else:
            want = per_token * ecfg.max_num_seqs * self.context_window
            if self.device.type == "cuda":
                cap = int(torch.cuda.mem_get_info(self.device)[0] * 0.5)
                budget = min(want, cap)
            else:
                budget = cpu_kv_budget(per_token, want, physical_memory())
        return max(floor, budget // (per_token * ecfg.block_size))

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    adapter: AdapterRef | None = None, cache_salt: str | None = None) -> Sequence:
        """`cache_salt` scopes prefix caching: only requests with the same salt share cached K/V."""
        check_context_window(len(prompt_ids), params.max_tokens, self.context_window)
        if request_id in self._by_request:
            raise ValueError(f"duplicate request id {request_id}")
        if self.scheduler.is_full():
            raise QueueFull()
        if adapter is not None:
            self.adapters.register(adapter)
        seq = Sequence(request_id, list(prompt_ids), params, adapter.key if adapter else None, cache_salt)
        self._by_request[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        seq = self._by_request.pop(request_id, None)
        if seq is not None:
            self._finish(seq, FinishReason.ABORT)
        return seq

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        self.runner.forget(seq)
        self._by_request.pop(seq.request_id, None)

    # -- the step ---------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        sched = self.scheduler.schedule()
        self.stalled = not sched.scheduled and not sched.failed
        outputs: list[StepOutput] = []
        for seq in sched.failed:
            self._finish(seq, FinishReason.ERROR)
            outputs.append(StepOutput(seq, None, True))
        if not sched.scheduled:
            return outputs
        if self.threads is not None:
            self.threads.tick()
        result = self.runner.run(sched.scheduled)
        for s in sched.scheduled:
            s.seq.num_computed += s.num_new
            self.blocks.cache_computed(s.seq)
            if s.seq.prompt_scores is not None:
                s.seq.prompt_scores.extend(result.prompt_scores.get(s.seq.seq_id, ()))
        for s in sched.scheduled:
            seq = s.seq
            tok = result.tokens.get(seq.seq_id)
            if tok is None:
                if seq.params.max_tokens == 0 and seq.num_computed == seq.num_tokens:
                    self._finish(seq, FinishReason.LENGTH)  # the prompt is scored: nothing to generate
                    outputs.append(StepOutput(seq, None, True, prompt_scores=seq.prompt_scores))
                continue
            seq.append(tok)
            reason = self._stop_reason(seq, tok)
            if reason is not None:
                self._finish(seq, reason)
            first = seq.num_output == 1  # preemption recomputes, but never samples a token twice
            outputs.append(StepOutput(seq, tok, reason is not None, result.logprobs.get(seq.seq_id),
                                      seq.prompt_scores if first else None))
        return outputs

    def _stop_reason(self, seq: Sequence, tok: int) -> FinishReason | None:
        p = seq.params
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            return FinishReason.STOP
        if seq.num_output >= p.max_tokens or seq.num_tokens >= self.context_window:
            return FinishReason.LENGTH
        return None

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: list[AdapterRef | None] | None = None) -> list[list[int]]:
        """Offline batch generation (tests, benchmarks): output token ids per prompt."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        alist = adapters or [None] * len(prompts)
        seqs = [self.add_request(f"offline-{id(prompts)}-{i}", p, sp, a)
                for i, (p, sp, a) in enumerate(zip(prompts, plist, alist, strict=True))]
        self.drain()
        return [s.output_ids for s in seqs]

    def drain(self) -> None:
        """Offline use: step until every request added has finished (read them from their Sequences)."""
        while self.has_work():
            self.step()
            if self.stalled:
                time.sleep(0.001)  # lets the adapter loader have the GIL

    def stats(self) -> dict[str, float]:
        return {
            "queue_depth": float(len(self.scheduler.waiting)),
            "running": float(len(self.scheduler.running)),
            "kv_blocks_used": float(self.blocks.num_used),
            "kv_blocks_free": float(self.blocks.num_free),
            "kv_blocks_total": float(self.blocks.num_blocks),
            "kv_blocks_cached": float(self.blocks.num_cached),
            "prefix_cache_hit_tokens": float(self.scheduler.prefix_hit_tokens),
            **self.adapters.stats(),
            **({"compute_threads": float(self.threads.governor.threads)} if self.threads is not None else {}),
        }
