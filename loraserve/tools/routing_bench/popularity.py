"""Which adapter a request names: uniform, or Zipf (power law, as S-LoRA's workloads). Pure Python, seeded:
the benchmark replays the same sequence under both routings, and the simulation draws from the same law."""

from __future__ import annotations

import enum
import itertools
import random


class Popularity(enum.Enum):
    UNIFORM = "uniform"
    POWERLAW = "powerlaw"  # adapter k (0-based) drawn with weight (k + 1) ** -alpha


def cumulative_weights(popularity: Popularity, adapters: int, alpha: float) -> list[float]:
    """For `random.choices(cum_weights=...)`: a bisection per draw, whatever the adapter count."""
    if adapters < 1:
        raise ValueError("adapters must be >= 1")
    if alpha < 0:
        raise ValueError("alpha must be >= 0")
    weights = ([1.0] * adapters if popularity is Popularity.UNIFORM
               else [(k + 1) ** -alpha for k in range(adapters)])
    return list(itertools.accumulate(weights))


def draw(popularity: Popularity, adapters: int, alpha: float, count: int, rng: random.Random) -> list[int]:
    """`count` adapter indexes, most popular first in index order (0 is the hottest under a power law)."""
    return rng.choices(range(adapters), cum_weights=cumulative_weights(popularity, adapters, alpha), k=count)
