"""Turns a scheduled step into tensors, runs the model, samples. The only place requests meet tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraserve.engine.core.scheduler import ScheduledSeq
from loraserve.engine.core.sequence import Sequence, TokenScores
from loraserve.engine.lora.batch import LoraBatch
from loraserve.engine.lora.cache import AdapterCache
from loraserve.engine.lora.pool import LoraPool
from loraserve.engine.models.decoder import Decoder
from loraserve.engine.models.step import BatchMeta, KVCache
from loraserve.engine.ops.attention import StepLayout, decode_gather
from loraserve.engine.runner.decode_graphs import DecodeGraphs, DecodeInputs
from loraserve.engine.runner.logprobs import LogitsRows, score, score_prompts
from loraserve.engine.runner.sampling import apply_penalties, sample


@dataclass
class StepResult:
    """What one step produced, per seq_id."""

    tokens: dict[int, int] = field(default_factory=dict)  # the sampled tokens
    logprobs: dict[int, TokenScores] = field(default_factory=dict)  # theirs, where params.logprobs asks
    prompt_scores: dict[int, list[TokenScores]] = field(default_factory=dict)  # this chunk's prompt tokens


class ModelRunner:
    def __init__(self, model: Decoder, kv: KVCache, block_size: int, adapters: AdapterCache,
                 default_generator: torch.Generator, graphs: DecodeGraphs | None = None) -> None:
        self.model, self.kv, self.block_size, self.adapters = model, kv, block_size, adapters
        self.graphs = graphs
        self.device = model.device
        self.default_generator = default_generator
        self._generators: dict[int, torch.Generator] = {}  # seq_id -> its own, for seeded requests

    def forget(self, seq: Sequence) -> None:
        self._generators.pop(seq.seq_id, None)

    def adapter_slots(self, scheduled: list[ScheduledSeq]) -> dict[int, tuple[LoraPool, int]]:
        """seq_id -> (pool, slot) of each scheduled sequence that uses an adapter."""
        return {s.seq.seq_id: self.adapters.slot(s.seq.adapter_key) for s in scheduled
                if s.seq.adapter_key is not None}

    def prepare(self, scheduled: list[ScheduledSeq]) -> tuple[BatchMeta, list[ScheduledSeq]]:
        """The step's inputs, and the scheduled sequences in the order of its rows."""
        meta, order, _ = self._prepare(scheduled)
        return meta, order

    def _prepare(self, scheduled: list[ScheduledSeq]) -> tuple[BatchMeta, list[ScheduledSeq], LogitsRows]:
        # Single-token rows first (a gathering attention backend batches them into one call). Among
        # them, rows of one adapter slot side by side: a GEMM LoRA backend then runs a popular adapter's
        # rows as one in-place GEMM pair, the SGMV kernel as one segment.
        lora = self.adapter_slots(scheduled)
        decodes = sorted((s for s in scheduled if s.num_new == 1),
                         key=lambda s: (lora[s.seq.seq_id][0].rank, lora[s.seq.seq_id][1])
                         if s.seq.seq_id in lora else (1 << 30, 0))
        order = decodes + [s for s in scheduled if s.num_new != 1]
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        row_slots: list[tuple[LoraPool, int] | None] = []
        # Python ints, one tensor each at the end: a few torch operators a sequence here cost ~1 ms a step
        # at batch 32 (BENCHMARKS.md, twenty-first session, "Smaller things of the same step").
        for s in order:
            seq, start = s.seq, s.seq.num_computed
            end = start + s.num_new
            table = seq.block_table
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend([table[p // bs] * bs + p % bs for p in range(start, end)])
            row_slots.extend([lora.get(seq.seq_id)] * s.num_new)
        row_positions = torch.tensor(positions, dtype=torch.long)
        rows = LogitsRows.plan(order)
        layout = StepLayout(order, len(decodes), row_positions, bs, self.kv.scratch_slot, self.device)
        meta = BatchMeta(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=row_positions.to(self.device),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            num_decode=len(decodes),
            attention=self.model.ops.attention.plan(layout),
            logits_indices=torch.tensor(rows.indices, dtype=torch.long, device=self.device),
            lora=LoraBatch.build(row_slots, self.device),
        )
        return meta, order, rows

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
        gather[:n], mask[:n] = decode_gather(seqs, length, self.block_size, scratch)
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

    def _forward(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, LogitsRows]:
        """Logits [R, V] of the rows the step needs, and whose each is."""
        if self.graphs is not None and all(s.num_new == 1 and s.samples for s in scheduled):
            lora = self.adapter_slots(scheduled)
            ctx = max(s.seq.num_computed + 1 for s in scheduled)
            shape = self.graphs.shape_for(len(scheduled), ctx, _by_rank(lora))
            if shape is not None:
                logits = self.graphs.run(self.decode_inputs(scheduled, *shape, lora))
                rows = LogitsRows.plan(scheduled)
                if len(rows.indices) == len(scheduled):
                    return logits[:len(scheduled)], rows
                # Requests with max_tokens 0 sample nothing: their rows are left out.
                index = torch.tensor(rows.indices, dtype=torch.long, device=self.device)
                return logits.index_select(0, index), rows
        meta, _, rows = self._prepare(scheduled)
        return self.model.forward(meta, self.kv), rows

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> StepResult:
        """Compute one step: the next token of the sequences that sample, and the logprobs asked for."""
        logits, rows = self._forward(scheduled)  # [R, V]
        result = StepResult(prompt_scores=score_prompts(logits, rows))
        sampling = rows.sampling
        if not sampling:
            return result
        if len(sampling) < logits.shape[0]:
            index = torch.tensor([r.sample_row for r in sampling], dtype=torch.long, device=self.device)
            logits = logits.index_select(0, index)
        seqs = [r.seq for r in sampling]
        params = [seq.params for seq in seqs]
        # Taken before the penalties, which rewrite the logits in place: the raw distribution's.
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw = torch.log_softmax(logits[wanted], dim=-1) if wanted else None
        if any(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty for p in params):
            logits = apply_penalties(logits, params, [s.prompt_ids for s in seqs],
                                     [s.output_ids for s in seqs])
        generators = [self._generator(seq) for seq in seqs]
        tokens = sample(logits, params, generators, self.model.ops.glue.argmax)
        result.tokens = {seq.seq_id: tok for seq, tok in zip(seqs, tokens, strict=True)}
        if raw is not None:
            scored = score(raw, [tokens[i] for i in wanted], [params[i].logprobs or 0 for i in wanted])
            result.logprobs = {seqs[i].seq_id: sc for i, sc in zip(wanted, scored, strict=True)}
        return result

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
