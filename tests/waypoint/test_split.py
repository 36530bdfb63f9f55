"""Weighted backend choice per request (canary splits)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from waypoint.config.model import RouteAction, WeightedBackend
from waypoint.routing.split import choose_backend

STABLE = WeightedBackend("outbound|80|stable|api.default.svc.cluster.local", 90)
CANARY = WeightedBackend("outbound|80|canary|api.default.svc.cluster.local", 10)


def test_a_90_10_canary_lands_within_3_points_of_90_percent_over_2000_requests() -> None:
    rng = random.Random(20240605)
    counts = Counter(choose_backend((STABLE, CANARY), rng).cluster for _ in range(2000))
    stable_share = counts[STABLE.cluster] / 2000
    assert 0.87 <= stable_share <= 0.93
    assert counts[CANARY.cluster] > 0


def test_every_draw_maps_to_the_backend_owning_that_slice_of_the_total_weight() -> None:
    class Draw(random.Random):
        def __init__(self, value: int) -> None:
            super().__init__()
            self.value = value

        def randrange(self, stop: int) -> int:  # type: ignore[override]
            assert stop == 100
            return self.value

    assert choose_backend((STABLE, CANARY), Draw(0)) is STABLE
    assert choose_backend((STABLE, CANARY), Draw(89)) is STABLE
    assert choose_backend((STABLE, CANARY), Draw(90)) is CANARY
    assert choose_backend((STABLE, CANARY), Draw(99)) is CANARY


def test_a_zero_weight_backend_is_never_chosen() -> None:
    off = WeightedBackend("off", 0)
    rng = random.Random(1)
    assert {choose_backend((off, STABLE), rng) for _ in range(500)} == {STABLE}


def test_a_single_backend_takes_everything_without_drawing() -> None:
    class NoDraws(random.Random):
        def randrange(self, *args: object, **kwargs: object) -> int:  # type: ignore[override]
            raise AssertionError("no draw needed for a single backend")

    assert choose_backend((CANARY,), NoDraws()) is CANARY


def test_weights_are_validated_where_routes_are_built() -> None:
    with pytest.raises(ValueError, match="negative"):
        WeightedBackend("c", -1)
    with pytest.raises(ValueError, match="add up to 0"):
        RouteAction((WeightedBackend("a", 0), WeightedBackend("b", 0)))
    with pytest.raises(ValueError, match="at least one backend"):
        RouteAction(())
    with pytest.raises(ValueError, match="add up to 0"):
        choose_backend((WeightedBackend("a", 0), WeightedBackend("b", 0)), random.Random())
