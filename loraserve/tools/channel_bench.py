"""What the engine-process channel costs: `python -m loraserve.tools.channel_bench`.

Times what `--engine-process` sends over its pipe (loraserve/engine/core_process/channel.py): a child
process streams one StepOut per engine step, with `batch` requests' new tokens, and this process receives
and unpickles them; then a request/answer round trip. The same runs with ZeroMQ (PUSH/PULL and PAIR over
ipc://) and msgpack, vLLM V1's choice, when pyzmq and msgpack are importable. Prints µs per message (per
step), per token, and per round trip.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, cast

from loraserve.engine.core_process.channel import Channel, pipe
from loraserve.engine.core_process.messages import AddRequest, StepOut, TokenOut
from loraserve.types import SamplingParams

ROUND_TRIPS = 2000
TIMEOUT_MS = 30_000


def _step(batch: int) -> StepOut:
    """A decode step's message: each request's new token, none finished, no logprobs asked."""
    outputs: list[TokenOut] = [(uuid.uuid4().hex, 1000 + i, None, 17, None, None, None, 0)
                               for i in range(batch)]
    return StepOut(outputs, None)


# -- the pipe (what --engine-process uses) -------------------------------------------------------------
def _pipe_stream(conn: Connection, batch: int, count: int) -> None:
    channel: Channel[object, object] = Channel(conn)
    message = _step(batch)
    for _ in range(count):
        channel.send(message)


def _pipe_echo(conn: Connection) -> None:
    channel: Channel[object, object] = Channel(conn)
    reply = _step(1)
    while channel.recv() is not None:
        channel.send(reply)


def _pipe(batch: int, count: int) -> tuple[float, float]:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = pipe()
    channel: Channel[object, object] = Channel(ours)
    child = ctx.Process(target=_pipe_stream, args=(theirs, batch, count))
    child.start()
    channel.recv()  # the child's startup is not the channel's cost
    began = time.perf_counter()
    for _ in range(count - 1):
        _read_all(cast(StepOut, channel.recv()).outputs)
    streamed = (time.perf_counter() - began) / (count - 1)
    child.join()
    ours, theirs = pipe()
    channel = Channel(ours)
    child = ctx.Process(target=_pipe_echo, args=(theirs,))
    child.start()
    add = AddRequest(uuid.uuid4().hex, list(range(50)), SamplingParams(), None, "account", None)

    def round_trip() -> None:
        channel.send(add)
        _read_all(cast(StepOut, channel.recv()).outputs)

    rtt = _timed_round_trips(round_trip)
    channel.send(None)
    child.join()
    return streamed, rtt


# -- ZeroMQ + msgpack, for comparison ------------------------------------------------------------------
def _zmq_stream(address: str, batch: int, count: int) -> None:
    zmq, msgpack = importlib.import_module("zmq"), importlib.import_module("msgpack")
    socket = zmq.Context.instance().socket(zmq.PUSH)
    socket.connect(address)
    message = _step(batch)
    for _ in range(count):
        socket.send(msgpack.packb(message.outputs))
    socket.close(linger=-1)


def _zmq_echo(address: str) -> None:
    zmq, msgpack = importlib.import_module("zmq"), importlib.import_module("msgpack")
    socket = zmq.Context.instance().socket(zmq.PAIR)
    socket.connect(address)
    reply = _step(1)
    while msgpack.unpackb(socket.recv()) is not None:
        socket.send(msgpack.packb(reply.outputs))
    socket.close(linger=-1)


def _zmq(batch: int, count: int) -> tuple[float, float]:
    zmq, msgpack = importlib.import_module("zmq"), importlib.import_module("msgpack")
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        address = f"ipc://{os.path.join(folder, 'bench')}"
        pull = zmq.Context.instance().socket(zmq.PULL)
        pull.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)  # a lost message fails the run instead of hanging it
        pull.bind(address)
        child = ctx.Process(target=_zmq_stream, args=(address, batch, count))
        child.start()
        pull.recv()
        began = time.perf_counter()
        for _ in range(count - 1):
            _read_all(msgpack.unpackb(pull.recv()))
        streamed = (time.perf_counter() - began) / (count - 1)
        child.join()
        pull.close()
        pair = zmq.Context.instance().socket(zmq.PAIR)
        pair.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
        pair.bind(address + "-pair")
        child = ctx.Process(target=_zmq_echo, args=(address + "-pair",))
        child.start()
        add = [uuid.uuid4().hex, list(range(50)), {"max_tokens": 256, "temperature": 0.6}, None, "account",
               None]

        def round_trip() -> None:
            pair.send(msgpack.packb(add))
            _read_all(msgpack.unpackb(pair.recv()))

        rtt = _timed_round_trips(round_trip)
        pair.send(msgpack.packb(None))
        child.join()
        pair.close()
    return streamed, rtt


def _read_all(outputs: list[Any]) -> None:
    """What the client does with each entry before detokenizing: unpack it."""
    for _request_id, _token, _finish, _num_output, _error, _scores, _prompt_scores, _cached in outputs:
        pass


def _timed_round_trips(round_trip: Callable[[], object]) -> float:
    for _ in range(50):  # warm up
        round_trip()
    began = time.perf_counter()
    for _ in range(ROUND_TRIPS):
        round_trip()
    return (time.perf_counter() - began) / ROUND_TRIPS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraserve.tools.channel_bench", description=__doc__)
    parser.add_argument("--messages", type=int, default=5000, help="step messages streamed per run")
    parser.add_argument("--batches", default="1,8,64", help="requests per step message, comma-separated")
    args = parser.parse_args(argv)
    channels: dict[str, Callable[[int, int], tuple[float, float]]] = {"pipe + pickle 5": _pipe}
    try:
        importlib.import_module("zmq"), importlib.import_module("msgpack")
        channels["zmq + msgpack"] = _zmq
    except ImportError:
        print("(pyzmq or msgpack not installed: the pipe alone)")
    print(f"{'channel':<18}{'batch':>6}{'µs/step message':>17}{'µs/token':>10}{'µs/round trip':>15}")
    for name, run in channels.items():
        for batch in (int(b) for b in args.batches.split(",")):
            per_message, rtt = run(batch, args.messages)
            print(f"{name:<18}{batch:>6}{per_message * 1e6:>17.1f}{per_message * 1e6 / batch:>10.2f}"
                  f"{rtt * 1e6:>15.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
