"""Outlier detection: eject endpoints that keep failing, with Envoy's consecutive-5xx rules
(source/common/upstream/outlier_detection_impl.cc).

Theory of operation
  - Every finished attempt is `record`ed for its endpoint: a 5xx status, or a failure
    without a response (connect failure and reset count as 503, a per-try timeout as 504,
    as Envoy counts them when local and external errors are not split), bumps the
    endpoint's consecutive-5xx counter; any other status resets it.
  - When the counter reaches `consecutive_5xx` the endpoint is ejected, unless that would
    make more than `max_ejection_percent` % of the cluster's endpoints ejected; either way
    the counter starts again from 0. A second counter, of consecutive gateway errors (502,
    503, 504; any other status resets it), ejects the same way at
    `consecutive_gateway_failure` when that detector is on.
  - Ejection lasts min(base_ejection_time * backoff, max_ejection_time). `backoff` grows by
    one per ejection and shrinks by one per `interval` tick the endpoint spends healthy
    since it came back, so an endpoint that keeps failing stays out longer each time.
  - Envoy checks for un-ejection on a timer every `interval`, so an endpoint returns at the
    first tick at or after its ejection time has passed. The ticks here are computed
    lazily from the injected clock (the first one `interval` after construction), which
    gives the same results without a timer task.

Only the consecutive detectors are implemented: success-rate and failure-percentage
ejection (Envoy defaults that need 5+ endpoints with 100+ requests each per interval) are
not (Istio turns success-rate enforcement off).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from waypoint.config.model import Endpoint, OutlierConfig
from waypoint.policy.retry import UpstreamFailure

Key = tuple[str, int]

# How Envoy maps failures without a response to a status when errors are not split.
_FAILURE_STATUS = {
    UpstreamFailure.CONNECT_FAILURE: 503,
    UpstreamFailure.RESET: 503,
    UpstreamFailure.REFUSED_STREAM: 503,
    UpstreamFailure.TIMEOUT: 504,
}
_GATEWAY_ERRORS = frozenset({502, 503, 504})


@dataclass(slots=True)
class _EndpointState:
    consecutive_5xx: int = 0
    consecutive_gateway_failure: int = 0
    ejected_at: float | None = None
    backoff: int = 0
    unejected_at: float | None = None
    ejections: int = 0


@dataclass(frozen=True, slots=True)
class OutlierStatistics:
    endpoints: int
    ejected: int
    ejections_total: int  # enforced ejections since the detector started
    ejections_overflow: int  # ejections skipped because of max_ejection_percent


class OutlierDetector:
    """Outlier state of one cluster. `clock` returns monotonic seconds (trio.current_time)."""

    def __init__(
        self,
        config: OutlierConfig,
        endpoints: Iterable[Endpoint],
        *,
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._clock = clock
        self._next_tick = clock() + config.interval
        self._states: dict[Key, _EndpointState] = {}
        self._ejections_total = 0
        self._ejections_overflow = 0
        self.update_endpoints(endpoints)

    def update_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """Follow a ClusterLoadAssignment update: new endpoints start clean, state of the
        ones still present is kept, removed ones are forgotten."""
        keys = {endpoint.key for endpoint in endpoints}
        self._states = {key: self._states.get(key) or _EndpointState() for key in keys}

    def record(self, endpoint: Endpoint, result: int | UpstreamFailure) -> None:
        """Count how an attempt to `endpoint` ended: a response status or a failure."""
        now = self._clock()
        self._run_ticks(now)
        state = self._states.get(endpoint.key)
        if state is None:
            return  # removed by an update while its request was in flight
        status = _FAILURE_STATUS[result] if isinstance(result, UpstreamFailure) else result
        if not 500 <= status <= 599:
            state.consecutive_5xx = state.consecutive_gateway_failure = 0
            return
        config = self._config
        if status in _GATEWAY_ERRORS:
            state.consecutive_gateway_failure += 1
            gateway_threshold = config.consecutive_gateway_failure
            if (
                gateway_threshold
                and state.consecutive_gateway_failure >= gateway_threshold
                and state.ejected_at is None
            ):
                self._try_eject(state, now)
                state.consecutive_gateway_failure = 0
        else:
            state.consecutive_gateway_failure = 0
        state.consecutive_5xx += 1
        threshold = config.consecutive_5xx
        if threshold and state.consecutive_5xx >= threshold and state.ejected_at is None:
            self._try_eject(state, now)
            state.consecutive_5xx = 0

    def is_ejected(self, endpoint: Endpoint) -> bool:
        self._run_ticks(self._clock())
        state = self._states.get(endpoint.key)
        return state is not None and state.ejected_at is not None

    def healthy(self, endpoints: Iterable[Endpoint]) -> list[Endpoint]:
        """`endpoints` without the ejected ones (EDS health is the load balancer's business)."""
        self._run_ticks(self._clock())
        return [
            endpoint
            for endpoint in endpoints
            if (state := self._states.get(endpoint.key)) is None or state.ejected_at is None
        ]

    def statistics(self) -> OutlierStatistics:
        self._run_ticks(self._clock())
        return OutlierStatistics(
            endpoints=len(self._states),
            ejected=self._ejected_count(),
            ejections_total=self._ejections_total,
            ejections_overflow=self._ejections_overflow,
        )

    # --- Ejection and the interval ticks ---

    def _ejected_count(self) -> int:
        return sum(1 for state in self._states.values() if state.ejected_at is not None)

    def _try_eject(self, state: _EndpointState, now: float) -> None:
        config = self._config
        ejected_percent = 100.0 * (self._ejected_count() + 1) / len(self._states)
        if ejected_percent > config.max_ejection_percent:
            self._ejections_overflow += 1
            return
        state.ejected_at = now
        state.ejections += 1
        self._ejections_total += 1
        # Envoy stops growing the backoff once it alone exceeds the max ejection time.
        if state.backoff * config.base_ejection_time < (
            config.max_ejection_time + config.base_ejection_time
        ):
            state.backoff += 1

    def _run_ticks(self, now: float) -> None:
        interval = self._config.interval
        while self._next_tick <= now:
            if not any(s.ejected_at is not None or s.backoff for s in self._states.values()):
                # Nothing a tick could change: skip the missed ticks at once.
                missed = int((now - self._next_tick) // interval) + 1
                self._next_tick += missed * interval
                return
            self._tick(self._next_tick)
            self._next_tick += interval

    def _tick(self, tick: float) -> None:
        config = self._config
        for state in self._states.values():
            if state.ejected_at is None:
                continue
            duration = min(config.base_ejection_time * state.backoff, config.max_ejection_time)
            if tick - state.ejected_at >= duration:
                state.ejected_at = None
                state.consecutive_5xx = state.consecutive_gateway_failure = 0
                state.unejected_at = tick
        for state in self._states.values():
            if (
                state.ejected_at is None
                and state.backoff
                and state.unejected_at is not None
                and tick - state.unejected_at >= config.interval
            ):
                state.backoff -= 1
