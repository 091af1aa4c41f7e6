"""One stream, ours against llama.cpp, tokens decoded in turns: `python -m loraserve.tools.llamacpp_ab`.

Why: `loraserve bench --llamacpp` runs one engine and then the other, minutes apart, and on a shared
machine the memory's rate moves by half from one minute to the next (a 7B decode step is bound by it):
the same commit read 1.19x and 0.98x llama.cpp's time a token in two runs of an hour. Here both engines
hold the same GGUF file (ours repacked, llama.cpp's mapped) in one process and decode in turns, `--block`
tokens each, the first to go alternating round by round, so that both meet the same moments of the host.
Each prints its median and mean time a token, and the per-round medians show the host's phases.

With an adapter (the default) both run the same random rank-`--rank` LoRA on `--targets`, ours from the
PEFT folder the bench writes, llama.cpp's from the GGUF LoRA file written from the same numbers.

    python -m loraserve.tools.llamacpp_ab --model random:llama2-7b:q4_0 --rounds 8
    python -m loraserve.tools.llamacpp_ab --model embedded --no-adapter

`random:NAME:TYPE` is written once to the bench's cache (`loraserve bench`'s file, the same blocks).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loraserve.engine.config import EngineConfig
from loraserve.engine.loader import load_engine
from loraserve.peft import LORA_TARGETS
from loraserve.tools.bench.llamacpp import (
    INSTALL_HINT,
    LlamaCppRunner,
    available,
    check_model_file,
    gguf_adapters,
)
from loraserve.tools.bench.model_file import ensure_written, model_file
from loraserve.tools.bench.workload import WorkloadSpec, make_requests, write_adapters
from loraserve.types import SamplingParams


@dataclass(frozen=True)
class Turns:
    """Seconds a token, per engine, in the order they were decoded, `block` tokens a turn."""

    block: int
    ours: list[float]
    theirs: list[float]

    def rounds(self, times: list[float]) -> list[float]:
        """Each turn's median, in ms."""
        return [statistics.median(times[i:i + self.block]) * 1e3 for i in range(0, len(times), self.block)]

    def summary(self) -> str:
        mo, ml = statistics.median(self.ours), statistics.median(self.theirs)
        ao, al = statistics.mean(self.ours), statistics.mean(self.theirs)
        return (f"ours      median {mo * 1e3:7.1f} ms a token, mean {ao * 1e3:7.1f}; turns "
                + " ".join(f"{t:.0f}" for t in self.rounds(self.ours))
                + f"\nllama.cpp median {ml * 1e3:7.1f} ms a token, mean {al * 1e3:7.1f}; turns "
                + " ".join(f"{t:.0f}" for t in self.rounds(self.theirs))
                + f"\nllama.cpp / ours: {ml / mo:.3f} (medians), {al / ao:.3f} (means)")


def interleave(ours: Callable[[], object], theirs: Callable[[], object], rounds: int, block: int) -> Turns:
    """`block` calls of one, then of the other, `rounds` times, ours first in even rounds."""
    turns = Turns(block, [], [])
    for r in range(rounds):
        for who in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
            step, out = (ours, turns.ours) if who == "ours" else (theirs, turns.theirs)
            for _ in range(block):
                start = time.perf_counter()
                step()
                out.append(time.perf_counter() - start)
    return turns


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loraserve.tools.llamacpp_ab",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a GGUF file, or `embedded`")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--block", type=int, default=16, help="tokens a turn")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--adapter", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--threads", type=int, default=0, help="both engines' (0: the engine's default)")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if not available():
        print(f"llama-cpp-python is not installed; {INSTALL_HINT}", file=sys.stderr)
        return 2
    if ns.rounds < 1 or ns.block < 1:
        print("--rounds and --block must be >= 1", file=sys.stderr)
        return 2
    targets = tuple(t for t in ns.targets.split(",") if t)
    file = model_file(ns.model, None)
    ensure_written(file, lambda line: print(line, file=sys.stderr))
    if file.path is None or not file.path.is_file():
        print(f"--model {ns.model}: {file.reason or 'no such GGUF file'}", file=sys.stderr)
        return 2
    new_tokens = ns.rounds * ns.block + 2
    ecfg = EngineConfig(max_num_seqs=1, kv_cache_bytes=256 << 20, lora_slot_bytes=256 << 20,
                        **({"threads": ns.threads} if ns.threads else {}))
    engine, _ = load_engine(str(file.path), ecfg)
    spec = WorkloadSpec(adapters=1, registered=1, rank=ns.rank, targets=targets or LORA_TARGETS, requests=1,
                        concurrency=1, prompt_len=ns.prompt_len)
    with tempfile.TemporaryDirectory() as tmp:
        refs = write_adapters(Path(tmp), engine.cfg, spec, engine.dtype)
        req = make_requests(spec, engine.cfg.vocab_size, refs)[0]
        adapter = req.adapter if ns.adapter else None
        runner = LlamaCppRunner(file.path, ns.prompt_len + new_tokens + 8, torch.get_num_threads())
        try:
            if adapter is not None:
                lora = gguf_adapters([adapter], engine.cfg, check_model_file(file.path, engine.cfg),
                                      Path(tmp) / "gguf")[adapter.key]
                runner.load_adapter(lora)
                runner.use(lora)
            seq = engine.add_request("ab", req.prompt, SamplingParams(max_tokens=new_tokens, temperature=0,
                                                                      ignore_eos=True), adapter)
            while seq.num_output == 0:  # the prompt, untimed on both sides
                engine.step()
            runner.llm.reset()
            token = [runner.next_token(req.prompt)]

            def theirs() -> None:
                token[0] = runner.next_token(token)

            turns = interleave(engine.step, theirs, ns.rounds, ns.block)
        finally:
            runner.close()
            engine.adapters.close()
    what = f"one rank-{ns.rank} adapter on {','.join(targets)}" if ns.adapter else "no adapter"
    print(f"{ns.model}: one stream, {what}, {torch.get_num_threads()} threads, {ns.rounds} rounds of "
          f"{ns.block} tokens each")
    print(turns.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
