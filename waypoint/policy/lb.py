"""Load balancing over a cluster's endpoints, as Envoy's ROUND_ROBIN, LEAST_REQUEST and
RANDOM load balancers do it.

The caller passes the candidates (the cluster's endpoints minus the outlier-ejected ones);
endpoints that EDS marks unhealthy are skipped here, and with nothing left `choose` raises
`NoHealthyUpstream` (503, flag UH). Panic routing is Envoy's: when the usable endpoints
are fewer than `panic_threshold` % of all of them (`panic_from`, the cluster's full list),
every endpoint is a candidate again, healthy or not, ejected or not; a threshold of 0
(Istio's setting with outlier detection) turns it off.

- ROUND_ROBIN: smooth weighted round robin, so endpoints take turns in proportion to their
  weight (strict rotation when weights are equal). The turn state starts over whenever the
  candidate set changes, as Envoy rebuilds its scheduler on host changes.
- LEAST_REQUEST: power of two choices. Two endpoints are drawn at random (with
  replacement) and the one with fewer active requests wins; a tie keeps the first draw.
  Weights are not considered (Envoy switches to a weighted scheduler when they differ).
- RANDOM: uniform over the candidates (Envoy's random LB ignores weights too).

Active requests per endpoint are counted here: call `request_started` when a request is
sent to the chosen endpoint and `request_finished` when it ends, in a `finally`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

from waypoint.config.model import Endpoint, LbPolicy

Key = tuple[str, int]


class NoHealthyUpstream(Exception):
    """A cluster has no endpoint to send a request to (503, flag UH)."""

    status: ClassVar[int] = 503
    response_flag: ClassVar[str] = "UH"

    def __init__(self, cluster: str, endpoints: int, ejected: int = 0) -> None:
        super().__init__(
            f"cluster {cluster}: no healthy upstream ({endpoints} endpoints known, "
            f"{ejected} ejected by outlier detection; hint: check the pods are ready and "
            "that the DestinationRule's subset labels select them)"
        )
        self.cluster = cluster


class LoadBalancer:
    """Chooses endpoints of one cluster and counts their active requests."""

    def __init__(
        self,
        cluster: str,
        policy: LbPolicy,
        *,
        rng: random.Random,
        panic_threshold: float = 0.0,
    ) -> None:
        self.cluster = cluster
        self.policy = policy
        self.panic_threshold = panic_threshold
        self._rng = rng
        self._active: dict[Key, int] = {}
        # Smooth weighted round robin: the candidate keys the turns were computed for, and
        # each one's current turn weight.
        self._rr_keys: tuple[Key, ...] = ()
        self._rr_current: list[int] = []

    def choose(
        self,
        candidates: Sequence[Endpoint],
        *,
        ejected: int = 0,
        panic_from: Sequence[Endpoint] = (),
    ) -> Endpoint:
        """Pick an endpoint for one request among the healthy `candidates`, or among all of
        `panic_from` in panic. `ejected` only enriches the error message."""
        healthy = [endpoint for endpoint in candidates if endpoint.healthy]
        if panic_from and 100 * len(healthy) < self.panic_threshold * len(panic_from):
            healthy = list(panic_from)
        if not healthy:
            raise NoHealthyUpstream(self.cluster, len(candidates) + ejected, ejected)
        if len(healthy) == 1:
            return healthy[0]
        match self.policy:
            case LbPolicy.ROUND_ROBIN:
                return self._round_robin(healthy)
            case LbPolicy.LEAST_REQUEST:
                return self._least_request(healthy)
            case _:
                return healthy[self._rng.randrange(len(healthy))]

    def active_requests(self, endpoint: Endpoint) -> int:
        return self._active.get(endpoint.key, 0)

    def request_started(self, endpoint: Endpoint) -> None:
        self._active[endpoint.key] = self._active.get(endpoint.key, 0) + 1

    def request_finished(self, endpoint: Endpoint) -> None:
        remaining = self._active.get(endpoint.key, 0) - 1
        if remaining > 0:
            self._active[endpoint.key] = remaining
        else:
            self._active.pop(endpoint.key, None)

    def _round_robin(self, healthy: list[Endpoint]) -> Endpoint:
        keys = tuple(endpoint.key for endpoint in healthy)
        if keys != self._rr_keys:
            self._rr_keys = keys
            self._rr_current = [0] * len(keys)
        current = self._rr_current
        total = 0
        best = 0
        for i, endpoint in enumerate(healthy):
            current[i] += endpoint.weight
            total += endpoint.weight
            if current[i] > current[best]:
                best = i
        current[best] -= total
        return healthy[best]

    def _least_request(self, healthy: list[Endpoint]) -> Endpoint:
        first = healthy[self._rng.randrange(len(healthy))]
        second = healthy[self._rng.randrange(len(healthy))]
        return second if self.active_requests(second) < self.active_requests(first) else first
