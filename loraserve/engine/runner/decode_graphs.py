"""CUDA graphs for pure decode steps: one captured forward per (batch size, context length, LoRA pools).

On a GPU a decode step is a few hundred small kernels whose launches cost more CPU time than the GPU
spends running them (Llama-2-7B shapes at batch 32 on an H100: a 67 ms step for ~10 ms of GPU work;
with 10 adapters 191 ms). A CUDA graph replays the whole forward with one launch. Its shapes are fixed,
so a step is padded (`DecodeInputs`): the batch up to the next of `batch_sizes`, the context up to
256 * 2^k tokens. Padding rows write and read the KV cache's scratch slot and each LoRA pool's zero
slot, and LoRA goes through `StaticLora`. Graphs are captured on first use and share one memory pool;
steps with prefill chunks, adapters of rank buckets above 64, or shapes past the limits run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.engine.lora.pool import LoraPool
from loraserve.engine.lora.static import StaticLora
from loraserve.engine.models.decoder import Decoder
from loraserve.engine.models.step import BatchMeta, KVCache
from loraserve.engine.ops.attention import GatheredRows

CTX_QUANTUM = 256  # few graphs (one per doubling), at most 2x padding in decode attention
_MAX_GRAPHS = 64  # past this, unseen shapes run eagerly: each graph costs a capture and some memory
# Steps using a LoRA pool of a larger rank bucket run eagerly: `StaticLora` copies every row's A and B,
# which for rank 256 at Llama-2-7B shapes and batch 64 is ~3 GB of transient memory a step.
MAX_GRAPH_RANK = 64


def batch_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes: small powers of two, then multiples of 16 (as vLLM's capture sizes)."""
    sizes = {s for s in (1, 2, 4, 8, *range(16, max_batch, 16)) if s < max_batch}
    return sorted(sizes | {max_batch})


def graphable(pools: list[LoraPool]) -> bool:
    return all(pool.rank <= MAX_GRAPH_RANK for pool in pools)


def _key(shape: tuple[int, ...], pools: list[LoraPool]) -> tuple[int, ...]:
    return (*shape, *(id(pool) for pool in pools))  # pools live as long as the engine: ids are stable


def context_bucket(ctx: int) -> int:
    length = CTX_QUANTUM
    while length < ctx:
        length *= 2
    return length


@dataclass
class DecodeInputs:
    """One pure decode step padded to a static shape, on the host. Row i < n is sequence i's next token."""

    input_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    slot_mapping: torch.Tensor  # [B] padding rows: the KV scratch slot
    gather: torch.Tensor  # [B, L] flat KV slots of each row's context, padded with the scratch slot
    mask: torch.Tensor  # [B, L] bool; padding rows see only their first (scratch) column
    pools: list[LoraPool]  # the LoRA pools this step uses, by rank
    lora_slots: list[torch.Tensor]  # per pool: [B] each row's slot, the pool's zero slot if none

    def to_meta(self, device: torch.device) -> BatchMeta:
        b, length = self.gather.shape
        lora = StaticLora(self.pools, [s.to(device) for s in self.lora_slots]) if self.pools else None
        attention = GatheredRows(b, self.gather.to(device), self.mask.view(b, 1, 1, length).to(device), [])
        return BatchMeta(
            input_ids=self.input_ids.to(device), positions=self.positions.to(device),
            slot_mapping=self.slot_mapping.to(device), num_decode=b, attention=attention,
            logits_indices=torch.arange(b, device=device), lora=lora)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    meta: BatchMeta  # the static inputs, refilled in place before each replay
    gather: torch.Tensor  # meta.attention.decode_gather
    mask: torch.Tensor  # meta.attention.decode_mask
    logits: torch.Tensor  # [B, V] the static output


class DecodeGraphs:
    def __init__(self, model: Decoder, kv: KVCache, max_batch: int) -> None:
        self.model, self.kv = model, kv
        self.sizes = batch_sizes(max_batch)
        self._graphs: dict[tuple[int, ...], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def shape_for(self, n: int, ctx: int, pools: list[LoraPool]) -> tuple[int, int] | None:
        """(padded batch, padded context) of the graph that will run a decode step of n rows, whose
        longest context is ctx, using `pools`; None: the step runs eagerly (decided before its inputs
        are built)."""
        b = next((s for s in self.sizes if s >= n), None)
        if b is None or not graphable(pools):
            return None
        shape = (b, context_bucket(ctx))
        if _key(shape, pools) not in self._graphs and len(self._graphs) >= _MAX_GRAPHS:
            return None
        return shape

    def run(self, inputs: DecodeInputs) -> torch.Tensor:
        """The step's logits [B, V] (a static buffer: read before the next step); captures its graph
        the first time. `inputs` has a shape `shape_for` gave."""
        key = _key(inputs.gather.shape, inputs.pools)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture(inputs)
        m = g.meta
        for dst, src in ((m.input_ids, inputs.input_ids), (m.positions, inputs.positions),
                         (m.slot_mapping, inputs.slot_mapping), (g.gather, inputs.gather),
                         (g.mask, inputs.mask.view(g.mask.shape))):
            dst.copy_(src, non_blocking=True)
        if isinstance(m.lora, StaticLora):
            for dst, src in zip(m.lora.slots, inputs.lora_slots, strict=True):
                dst.copy_(src, non_blocking=True)
        g.graph.replay()
        return g.logits

    def _capture(self, inputs: DecodeInputs) -> _Graph:
        meta = inputs.to_meta(self.model.device)
        # Warm up on a side stream first (cuBLAS picks its kernels and workspaces outside the capture).
        # The warm-up computes this very step, so writing its K/V twice is harmless.
        side = torch.cuda.Stream(self.model.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            self.model.forward(meta, self.kv)
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.model.forward(meta, self.kv)
        plan = meta.attention
        assert (isinstance(plan, GatheredRows) and plan.decode_gather is not None
                and plan.decode_mask is not None)
        return _Graph(graph, meta, plan.decode_gather, plan.decode_mask, logits)
