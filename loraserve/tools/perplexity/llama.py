"""llama.cpp's side: the same token ids scored by llama.cpp (llama-cpp-python) on the same GGUF file,
with each adapter as a GGUF LoRA written from the same PEFT folder (the bench's writer), applied at
scale 1 as the bench's llama.cpp baseline applies it.

llama.cpp runs with its defaults otherwise (f16 KV cache, its quantized dot products): the numbers a
llama.cpp user gets. Unlike llama-perplexity, which scores only the second half of each window, every
token but the first is scored here, as our API scores a prompt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loraserve.engine.config import ModelConfig
from loraserve.engine.weights.tokenizer import Tokenizer
from loraserve.tools.bench.gguf_lora import write_gguf_lora
from loraserve.tools.bench.llamacpp import LlamaCppRunner, check_model_file
from loraserve.types import AdapterRef


def version() -> str:
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}"


class LlamaCppScorer(LlamaCppRunner):
    """The bench's runner (adapter loading and switching) keeping the logits of every evaluated position."""

    def __init__(self, model_path: Path, n_ctx: int, threads: int) -> None:
        # One batch for the whole text, as our engine prefills it (in one step up to 1024 tokens).
        super().__init__(model_path, n_ctx, threads, n_batch=n_ctx, logits_all=True, n_ubatch=n_ctx)

    def logprobs(self, ids: list[int], lora: Path | None) -> list[float]:
        """The logprob of ids[1:], each given the ones before it."""
        self.use(lora)
        self.llm.reset()
        self.llm.eval(ids)
        logits = np.asarray(self.llm.scores[: len(ids) - 1], dtype=np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(axis=1))
        picked = shifted[np.arange(len(ids) - 1), ids[1:]]
        return [float(x) for x in picked - log_z]


def tokenization_note(scorer: LlamaCppScorer, tokenizer: Tokenizer, vocab_size: int, text: str,
                      ids: list[int]) -> str:
    """Empty when llama.cpp's vocabulary is ours and it splits the text as we do; else what differs.
    A vocabulary of another size means other ids: an error, the scores would mean nothing."""
    if scorer.n_vocab != vocab_size:
        raise ValueError(f"llama.cpp's vocabulary has {scorer.n_vocab} tokens, our model {vocab_size}")
    theirs = scorer.llm.tokenize(text.encode(), add_bos=tokenizer.add_bos, special=True)[: len(ids)]
    if theirs == ids:
        return ""
    at = next((i for i, (a, b) in enumerate(zip(theirs, ids, strict=False)) if a != b),
              min(len(theirs), len(ids)))
    return f"llama.cpp tokenizes the text differently from token {at} on; it scores our ids all the same"


def score_all(model_path: Path, cfg: ModelConfig, tokenizer: Tokenizer, text: str, ids: list[int],
              adapters: list[AdapterRef], threads: int,
              workdir: Path) -> tuple[dict[str | None, list[float]], str]:
    """(logprobs per adapter key, None for none; the tokenization note)."""
    arch = check_model_file(model_path, cfg)
    loras = {ref.key: write_gguf_lora(Path(ref.path), workdir / f"{ref.key}.gguf", cfg, arch)
             for ref in adapters}
    scorer = LlamaCppScorer(model_path, len(ids), threads)
    try:
        note = tokenization_note(scorer, tokenizer, cfg.vocab_size, text, ids)
        for lora in loras.values():
            scorer.load_adapter(lora)
        out: dict[str | None, list[float]] = {None: scorer.logprobs(ids, None)}
        for key, lora in loras.items():
            out[key] = scorer.logprobs(ids, lora)
        return out, note
    finally:
        scorer.close()
