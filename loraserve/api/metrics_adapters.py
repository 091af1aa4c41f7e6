"""Requests per finetune for /metrics (`loraserve_adapter_requests`), with a bounded number of labels."""

from __future__ import annotations

import threading

NO_ADAPTER = "none"  # the adapter label of requests on the base model
OTHER_ADAPTERS = "other"  # every finetune without a series of its own
DEFAULT_ADAPTER_TOP_N = 20


class AdapterRequestCounter:
    """Requests per finetune with a bounded number of label values.

    A finetune gets a series of its own when a request arrives while it ranks among the `top_n` most
    requested finetunes so far; requests of finetunes outside the top go to "other". A series, once
    made, stays (Prometheus counters must never go down or vanish), so the top's history lives in
    "other" and at most `max_series` finetune series are ever made: the label cardinality is bounded
    whatever the traffic. Counts are kept for at most `max_tracked` finetunes.
    """

    def __init__(self, top_n: int = DEFAULT_ADAPTER_TOP_N, max_series: int | None = None,
                 max_tracked: int = 4096) -> None:
        if top_n < 0:
            raise ValueError("top_n must be >= 0")
        self.top_n = top_n
        self.max_series = 2 * top_n if max_series is None else max_series
        self.max_tracked = max_tracked
        self._counts: dict[str, int] = {}  # all requests per tracked finetune
        self._series: dict[str, int] = {}  # requests counted under the finetune's own label
        self._other = 0
        self._none = 0
        self._lock = threading.Lock()

    def add(self, finetune_id: str | None) -> None:
        with self._lock:
            if finetune_id is None:
                self._none += 1
                return
            if finetune_id in self._series:
                self._series[finetune_id] += 1
                self._counts[finetune_id] += 1
                return
            if finetune_id in self._counts or len(self._counts) < self.max_tracked:
                self._counts[finetune_id] = self._counts.get(finetune_id, 0) + 1
            if len(self._series) < self.max_series and self._in_top(finetune_id):
                self._series[finetune_id] = 1
            else:
                self._other += 1

    def _in_top(self, finetune_id: str) -> bool:
        mine = self._counts.get(finetune_id)
        if mine is None:
            return False
        ahead = sum(1 for key, count in self._counts.items() if count > mine and key != finetune_id)
        return ahead < self.top_n

    def samples(self) -> list[tuple[str, int]]:
        """(adapter label, requests) for every series, "none" and "other" included."""
        with self._lock:
            return [(NO_ADAPTER, self._none), *sorted(self._series.items()), (OTHER_ADAPTERS, self._other)]
