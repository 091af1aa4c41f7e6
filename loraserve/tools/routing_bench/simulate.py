"""Replicas needed for many active adapters under each routing: a small per-request simulation driven by
measured per-replica figures (the benchmark's, or given). Pure Python: no Ray, no torch.

The model. Requests arrive at `rate` per second (Poisson) and name an adapter drawn by popularity. A
replica is one work queue: a request costs it `1 / requests_per_s` seconds, plus `load_s` when the
adapter is not among its `resident` most recently used ones (an LRU: the engine's host cache under
Serve's multiplexing LRU); the adapter is resident there afterwards. A replica's backlog (seconds of
work queued) drains in real time. Routing:

- power of two: two replicas at random, the one with the smaller backlog; blind to adapters, as Serve's
  plain routing is.
- affinity: the replica holding the adapter with the smallest backlog, unless that backlog is `spill_s`
  over the power-of-two choice's (Serve's router passes over a full replica); then, and for an adapter
  no replica holds, the power-of-two choice, which loads it. (Spilling on the holder's backlog alone
  would spill everywhere once every replica is busy, loading everywhere: a storm Serve does not have.)

A count of replicas is enough when the 99th percentile of the wait (the chosen replica's backlog when a
request arrives) is at most `max_wait_s` over the second half of the run (the first half fills the
caches). A busy share would not do: affinity runs an adapter's holders full before it spills, by design.
The search bisects between what the rate alone needs and a count that is enough even if every request
loads.
"""

from __future__ import annotations

import enum
import math
import random
from collections import OrderedDict
from dataclasses import dataclass

from loraserve.tools.routing_bench.popularity import Popularity, cumulative_weights

# The busy share at which a power-of-two queue's wait is surely short: where the search starts from above.
_HIGH_UTILIZATION = 0.7


class Routing(enum.Enum):
    AFFINITY = "multiplexed"  # the adapter as Serve's multiplexed model id
    POWER_OF_TWO = "power-of-two"  # Serve's plain choice, adapter-blind


@dataclass(frozen=True)
class ReplicaFigures:
    requests_per_s: float  # what one replica sustains with its adapters resident
    load_s: float  # one adapter load (a host-cache miss)
    resident: int  # adapters one replica holds

    def __post_init__(self) -> None:
        if not (self.requests_per_s > 0 and math.isfinite(self.requests_per_s)):
            raise ValueError(f"requests_per_s must be a positive number, got {self.requests_per_s!r}")
        if not (self.load_s >= 0 and math.isfinite(self.load_s)):
            raise ValueError(f"load_s must be >= 0, got {self.load_s!r}")
        if self.resident < 1:
            raise ValueError(f"resident must be >= 1, got {self.resident!r}")


@dataclass(frozen=True)
class Scenario:
    rate: float  # requests per second over all replicas
    adapters: int  # active adapters the requests name
    popularity: Popularity
    alpha: float = 1.0  # the power law's exponent
    max_wait_s: float = 1.0  # the 99th percentile of the wait a count of replicas must keep to
    spill_s: float = 0.5  # backlog beyond another replica's at which affinity sends a request there
    seed: int = 0
    min_requests: int = 20_000
    max_requests: int = 400_000

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive number, got {self.rate!r}")
        if self.adapters < 1:
            raise ValueError(f"adapters must be >= 1, got {self.adapters!r}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha!r}")
        if not self.max_wait_s > 0:
            raise ValueError(f"max_wait_s must be > 0, got {self.max_wait_s!r}")
        if not 0 <= self.spill_s <= self.max_wait_s:
            raise ValueError(f"spill_s must be in [0, max_wait_s], got {self.spill_s!r}")
        if not 2 <= self.min_requests <= self.max_requests:
            raise ValueError("need 2 <= min_requests <= max_requests")


@dataclass(frozen=True)
class Outcome:
    replicas: int
    loads_per_1000: float  # adapter loads per 1,000 requests, second half of the run
    wait_p99_s: float  # second half of the run
    utilization: float  # the replicas' mean busy share, second half of the run
    requests: int  # simulated, both halves


def simulate(figures: ReplicaFigures, scenario: Scenario, routing: Routing, replicas: int) -> Outcome:
    """One run at a given replica count."""
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    s, n = scenario, replicas
    # Long enough that every replica's LRU turns over a few times in the first half.
    count = min(s.max_requests, max(s.min_requests, 4 * n * figures.resident, 4 * s.adapters))
    rng = random.Random(s.seed)
    picks = rng.choices(range(s.adapters), cum_weights=cumulative_weights(s.popularity, s.adapters, s.alpha),
                        k=count)
    service = 1.0 / figures.requests_per_s
    backlog = [0.0] * n  # seconds of work queued at `updated[r]`
    updated = [0.0] * n
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(n)]
    holders: dict[int, set[int]] = {}
    busy = 0.0
    waits: list[float] = []
    loads, half, t, started = 0, count // 2, 0.0, 0.0
    affinity = routing is Routing.AFFINITY

    def pending(r: int) -> float:
        return max(0.0, backlog[r] - (t - updated[r]))

    def power_of_two() -> int:
        a, b = rng.randrange(n), rng.randrange(n)
        return a if pending(a) <= pending(b) else b

    for i, adapter in enumerate(picks):
        t += rng.expovariate(s.rate)
        if i == half:
            started = t
        chosen = power_of_two()
        if affinity and (held := holders.get(adapter)) and chosen not in held:
            best = min(held, key=pending)
            if pending(best) <= pending(chosen) + s.spill_s:
                chosen = best
        cache, cost = caches[chosen], service
        if adapter in cache:
            cache.move_to_end(adapter)
        else:
            cost += figures.load_s
            loads += i >= half
            cache[adapter] = None
            holders.setdefault(adapter, set()).add(chosen)
            if len(cache) > figures.resident:
                evicted, _ = cache.popitem(last=False)
                holders[evicted].discard(chosen)
        wait = pending(chosen)
        backlog[chosen] = wait + cost
        updated[chosen] = t
        if i >= half:
            busy += cost
            waits.append(wait)
    waits.sort()
    return Outcome(n, 1000.0 * loads / len(waits), waits[int(0.99 * (len(waits) - 1))],
                   busy / n / max(t - started, 1e-12), count)


def replicas_needed(figures: ReplicaFigures, scenario: Scenario, routing: Routing) -> Outcome:
    """The run at the smallest replica count that is enough (see the module's docstring)."""
    service = 1.0 / figures.requests_per_s

    def enough(n: int) -> Outcome | None:
        outcome = simulate(figures, scenario, routing, n)
        return outcome if outcome.wait_p99_s <= scenario.max_wait_s else None

    low = max(1, math.ceil(scenario.rate * service))
    high = math.ceil(scenario.rate * (service + figures.load_s) / _HIGH_UTILIZATION) + 1
    best = enough(high)
    while best is None:  # random imbalance: the every-request-loads count was not quite enough
        low, high = high + 1, 2 * high
        best = enough(high)
    while low < high:
        middle = (low + high) // 2
        if (outcome := enough(middle)) is not None:
            best, high = outcome, middle
        else:
            low = middle + 1
    return best
