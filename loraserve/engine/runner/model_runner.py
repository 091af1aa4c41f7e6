"""Turns a scheduled step into tensors, runs the model, samples. The only place requests meet tensors."""

from __future__ import annotations

import torch

from loraserve.engine.core.scheduler import ScheduledSeq
from loraserve.engine.core.sequence import Sequence
from loraserve.engine.lora.batch import LoraBatch
from loraserve.engine.lora.cache import AdapterCache
from loraserve.engine.lora.pool import LoraPool
from loraserve.engine.models.llama import BatchMeta, KVCache, Llama, PagedRows, PrefillMeta
from loraserve.engine.runner.decode_graphs import DecodeGraphs, DecodeInputs
from loraserve.engine.runner.sampling import apply_penalties, sample


class ModelRunner:
    def __init__(self, model: Llama, kv: KVCache, block_size: int, adapters: AdapterCache,
                 default_generator: torch.Generator, graphs: DecodeGraphs | None = None) -> None:
        self.model, self.kv, self.block_size, self.adapters = model, kv, block_size, adapters
        self.graphs = graphs
        self.device = model.device
        self.default_generator = default_generator
        self._generators: dict[int, torch.Generator] = {}  # seq_id -> its own, for seeded requests

    def forget(self, seq: Sequence) -> None:
        self._generators.pop(seq.seq_id, None)

    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Flat KV slots of token positions [start, end) of `seq`."""
        pos = torch.arange(start, end)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def adapter_slots(self, scheduled: list[ScheduledSeq]) -> dict[int, tuple[LoraPool, int]]:
        """seq_id -> (pool, slot) of each scheduled sequence that uses an adapter."""
        return {s.seq.seq_id: self.adapters.slot(s.seq.adapter_key) for s in scheduled
                if s.seq.adapter_key is not None}

    def prepare(self, scheduled: list[ScheduledSeq]) -> tuple[BatchMeta, list[ScheduledSeq]]:
        # Single-token rows first: they share one batched attention call. Among them, rows of one adapter
        # slot side by side: LoraBatch then runs a popular adapter's rows as one in-place GEMM pair.
        lora = self.adapter_slots(scheduled)
        decodes = sorted((s for s in scheduled if s.num_new == 1),
                         key=lambda s: (lora[s.seq.seq_id][0].rank, lora[s.seq.seq_id][1])
                         if s.seq.seq_id in lora else (1 << 30, 0))
        order = decodes + [s for s in scheduled if s.num_new != 1]
        nd = sum(1 for s in order if s.num_new == 1)
        paged_rows = self.model.paged_attention is not None  # the kernel takes every row, prefills too
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        prefills: list[PrefillMeta] = []
        logits_rows: list[int] = []
        row_slots: list[tuple[LoraPool, int] | None] = []
        for s in order:
            seq, start = s.seq, s.seq.num_computed
            end = start + s.num_new
            row = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.append(torch.arange(start, end))
            slots.append(self._slots(seq, start, end))
            if s.num_new != 1 and not paged_rows:
                q_pos = torch.arange(start, end).unsqueeze(1)  # [n, 1]
                mask = torch.arange(end).unsqueeze(0) <= q_pos  # [n, ctx]
                prefills.append(PrefillMeta(row, s.num_new, self._slots(seq, 0, end).to(self.device),
                                            mask.to(self.device)))
            if s.samples:
                logits_rows.append(row + s.num_new - 1)
            row_slots.extend([lora.get(seq.seq_id)] * s.num_new)
        decode_gather = decode_mask = paged = None
        row_positions = torch.cat(positions)
        if paged_rows:  # rows attend by length: position + 1 (causal within a prefill chunk)
            lens_t = row_positions + 1
            tables = self._block_tables([s.seq for s in order], int(lens_t.max()))  # [S, W], a row a sequence
            per_row = torch.repeat_interleave(torch.arange(len(order)), torch.tensor([s.num_new for s in order]))
            paged = PagedRows(tables[per_row].to(self.device), lens_t.to(self.device), self.block_size)
        elif nd:
            seqs = [s.seq for s in order[:nd]]
            lmax = max(seq.num_computed + 1 for seq in seqs)  # context lengths, the new token included
            gather, valid = self._decode_gather(seqs, lmax)  # [Bd, Lmax]
            decode_gather = gather.to(self.device)
            decode_mask = valid.view(nd, 1, 1, lmax).to(self.device)
        meta = BatchMeta(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=row_positions.to(self.device),
            slot_mapping=torch.cat(slots).to(self.device),
            num_decode=nd,
            decode_gather=decode_gather,
            decode_mask=decode_mask,
            prefills=prefills,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=self.device),
            lora=LoraBatch.build(row_slots, self.device),
            paged=paged,
        )
        return meta, order

    def _block_tables(self, seqs: list[Sequence], length: int) -> torch.Tensor:
        """[n, blocks] int64: each sequence's first ceil(length / block_size) block ids, zero-padded."""
        width = -(-length // self.block_size)
        rows = [seq.block_table[:width] for seq in seqs]
        return torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.long)

    def _decode_gather(self, seqs: list[Sequence], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat KV slots of each sequence's context, [n, length], and which of them are real."""
        bs = self.block_size
        tables = self._block_tables(seqs, length)
        pos = torch.arange(length)
        gather = tables[:, pos // bs] * bs + pos % bs
        valid = pos.unsqueeze(0) < torch.tensor([seq.num_computed + 1 for seq in seqs]).unsqueeze(1)
        return torch.where(valid, gather, self.kv.scratch_slot), valid

    def decode_inputs(self, scheduled: list[ScheduledSeq], batch: int, length: int,
                      lora: dict[int, tuple[LoraPool, int]]) -> DecodeInputs:
        """A pure decode step padded to [batch] rows and [length] context positions (for a CUDA graph);
        `lora` is `adapter_slots(scheduled)`."""
        seqs = [s.seq for s in scheduled]
        n, scratch = len(seqs), self.kv.scratch_slot
        input_ids = torch.zeros(batch, dtype=torch.long)
        input_ids[:n] = torch.tensor([seq.token_ids[seq.num_computed] for seq in seqs])
        positions = torch.zeros(batch, dtype=torch.long)
        positions[:n] = torch.tensor([seq.num_computed for seq in seqs])
        gather = torch.full((batch, length), scratch, dtype=torch.long)
        mask = torch.zeros(batch, length, dtype=torch.bool)
        gather[:n], mask[:n] = self._decode_gather(seqs, length)
        mask[n:, 0] = True  # padding rows attend to the scratch slot alone (an all-masked row would be NaN)
        slot_mapping = torch.full((batch,), scratch, dtype=torch.long)
        slot_mapping[:n] = gather[:n].gather(1, positions[:n].unsqueeze(1)).squeeze(1)  # the new token's slot
        pools = _by_rank(lora)
        lora_slots = []
        for pool in pools:
            idx = torch.full((batch,), pool.zero_slot, dtype=torch.long)
            for i, seq in enumerate(seqs):
                ps = lora.get(seq.seq_id)
                if ps is not None and ps[0] is pool:
                    idx[i] = ps[1]
            lora_slots.append(idx)
        return DecodeInputs(input_ids, positions, slot_mapping, gather, mask, pools, lora_slots)

    def _forward(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, list[ScheduledSeq]]:
        """Logits [S, V] of the sampling rows, in the returned order of the sequences."""
        if self.graphs is not None and all(s.num_new == 1 and s.samples for s in scheduled):
            lora = self.adapter_slots(scheduled)
            ctx = max(s.seq.num_computed + 1 for s in scheduled)
            shape = self.graphs.shape_for(len(scheduled), ctx, _by_rank(lora))
            if shape is not None:
                logits = self.graphs.run(self.decode_inputs(scheduled, *shape, lora))
                return logits[:len(scheduled)], scheduled
        meta, order = self.prepare(scheduled)
        return self.model.forward(meta, self.kv), order

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> dict[int, int]:
        """Compute one step; returns seq_id -> sampled token for the sequences that sample."""
        logits, order = self._forward(scheduled)  # [S, V]
        sampling = [s.seq for s in order if s.samples]
        if not sampling:
            return {}
        params = [seq.params for seq in sampling]
        if any(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty for p in params):
            logits = apply_penalties(logits, params, [s.prompt_ids for s in sampling],
                                     [s.output_ids for s in sampling])
        generators = [self._generator(seq) for seq in sampling]
        tokens = sample(logits, params, generators)
        return {seq.seq_id: tok for seq, tok in zip(sampling, tokens, strict=True)}

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.default_generator
        g = self._generators.get(seq.seq_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seq.params.seed)
            self._generators[seq.seq_id] = g
        return g


def _by_rank(lora: dict[int, tuple[LoraPool, int]]) -> list[LoraPool]:
    """The distinct pools of a step's adapters, in rank order (a CUDA graph is keyed by them)."""
    return sorted({id(pool): pool for pool, _ in lora.values()}.values(), key=lambda pool: pool.rank)
