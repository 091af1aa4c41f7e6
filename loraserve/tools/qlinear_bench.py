"""The quantized projection kernel alone (csrc/qlinear.c): `python -m loraserve.tools.qlinear_bench`.

Times `qlinear_forward` on a model's projection shapes, weights as stored or repacked in groups of 8 rows,
for several builds of the kernel side by side: the engine's (-march=native) and the same source with the
wider instruction sets switched off (`avx2`: -mno-avx512f; `scalar`), optionally of another copy of csrc/
too (`--source before=DIR`, e.g. the previous commit's). The builds take turns call by call, so a shared,
noisy machine slows them alike; each figure is the fastest call of many, in ms, and each build's ratio to
the first. Every call reads a different copy of the weight, from a pool of about `--pool-mb` (at least
two copies a build), so the weights come from memory, as in a decode step, not from the cache (the small
shapes' pool fits in a large L3).

    python -m loraserve.tools.qlinear_bench --model llama2-7b --types q4_0 --tokens 1 16
    python -m loraserve.tools.qlinear_bench --model smollm2 --types q4_1 q8_0 --tokens 1 32 \
        --source before=/tmp/csrc
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch

from loraserve.engine.kernels import build as kernel_build
from loraserve.engine.kernels.qlinear import Parts, QuantLinearKernel, block_elems

_Q = gguf.GGMLQuantizationType
# (name, in_features, out_features) of each projection, fused ones as one matrix
SHAPES = {
    "llama2-7b": [("q/k/v", 4096, 12288), ("o", 4096, 4096), ("gate/up", 4096, 22016), ("down", 11008, 4096)],
    "smollm2": [("q/k/v", 576, 960), ("o", 576, 576), ("gate/up", 576, 3072), ("down", 1536, 576)],
}
# avxvnni: the AVX-VNNI path (vpdpbusd on ymm registers); on an AVX-512 VNNI CPU through the instruction's
# EVEX encoding (qlinear.c, QLINEAR_YMM_VNNI), on an AVX-VNNI one the native build's own path
BUILD_FLAGS = {"native": "", "avx2": "-mno-avx512f", "avxvnni": "-DQLINEAR_YMM_VNNI",
               "scalar": "-mno-avx2 -mno-avx512f"}
# where a block's fp16 scales lie: (offset, count) in its bytes
_SCALES = {_Q.Q8_0: (0, 1), _Q.Q4_0: (0, 1), _Q.Q4_1: (0, 2), _Q.Q4_K: (0, 2), _Q.Q5_K: (0, 2),
           _Q.Q6_K: (208, 1)}


@dataclass(frozen=True)
class Build:
    label: str
    kernel: QuantLinearKernel


def _build(label: str, csrc: Path, flags: str, folder: Path) -> Build:
    cc = kernel_build.compiler()
    if cc is None:
        raise SystemExit("no C compiler")
    wrapper = folder / f"cc-{len(list(folder.iterdir()))}"
    wrapper.write_text(f'#!/bin/sh\nexec {cc} "$@" {flags}\n')
    wrapper.chmod(0o755)
    lib = kernel_build.build(csrc / "qlinear.c", str(wrapper), folder / "cache")
    return Build(label, QuantLinearKernel(ctypes.CDLL(str(lib))))


def _random_blocks(qtype: _Q, n: int, k: int, block_bytes: int, gen: torch.Generator) -> torch.Tensor:
    """Random quants with sane fp16 scales (0.01): only the speed matters here."""
    nb = k // block_elems(qtype)
    blocks = torch.randint(0, 256, (n, nb, block_bytes), dtype=torch.uint8, generator=gen)
    offset, count = _SCALES[qtype]
    scale = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
    blocks[:, :, offset:offset + 2 * count] = scale.repeat(count)
    return blocks.reshape(n, nb * block_bytes)


def _time(builds: list[Build], parts: list[list[Parts]], x: torch.Tensor, reps: int) -> list[float]:
    """Fastest ms a call per build, the builds taking turns call by call over the weight copies, each at
    its own place in the pool: the copy a build reads was last read a whole pool ago, by another build, so
    it comes from memory (the next build reading the copy just read would find it in the cache)."""
    best = [float("inf")] * len(builds)
    copies = len(parts[0])
    for b, build in enumerate(builds):  # warm-up: page in the copies, spin up the threads
        build.kernel.stacked(x, parts[b][0])
    for _ in range(reps):
        for i in range(copies):
            for b, build in enumerate(builds):
                part = parts[b][(i + b * copies // len(builds)) % copies]
                start = time.perf_counter()
                build.kernel.stacked(x, part)
                best[b] = min(best[b], time.perf_counter() - start)
    return [1e3 * s for s in best]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--types", nargs="+", default=["q4_0"], help="GGML types, e.g. q4_0 q8_0 q4_k")
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16], help="rows of x (T)")
    parser.add_argument("--layouts", nargs="+", choices=["repacked", "stored"], default=["repacked"])
    parser.add_argument("--builds", nargs="+", choices=sorted(BUILD_FLAGS), default=["native", "avx2"])
    parser.add_argument("--source", action="append", default=[], metavar="LABEL=DIR",
                        help="the same builds of another csrc/ folder as well")
    parser.add_argument("--matrices", nargs="+", help="only these of the model's projections (names)")
    parser.add_argument("--reps", type=int, default=10, help="passes over the weight copies")
    parser.add_argument("--pool-mb", type=int, default=200, help="bytes of weight copies per matrix")
    args = parser.parse_args(argv)

    sources = [("", kernel_build.CSRC)] + [(s.split("=", 1)[0] + ":", Path(s.split("=", 1)[1]))
                                            for s in args.source]
    with tempfile.TemporaryDirectory() as tmp:
        builds = [_build(prefix + name, csrc, BUILD_FLAGS[name], Path(tmp))
                  for prefix, csrc in sources for name in args.builds]
    print(f"threads {torch.get_num_threads()}, builds: "
          + ", ".join(f"{b.label} ({b.kernel.vector_bits} bits{', vnni' if b.kernel.vnni else ''})"
                      for b in builds))
    print("| matrix | type | layout | T | " + " | ".join(f"{b.label} ms" for b in builds) + " | "
          + " | ".join(f"{b.label} / {builds[0].label}" for b in builds[1:]) + " |")
    print("|---" * (4 + 2 * len(builds) - 1) + "|")
    gen = torch.Generator().manual_seed(0)
    first = builds[0].kernel
    for name, k, n in SHAPES[args.model]:
        if args.matrices and name not in args.matrices:
            continue
        for tname in args.types:
            qtype = _Q.__members__[tname.upper()]
            if k % block_elems(qtype):
                continue
            one = _random_blocks(qtype, n, k, first.block_bytes[int(qtype)], gen)
            copies = max(2 * len(builds), min(16, args.pool_mb * 2 ** 20 // one.numel()))
            weights = [one] + [_random_blocks(qtype, n, k, first.block_bytes[int(qtype)], gen)
                               for _ in range(copies - 1)]
            for layout in args.layouts:
                # each build reads the groups it lays out itself (qlinear_x8.h: layouts differ by build)
                parts = [[b.kernel.parts([b.kernel.repack(w, int(qtype), n, k) if layout == "repacked"
                                          else (w, int(qtype), n)], k) for w in weights] for b in builds]
                for t in args.tokens:
                    x = torch.randn(t, k, generator=gen)
                    ms = _time(builds, parts, x, args.reps)
                    print(f"| {k}->{n} ({name}) | {qtype.name} | {layout} | {t} | "
                          + " | ".join(f"{m:.3f}" for m in ms) + " | "
                          + " | ".join(f"{m / ms[0]:.2f}" for m in ms[1:]) + " |", flush=True)
                del parts


if __name__ == "__main__":
    main()
