"""The routing benchmark's simulation and popularity draws: pure Python, milliseconds."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from loraserve.tools.routing_bench.popularity import Popularity, cumulative_weights, draw
from loraserve.tools.routing_bench.simulate import (
    ReplicaFigures,
    Routing,
    Scenario,
    replicas_needed,
    simulate,
)

SMALL = {"min_requests": 2000, "max_requests": 8000}


def test_a_power_law_favours_the_first_adapters_and_uniform_does_not() -> None:
    hot = Counter(draw(Popularity.POWERLAW, 50, 1.0, 5000, random.Random(0)))
    flat = Counter(draw(Popularity.UNIFORM, 50, 1.0, 5000, random.Random(0)))
    assert hot.most_common(1)[0][0] == 0 and hot[0] > 5 * hot[9]
    assert max(flat.values()) < 3 * min(flat.values())
    assert draw(Popularity.POWERLAW, 50, 1.0, 100, random.Random(7)) == draw(
        Popularity.POWERLAW, 50, 1.0, 100, random.Random(7))
    with pytest.raises(ValueError):
        cumulative_weights(Popularity.UNIFORM, 0, 1.0)


def test_affinity_keeps_adapters_that_fit_while_power_of_two_churns() -> None:
    # Two replicas of 60 hold 100 adapters between them; each alone would need all 100.
    figures = ReplicaFigures(requests_per_s=50.0, load_s=0.001, resident=60)
    scenario = Scenario(rate=60.0, adapters=100, popularity=Popularity.UNIFORM, **SMALL)
    affinity = simulate(figures, scenario, Routing.AFFINITY, 2)
    blind = simulate(figures, scenario, Routing.POWER_OF_TWO, 2)
    assert affinity.loads_per_1000 < 20
    assert 300 < blind.loads_per_1000 < 500  # about 1 - 60/100 of the requests miss
    assert simulate(figures, scenario, Routing.AFFINITY, 2) == affinity  # seeded


def test_the_rate_alone_sets_the_count_when_loads_cost_nothing() -> None:
    figures = ReplicaFigures(requests_per_s=10.0, load_s=0.0, resident=10)
    for routing in Routing:
        outcome = replicas_needed(figures, Scenario(rate=25.0, adapters=500, popularity=Popularity.UNIFORM,
                                                    **SMALL), routing)
        assert 3 <= outcome.replicas <= 4  # 2.5 replicas of work, and a queue short enough
        assert outcome.wait_p99_s <= 1.0


def test_costly_loads_need_more_replicas_without_affinity() -> None:
    # 200 adapters fit in 4 replicas of 50: with affinity the rate sets the count; without, three
    # requests in four load (0.2 s each, twice a request's work).
    figures = ReplicaFigures(requests_per_s=10.0, load_s=0.2, resident=50)
    scenario = Scenario(rate=40.0, adapters=200, popularity=Popularity.UNIFORM, **SMALL)
    affinity = replicas_needed(figures, scenario, Routing.AFFINITY)
    blind = replicas_needed(figures, scenario, Routing.POWER_OF_TWO)
    assert blind.replicas > affinity.replicas + 3
    assert blind.loads_per_1000 > 10 * affinity.loads_per_1000


@pytest.mark.parametrize("bad", [{"requests_per_s": 0.0}, {"load_s": -1.0}, {"resident": 0}])
def test_figures_are_checked(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ReplicaFigures(**{"requests_per_s": 1.0, "load_s": 0.0, "resident": 1, **bad})


@pytest.mark.parametrize("bad", [{"rate": 0.0}, {"adapters": 0}, {"alpha": -1.0}, {"max_wait_s": 0.0},
                                 {"spill_s": 2.0}, {"min_requests": 1}])
def test_scenarios_are_checked(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Scenario(**{"rate": 1.0, "adapters": 1, "popularity": Popularity.UNIFORM, **bad})  # type: ignore[arg-type]
