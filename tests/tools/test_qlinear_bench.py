"""`python -m loraserve.tools.qlinear_bench` end to end on SmolLM2's smallest projection: every build it
names compiles, repacks its own weights and prints a row per (type, layout, T) with a time and a ratio."""

from __future__ import annotations

import re

import pytest

from loraserve.engine.kernels import build as kernel_build
from loraserve.tools import qlinear_bench

pytestmark = pytest.mark.skipif(kernel_build.compiler() is None, reason="no C compiler")


def test_prints_a_row_per_type_layout_and_rows_of_x(capsys: pytest.CaptureFixture[str]) -> None:
    qlinear_bench.main(["--model", "smollm2", "--types", "q8_0", "q4_k", "--tokens", "1", "9",
                        "--matrices", "o", "--layouts", "repacked", "stored", "--builds", "native", "scalar",
                        "--source", f"again={kernel_build.CSRC}", "--reps", "1", "--pool-mb", "1"])
    out = capsys.readouterr().out
    assert "builds: native (" in out and "again:scalar (0 bits)" in out
    rows = [line for line in out.splitlines() if line.startswith("| 576->576 (o)")]
    # Q8_0 repacked and as stored; no Q4_K row: 576 inputs are not a multiple of its 256-weight super-blocks
    assert [tuple(cell.strip() for cell in row.split("|")[2:5]) for row in rows] == [
        ("Q8_0", layout, t) for layout in ("repacked", "stored") for t in ("1", "9")]
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")[5:-1]]
        assert len(cells) == 4 + 3 and all(re.fullmatch(r"\d+\.\d+", c) for c in cells), row
