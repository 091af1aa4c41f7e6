"""The perplexity tool's options: which model, which text, how many tokens and adapters, which weight
modes of our engine, and whether llama.cpp scores the same ids beside them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from loraserve.tools.bench.options import DType, KvDType

# The repository's README: a long English text that ships with the code, so every checkout scores the
# same tokens without downloading a corpus.
DEFAULT_TEXT = Path(__file__).resolve().parents[3] / "README.md"
DEFAULT_DTYPES = (DType.AUTO, DType.FLOAT32)


@dataclass(frozen=True)
class PerplexityConfig:
    model: str = "embedded"
    text: Path = DEFAULT_TEXT
    tokens: int = 512  # the text's first this many token ids (BOS included where the model adds one)
    adapters: int = 2
    rank: int = 16
    dtypes: tuple[DType, ...] = DEFAULT_DTYPES
    kv_dtype: KvDType = KvDType.AUTO  # every weight mode's K/V cache (auto: float16 for GGUF blocks)
    llamacpp: bool = True
    threads: int = 2

    def __post_init__(self) -> None:
        if self.tokens < 2:
            raise ValueError("tokens must be >= 2: the first token is not scored (nothing predicts it)")
        if self.adapters < 0:
            raise ValueError("adapters must be >= 0")
        for name in ("rank", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.dtypes:
            raise ValueError("dtypes must name at least one weight mode")
        if len(set(self.dtypes)) != len(self.dtypes):
            raise ValueError("dtypes must not repeat")
        if not self.text.is_file():
            raise ValueError(f"text {self.text}: no such file")


def build_parser() -> argparse.ArgumentParser:
    d = PerplexityConfig.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="python -m loraserve.tools.perplexity",
        description="The perplexity of a text under our engine (each weight mode, no adapter and random "
                    "adapters), scored as /v1/completions with echo and logprobs scores it, beside "
                    "llama.cpp's on the same token ids.")
    p.add_argument("--model", default=d["model"].default,
                   help="a .gguf file, 'embedded' or random:NAME:TYPE (q4_0, q4_k_m, ...) "
                        "(default: %(default)s)")
    p.add_argument("--text", type=Path, default=d["text"].default,
                   help="the text to score (default: the repository's README.md)")
    p.add_argument("--tokens", type=int, default=d["tokens"].default,
                   help="score the text's first N token ids (default: %(default)s)")
    p.add_argument("--adapters", type=int, default=d["adapters"].default,
                   help="random adapters (the bench's), each scored on its own (default: %(default)s)")
    p.add_argument("--rank", type=int, default=d["rank"].default, help="their rank (default: %(default)s)")
    p.add_argument("--dtypes", nargs="+", type=DType, default=list(DEFAULT_DTYPES),
                   choices=list(DType), metavar="DTYPE",
                   help=f"our engine's weight modes, of {', '.join(t.value for t in DType)} "
                        "(default: auto float32; auto keeps a GGUF file's blocks quantized)")
    p.add_argument("--kv-dtype", type=KvDType, default=d["kv_dtype"].default, choices=list(KvDType),
                   metavar="KV_DTYPE",
                   help="our K/V cache's elements in every weight mode: auto (float16 for GGUF blocks, the "
                        "weight mode's otherwise), float32 or float16")
    p.add_argument("--llamacpp", action=argparse.BooleanOptionalAction, default=d["llamacpp"].default,
                   help="score with llama.cpp too (llama-cpp-python; default: on)")
    p.add_argument("--threads", type=int, default=d["threads"].default,
                   help="threads for our engine and for llama.cpp (default: %(default)s)")
    return p


def config_from_args(args: argparse.Namespace) -> PerplexityConfig:
    return PerplexityConfig(model=args.model, text=args.text, tokens=args.tokens, adapters=args.adapters,
                            rank=args.rank, dtypes=tuple(args.dtypes), kv_dtype=args.kv_dtype,
                            llamacpp=args.llamacpp,
                            threads=args.threads)
