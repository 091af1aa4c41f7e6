"""The engine in a process of its own, behind the same `Backend` protocol (issue 18).

The API process keeps HTTP, templating, tokenization and detokenized streaming (`client.EngineClient`);
a child process started with `spawn` loads the model, schedules and computes (`worker.run_worker`). They
talk over one duplex pipe (`channel.py`): requests, aborts and adapter removals one way, one message per
engine step the other way with every request's new token ids and a stats snapshot, so that admission and
/metrics are answered in the API process without a round trip. `supervisor.py` restarts the engine
process when it dies.

Nothing here imports torch at module level: the API process imports this package; only the worker's
entry point loads the engine, in the child.
"""
