"""`python -m loraserve.tools.llamacpp_ab`: our engine and llama.cpp decoding one stream in turns. The turn
order and the figures are checked on counted calls; the tool itself on the embedded model where
llama-cpp-python is installed (CI does not compile it)."""

from __future__ import annotations

import contextlib
import importlib.util
import io

import pytest

from loraserve.tools.llamacpp_ab import Turns, interleave, main


def test_turns_alternate_who_goes_first() -> None:
    calls: list[str] = []
    turns = interleave(lambda: calls.append("o"), lambda: calls.append("l"), rounds=3, block=2)
    assert "".join(calls) == "oollllooooll"
    assert len(turns.ours) == len(turns.theirs) == 6 and all(t >= 0 for t in turns.ours + turns.theirs)


def test_summary_medians_means_and_turns() -> None:
    turns = Turns(2, ours=[0.010, 0.012, 0.020, 0.022], theirs=[0.030, 0.030, 0.030, 0.034])
    assert turns.rounds(turns.ours) == pytest.approx([11.0, 21.0])
    text = turns.summary()
    assert "ours      median    16.0 ms" in text and "turns 11 21" in text
    assert "llama.cpp / ours: 1.875 (medians), 1.938 (means)" in text


def test_bad_counts_are_refused() -> None:
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["--model", "embedded", "--rounds", "0"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip install 'loraserve[bench]')")
@pytest.mark.parametrize("adapter", ["--adapter", "--no-adapter"])
def test_both_engines_decode_the_embedded_model(adapter: str) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--model", "embedded", "--rounds", "2", "--block", "3", "--threads", "2", adapter]) == 0
    text = out.getvalue()
    assert ("one rank-16 adapter on q_proj,k_proj,v_proj,o_proj" in text) == (adapter == "--adapter")
    ratio = float(text.split("llama.cpp / ours: ")[1].split()[0])
    assert 0.05 < ratio < 20  # both decoded: finite, positive times
