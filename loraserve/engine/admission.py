"""The admission answers of a Backend that keeps its own queue count under a lock (the in-process engine,
async_engine.py, and the client of an engine process, core_process/client.py): the context window first,
then the queue. Each says what full means in `_full`. Torch-free."""

from __future__ import annotations

import threading

from loraserve.types import ModelInfo, QueueFull, check_context_window


class LockedAdmission:
    """Mixed into a Backend, which sets `_lock` and `_info` and defines `_full` (called under the lock)."""

    _lock: threading.Lock
    _info: ModelInfo

    def admit(self, prompt_tokens: int, max_tokens: int) -> None:
        with self._lock:
            self._admit(prompt_tokens, max_tokens)

    def _admit(self, prompt_tokens: int, max_tokens: int) -> None:
        """What `generate` refuses, in the order the server reports it; called under the lock."""
        check_context_window(prompt_tokens, max_tokens, self._info.context_window)
        if self._full():
            raise QueueFull()

    def is_full(self) -> bool:
        with self._lock:
            return self._full()

    def _full(self) -> bool:
        raise NotImplementedError
