"""Connection-pool limits: requests, pending requests, connections and retries per cluster."""

from __future__ import annotations

import pytest

from waypoint.config.model import Limits, RetryBudget
from waypoint.policy.limits import ConnectionPoolLimits, LimitsStatistics, Overflow

CLUSTER = "outbound|80||api.default.svc.cluster.local"


def test_requests_beyond_max_requests_overflow_with_503_uo() -> None:
    limits = ConnectionPoolLimits(CLUSTER, Limits(max_requests=2))
    limits.requests.try_acquire()
    limits.requests.try_acquire()
    with pytest.raises(Overflow) as raised:
        limits.requests.try_acquire()
    error = raised.value
    assert (error.status, error.response_flag) == (503, "UO")
    assert (error.cluster, error.resource, error.limit) == (CLUSTER, "max_requests", 2)
    assert CLUSTER in str(error) and "max_requests limit of 2" in str(error)
    # A finished request makes room again.
    limits.requests.release()
    limits.requests.try_acquire()
    assert limits.statistics().active_requests == 2


def test_pending_requests_overflow_at_max_pending() -> None:
    limits = ConnectionPoolLimits(CLUSTER, Limits(max_pending=1))
    limits.pending.try_acquire()
    with pytest.raises(Overflow, match="max_pending_requests limit of 1"):
        limits.pending.try_acquire()


def test_at_max_connections_a_request_has_to_wait_as_pending() -> None:
    limits = ConnectionPoolLimits(CLUSTER, Limits(max_connections=1, max_pending=1))
    assert limits.connections.can_acquire()
    limits.connections.try_acquire()
    assert not limits.connections.can_acquire()
    limits.pending.try_acquire()  # the shell queues it
    with pytest.raises(Overflow):
        limits.pending.try_acquire()  # a second waiter overflows
    limits.connections.release()
    assert limits.connections.can_acquire()


def test_retries_are_bounded_by_the_budget_which_grows_with_load() -> None:
    limits = ConnectionPoolLimits(CLUSTER, Limits(retry_budget=RetryBudget(20.0, 3)))
    for _ in range(3):
        limits.retries.try_acquire()
    with pytest.raises(Overflow, match="retry budget limit of 3"):
        limits.retries.try_acquire()
    for _ in range(25):
        limits.requests.try_acquire()
    assert limits.retries.maximum == 5  # 20 % of 25 active
    limits.retries.try_acquire()
    limits.retries.try_acquire()
    with pytest.raises(Overflow):
        limits.retries.try_acquire()


def test_default_limits_are_envoys() -> None:
    limits = ConnectionPoolLimits(CLUSTER, Limits())
    assert limits.requests.maximum == limits.pending.maximum == limits.connections.maximum == 1024
    assert limits.retries.maximum == 3


def test_reconfigure_keeps_what_is_in_flight() -> None:
    limits = ConnectionPoolLimits(CLUSTER, Limits(max_requests=10))
    for _ in range(5):
        limits.requests.try_acquire()
    limits.reconfigure(Limits(max_requests=5))
    with pytest.raises(Overflow):
        limits.requests.try_acquire()
    limits.requests.release()
    limits.requests.try_acquire()
    assert limits.statistics() == LimitsStatistics(
        active_requests=5, pending_requests=0, connections=0, active_retries=0
    )


def test_releasing_more_than_was_taken_is_a_bug() -> None:
    limits = ConnectionPoolLimits(CLUSTER, Limits())
    with pytest.raises(RuntimeError, match="released more than taken"):
        limits.requests.release()
