"""`python -m loraserve.tools.perplexity`: the perplexity of a text under our engine, each weight mode
(`--dtypes`, auto keeping a GGUF file's blocks quantized), with no adapter and with each of `--adapters`
random adapters, beside llama.cpp's on the same token ids, as a markdown table.

Our side is the engine's prompt scoring, the request `/v1/completions` sends for `echo`, `logprobs: 0`,
`max_tokens: 0`, so its numbers are the API's. The text is tokenized once, by our tokenizer, and
llama.cpp scores those very ids. The model file is the one `loraserve bench` gives llama.cpp.
"""

from __future__ import annotations

import gc
import hashlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from loraserve.engine.config import ModelConfig
from loraserve.engine.loader import load_engine
from loraserve.engine.weights.tokenizer import Tokenizer
from loraserve.tools.bench.model_file import ensure_written, llamacpp_file
from loraserve.tools.bench.options import DType
from loraserve.tools.bench.workload import WorkloadSpec, write_adapters
from loraserve.tools.perplexity import llama, ours
from loraserve.tools.perplexity.options import PerplexityConfig, build_parser, config_from_args
from loraserve.tools.perplexity.report import FLOAT32, Column, adapter_notes, cpu_kind, perplexity, table
from loraserve.types import AdapterRef


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Scored:
    """What the first engine load fixes for every scorer: the ids, the adapters, the model's shape."""

    ids: list[int]
    refs: list[AdapterRef]
    model: ModelConfig
    tokenizer: Tokenizer
    columns: list[Column]


def _label(requested: DType, ran: str) -> str:
    if ran == DType.GGUF.value:
        return f"ours {requested.value} (quantized)"
    return f"ours {ran}" if ran == requested.value else f"ours {requested.value} ({ran})"


def _score_ours(cfg: PerplexityConfig, source: str, text: str, workdir: Path) -> Scored:
    scored: Scored | None = None
    for dtype in cfg.dtypes:
        _log(f"loading {source} with dtype {dtype.value}")
        ecfg = ours.engine_config(dtype.value, cfg.threads, cfg.kv_dtype.value)
        engine, tokenizer = load_engine(source, ecfg)
        if scored is None:
            ids = tokenizer.encode(text)[: cfg.tokens]
            if len(ids) < 2:
                raise ValueError(f"{cfg.text} has under 2 tokens")
            # Float32 files whatever the engine runs: every scorer reads the same numbers.
            spec = WorkloadSpec(adapters=max(cfg.adapters, 1), registered=max(cfg.adapters, 1), rank=cfg.rank)
            refs = write_adapters(workdir, engine.cfg, spec, torch.float32) if cfg.adapters else []
            scored = Scored(ids, refs, engine.cfg, tokenizer, [])
        _log(f"scoring {len(scored.ids)} tokens, no adapter and {len(scored.refs)} adapters")
        scores = ours.score_all(engine, scored.ids, scored.refs)
        scored.columns.append(Column(_label(dtype, scores.dtype),
                                     {k: perplexity(v) for k, v in scores.logprobs.items()},
                                     is_float32=scores.dtype == FLOAT32))
        del engine  # the next weight mode's copy of the model replaces this one
        gc.collect()
    assert scored is not None  # PerplexityConfig refuses an empty dtypes
    return scored


def report(cfg: PerplexityConfig) -> str:
    """Score everything `cfg` asks for; the markdown report."""
    found = llamacpp_file(cfg.model, None, cfg.llamacpp, on_cpu=True)
    ensure_written(found, _log)
    source = str(found.path) if found.engine_loads_it else cfg.model
    raw = cfg.text.read_bytes()
    text = raw.decode("utf-8")
    llama_line = "skipped: " + (found.reason or "--no-llamacpp")
    with tempfile.TemporaryDirectory(prefix="loraserve-perplexity-") as tmp:
        s = _score_ours(cfg, source, text, Path(tmp) / "peft")
        if found.path is not None:
            _log(f"scoring with llama.cpp on {found.path}")
            lp, note = llama.score_all(found.path, s.model, s.tokenizer, text, s.ids, s.refs, cfg.threads,
                                       Path(tmp))
            s.columns.append(Column("llama.cpp", {k: perplexity(v) for k, v in lp.items()}))
            llama_line = f"{llama.version()}, {cfg.threads} threads, its default f16 KV cache, {found.path}"
            if note:
                llama_line += f"; {note}"
    labels: dict[str | None, str] = {None: "none", **{r.key: f"a{i + 1}" for i, r in enumerate(s.refs)}}
    lines = [
        f"# Perplexity of {cfg.text.name} under {cfg.model}",
        "",
        f"- CPU: {cpu_kind()}",
        f"- our engine: {source}, {cfg.threads} threads",
        f"- llama.cpp: {llama_line}",
        f"- text: {cfg.text} (sha256 {hashlib.sha256(raw).hexdigest()[:12]}), its first {len(s.ids)} token "
        f"ids by our tokenizer, {len(s.ids) - 1} scored: all but the first, as /v1/completions with echo, "
        "logprobs 0 and max_tokens 0 scores them",
    ]
    if s.refs:
        lines.append(f"- adapters: {len(s.refs)} random rank-{cfg.rank} ones (the bench's write_adapters: "
                     "every projection, lora_alpha = 2 x rank, A ~ N(0, 1/fan_in), B ~ N(0, 0.02^2))")
    lines += ["", table(s.columns, labels), ""]
    lines += [f"- {n}" for n in adapter_notes(s.columns[0], labels)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(report(config_from_args(args)), flush=True)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
