"""Connection-pool limits (Envoy's per-cluster circuit breakers), as counters.

One `ConnectionPoolLimits` per cluster holds four resources, each with `try_acquire()` and
`release()`:

- `requests`: requests in flight to the cluster (max_requests);
- `pending`: requests waiting for an upstream connection (max_pending_requests);
- `connections`: open upstream connections (max_connections);
- `retries`: retries in flight, bounded by the retry budget, which grows with
  active + pending requests (see policy/retry.py `max_active_retries`).

`try_acquire()` raises `Overflow` at the limit. The shell answers a request whose `requests`
or `pending` acquisition overflowed with 503 and flag UO; at the `connections` limit it
queues the request as pending instead (Envoy's connection pool), and a `retries` overflow
means no retry (the last answer goes back with flag UO). Every successful acquire must be
paired with one release, in a `finally`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from waypoint.config.model import Limits
from waypoint.policy.retry import max_active_retries


class Overflow(Exception):
    """A circuit-breaker limit of a cluster is reached (503, flag UO)."""

    status: ClassVar[int] = 503
    response_flag: ClassVar[str] = "UO"

    def __init__(self, cluster: str, resource: str, limit: int) -> None:
        super().__init__(
            f"cluster {cluster}: {resource} limit of {limit} reached "
            "(hint: raise the DestinationRule's connectionPool settings or add capacity)"
        )
        self.cluster = cluster
        self.resource = resource
        self.limit = limit


class Resource:
    """A counted resource with a (possibly changing) maximum."""

    def __init__(self, cluster: str, name: str, maximum: Callable[[], int]) -> None:
        self._cluster = cluster
        self._name = name
        self._maximum = maximum
        self.count = 0

    @property
    def maximum(self) -> int:
        return self._maximum()

    def can_acquire(self) -> bool:
        return self.count < self._maximum()

    def try_acquire(self) -> None:
        """Take one unit, or raise Overflow if all are taken."""
        limit = self._maximum()
        if self.count >= limit:
            raise Overflow(self._cluster, self._name, limit)
        self.count += 1

    def release(self) -> None:
        if self.count <= 0:
            raise RuntimeError(f"cluster {self._cluster}: {self._name} released more than taken")
        self.count -= 1


@dataclass(frozen=True, slots=True)
class LimitsStatistics:
    active_requests: int
    pending_requests: int
    connections: int
    active_retries: int


class ConnectionPoolLimits:
    """The circuit-breaker accounting of one cluster."""

    def __init__(self, cluster: str, limits: Limits) -> None:
        self.cluster = cluster
        self.limits = limits
        self.requests = Resource(cluster, "max_requests", lambda: self.limits.max_requests)
        self.pending = Resource(cluster, "max_pending_requests", lambda: self.limits.max_pending)
        self.connections = Resource(cluster, "max_connections", lambda: self.limits.max_connections)
        self.retries = Resource(cluster, "retry budget", self._max_retries)

    def reconfigure(self, limits: Limits) -> None:
        """Apply a Cluster update; what is in flight stays counted against the new limits."""
        self.limits = limits

    def _max_retries(self) -> int:
        return max_active_retries(self.limits.retry_budget, self.requests.count, self.pending.count)

    def statistics(self) -> LimitsStatistics:
        return LimitsStatistics(
            active_requests=self.requests.count,
            pending_requests=self.pending.count,
            connections=self.connections.count,
            active_retries=self.retries.count,
        )
