"""The engine process's life: kill -9 mid-stream, refusals while it restarts, back again, a clean shutdown;
a source that cannot load fails the client's start as it fails load_backend, with no torch on this side."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from loraserve.engine.config import EngineConfig
from loraserve.engine.core_process.client import EngineClient
from loraserve.engine.core_process.supervisor import RestartPolicy
from loraserve.types import FinishReason, QueueFull, SamplingParams, StreamEvent

LONG = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
# The streams of a killed engine must end this soon (their own timeout is far longer: a hang fails slowly).
FAILURE_S = 5.0


async def _rest(stream: object, timeout_s: float = 30.0) -> list[StreamEvent]:
    async def drain() -> list[StreamEvent]:
        return [event async for event in stream]  # type: ignore[attr-defined]

    return await asyncio.wait_for(drain(), timeout_s)


def _exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Still a zombie until multiprocessing reaps it: count that as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[1].startswith("Z")


async def test_kill_9_restart_and_shutdown() -> None:
    client = EngineClient("random:tiny", EngineConfig(max_num_seqs=4, threads=1))
    try:
        prompt = client.encode("Count to one thousand:")
        before = await _rest(client.generate("before", prompt, SHORT))
        doomed = [client.generate(f"doomed-{i}", prompt, LONG) for i in range(3)]
        for stream in doomed:
            assert (await asyncio.wait_for(anext(stream), 30)).finish_reason is None
        first_pid = client.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        killed = time.monotonic()
        for stream in doomed:
            *_, last = await _rest(stream)
            assert last.finish_reason is FinishReason.LOST
            assert last.error is not None and "killed by signal 9" in last.error, last.error
        assert time.monotonic() - killed < FAILURE_S
        # Refused at once while the new process loads: QueueFull is the server's 3040.
        assert client.is_full()
        with pytest.raises(QueueFull):
            client.generate("during", prompt, SHORT)
        deadline = time.monotonic() + 60
        while client.is_full():
            assert time.monotonic() < deadline, "the engine process never came back"
            await asyncio.sleep(0.05)
        assert client.pid not in (None, first_pid)
        assert await _rest(client.generate("after", prompt, SHORT)) == before  # same weights, same tokens
        # A clean stop: what is in flight ends with an error event, the process exits, nothing restarts.
        open_stream = client.generate("open", prompt, LONG)
        assert (await asyncio.wait_for(anext(open_stream), 30)).finish_reason is None
        second_pid = client.pid
        assert second_pid is not None
        client.shutdown()
        *_, last = await _rest(open_stream, timeout_s=FAILURE_S)
        assert last.finish_reason is FinishReason.LOST and last.error == "engine is shut down"
        assert _exited(second_pid) and client.pid is None
        with pytest.raises(RuntimeError, match="shut down"):
            client.generate("late", prompt, SHORT)
    finally:
        client.shutdown()


def test_a_bad_source_fails_the_start_and_this_side_stays_torch_free() -> None:
    """In a fresh interpreter (this one has torch): the engine process refuses the source (dtype gguf of
    float weights) and the client raises that error, as load_backend would."""
    code = textwrap.dedent("""
        import sys
        from loraserve.engine.config import EngineConfig
        from loraserve.engine.core_process.client import EngineClient
        if __name__ == "__main__":
            try:
                EngineClient("random:tiny", EngineConfig(dtype="gguf"))
            except ValueError as exc:
                print("refused:", exc)
            print("torch imported:", "torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused: dtype gguf keeps a GGUF file's own" in done.stdout, done.stdout + done.stderr
    assert "torch imported: False" in done.stdout


@pytest.mark.parametrize("values", [dict(first_delay_s=-1), dict(first_delay_s=5, max_delay_s=1),
                                    dict(stable_s=-1)])
def test_restart_policy_is_validated(values: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**values)
