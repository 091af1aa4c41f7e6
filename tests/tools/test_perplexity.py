"""`python -m loraserve.tools.perplexity` on the embedded SmolLM2 (Q4_1) with 64 tokens of the README and
one random adapter: the table's perplexities exist, are finite, and the weight modes and llama.cpp agree
within the noise 63 tokens leave.

Why 10%: the Q4_1 blocks differ from their float32 dequantization by a per-token logprob error of about
0.2-0.4 nats (measured on this text), of either sign and independent enough between tokens that the mean
over 63 tokens still moves the perplexity by a few % (measured: 0.6% without the adapter, 5.2% with it;
llama.cpp, which also multiplies Q4_1 blocks by 8-bit activations, 0.6% and 0.3%). Any change of input,
even a 1e-9 one, re-draws that error (an activation crosses an 8-bit rounding boundary), so the measured
figures are one draw: 10% is about 2.5 of its standard deviations. A broken weight mode or adapter path
is far outside it (a wrong block or scale takes the perplexity to thousands). The issue's 1%/3% targets
are for the 512-token run the tool defaults to, where the noise is 1/3 as large.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
from pathlib import Path

import pytest

from loraserve.tools.perplexity.report import Column, adapter_notes, cpu_kind, perplexity, table
from loraserve.tools.perplexity.run import main

TOLERANCE = 0.10
SMALL = ["--model", "embedded", "--tokens", "64", "--adapters", "1", "--threads", "2"]


def _table(printed: str) -> dict[str, dict[str, float]]:
    """{row label: {column label: value}} from the markdown table the tool prints."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in printed.splitlines()
            if line.startswith("| ")]
    head, *body = rows
    return {r[0]: {h: float(v.rstrip("%")) for h, v in zip(head[1:], r[1:], strict=True)} for r in body}


HAVE_LLAMACPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module")
def printed() -> str:
    """One run for every test (the engine loads twice, and warming it up takes most of the time): with
    llama.cpp where llama-cpp-python is installed, its column then costs a few seconds more."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*SMALL, "--dtypes", "auto", "float32",
                     "--llamacpp" if HAVE_LLAMACPP else "--no-llamacpp"]) == 0
    return out.getvalue()


def test_quantized_and_float32_agree(printed: str) -> None:
    rows = _table(printed)
    assert "63 scored" in printed and "- CPU: " in printed
    assert list(rows) == ["none", "a1"]
    for label, row in rows.items():
        auto, f32 = row["ours auto (quantized)"], row["ours float32"]
        assert all(math.isfinite(v) and v > 1 for v in (auto, f32)), label
        assert abs(auto / f32 - 1) < TOLERANCE, label
        ratio = row["ours auto (quantized) / ours float32 - 1"]
        assert ratio == pytest.approx((auto / f32 - 1) * 100, abs=0.01)
    # the adapter is applied (at this scale it moves the perplexity by a few %, not more: see the notes)
    assert rows["a1"]["ours float32"] != rows["none"]["ours float32"]
    assert "a1 moves the perplexity" in printed and "swamps" not in printed


@pytest.mark.skipif(not HAVE_LLAMACPP,
                    reason="llama-cpp-python is not installed (pip install 'loraserve[bench]')")
def test_llamacpp_scores_the_same_ids(printed: str) -> None:
    assert "llama-cpp-python" in printed and "tokenizes the text differently" not in printed
    for label, row in _table(printed).items():
        theirs, f32 = row["llama.cpp"], row["ours float32"]
        assert math.isfinite(theirs) and theirs > 1, label
        # the same Q4_1 blocks, theirs multiplied by 8-bit activations: the tolerance of the module doc
        assert abs(theirs / f32 - 1) < TOLERANCE, label
        assert row["llama.cpp / ours float32 - 1"] == pytest.approx((theirs / f32 - 1) * 100, abs=0.01)


def test_bad_options_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--text", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--tokens", "1"]) == 2
    assert "tokens must be >= 2" in capsys.readouterr().err
    assert main(["--dtypes", "float32", "float32"]) == 2
    assert "must not repeat" in capsys.readouterr().err


def test_report_parts(tmp_path: Path) -> None:
    assert perplexity([math.log(0.5)] * 4) == pytest.approx(2.0)
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Some CPU\nflags\t\t: fpu avx2 avx512f\n")
    assert cpu_kind(info) == "Some CPU, avx512f"
    info.write_text("model name\t: Other CPU\nflags\t\t: fpu avx2 avx512bw\n")
    assert cpu_kind(info) == "Other CPU, no avx512f"
    labels: dict[str | None, str] = {None: "none", "k": "a1"}
    f32 = Column("ours float32", {None: 10.0, "k": 30.0}, is_float32=True)
    q = Column("ours auto (quantized)", {None: 10.2, "k": 29.4})
    rows = _table(table([q, f32], labels))
    assert rows["none"]["ours auto (quantized) / ours float32 - 1"] == pytest.approx(2.0)
    assert rows["a1"]["ours auto (quantized) / ours float32 - 1"] == pytest.approx(-2.0)
    assert "swamps the model" in adapter_notes(f32, labels)[0]  # x3
