"""Weighted choice of a route's backend, per request (Envoy's `weighted_clusters`).

Envoy draws a number in [0, total weight) and walks the clusters' cumulative weights; so do
we, with the random source passed in. A weight of 0 keeps a backend configured but unused
(a canary at 0 %). Weights are validated where routes are built (`RouteAction`), so a
route always has a backend that can be chosen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from waypoint.config.model import WeightedBackend


def choose_backend(backends: Sequence[WeightedBackend], rng: random.Random) -> WeightedBackend:
    """Pick one of `backends` with probability weight / total weight."""
    if len(backends) == 1:
        return backends[0]
    total = sum(backend.weight for backend in backends)
    if total <= 0:
        raise ValueError("backend weights add up to 0: no backend can be chosen")
    draw = rng.randrange(total)
    for backend in backends:
        if draw < backend.weight:
            return backend
        draw -= backend.weight
    raise AssertionError("unreachable: the draw is below the total weight")
