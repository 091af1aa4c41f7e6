"""Turns a scheduled step into tensors, runs the model, samples. The only place requests meet tensors."""

from __future__ import annotations

import torch

from loraserve.engine.adapter_cache import AdapterCache
from loraserve.engine.lora import LoraPool
from loraserve.engine.lora_batch import LoraBatch
from loraserve.engine.model import BatchMeta, KVCache, Llama, PrefillMeta
from loraserve.engine.sampling import apply_penalties, sample
from loraserve.engine.scheduler import ScheduledSeq
from loraserve.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: Llama, kv: KVCache, block_size: int, adapters: AdapterCache,
                 default_generator: torch.Generator) -> None:
        self.model, self.kv, self.block_size, self.adapters = model, kv, block_size, adapters
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

    def prepare(self, scheduled: list[ScheduledSeq]) -> tuple[BatchMeta, list[ScheduledSeq]]:
        # Single-token rows first: they share one batched attention call.
        order = [s for s in scheduled if s.num_new == 1] + [s for s in scheduled if s.num_new != 1]
        nd = sum(1 for s in order if s.num_new == 1)
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
            if s.num_new != 1:
                q_pos = torch.arange(start, end).unsqueeze(1)  # [n, 1]
                mask = torch.arange(end).unsqueeze(0) <= q_pos  # [n, ctx]
                prefills.append(PrefillMeta(row, s.num_new, self._slots(seq, 0, end).to(self.device),
                                            mask.to(self.device)))
            if s.samples:
                logits_rows.append(row + s.num_new - 1)
            lora = self.adapters.slot(seq.adapter_key) if seq.adapter_key is not None else None
            row_slots.extend([lora] * s.num_new)
        decode_gather = decode_mask = None
        if nd:
            ctx = torch.tensor([s.seq.num_computed + 1 for s in order[:nd]])
            lmax = int(ctx.max())
            width = -(-lmax // self.block_size)
            tables = torch.zeros(nd, width, dtype=torch.long)  # [Bd, blocks]
            for i, s in enumerate(order[:nd]):
                bt = s.seq.block_table[:width]
                tables[i, :len(bt)] = torch.tensor(bt, dtype=torch.long)
            pos = torch.arange(lmax)
            decode_gather = tables[:, pos // self.block_size] * self.block_size + pos % self.block_size
            valid = pos.unsqueeze(0) < ctx.unsqueeze(1)  # [Bd, Lmax]
            decode_gather = torch.where(valid, decode_gather, decode_gather[:, :1]).to(self.device)
            decode_mask = valid.view(nd, 1, 1, lmax).to(self.device)
        meta = BatchMeta(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.cat(positions).to(self.device),
            slot_mapping=torch.cat(slots).to(self.device),
            num_decode=nd,
            decode_gather=decode_gather,
            decode_mask=decode_mask,
            prefills=prefills,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=self.device),
            lora=LoraBatch.build(row_slots, self.device),
        )
        return meta, order

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> dict[int, int]:
        """Compute one step; returns seq_id -> sampled token for the sequences that sample."""
        meta, order = self.prepare(scheduled)
        logits = self.model.forward(meta, self.kv)  # [S, V]
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
