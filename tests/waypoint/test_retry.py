"""Retry decisions: which outcomes retry_on covers, how many tries, backoff, retry budget."""

from __future__ import annotations

import random

import pytest

from waypoint.config.model import RetryBudget
from waypoint.policy.retry import (
    Outcome,
    RetryPolicy,
    UpstreamFailure,
    backoff,
    is_retriable,
    max_active_retries,
    should_retry,
)

CONNECT_FAILURE, RESET, REFUSED_STREAM, TIMEOUT = UpstreamFailure


def status(code: int, grpc_status: int | None = None) -> Outcome:
    return Outcome(status=code, grpc_status=grpc_status)


def failed(failure: UpstreamFailure) -> Outcome:
    return Outcome(failure=failure)


def test_a_flaky_backends_503s_are_retried_until_it_answers_200() -> None:
    """VirtualService retries {attempts: 3, retryOn: 5xx}: 503, 503, 200 ends in 200."""
    policy = RetryPolicy(num_retries=3, retry_on=frozenset({"5xx"}))
    responses = iter([503, 503, 200])
    attempt, outcome = 1, status(next(responses))
    while should_retry(policy, attempt, outcome):
        attempt, outcome = attempt + 1, status(next(responses))
    assert (attempt, outcome.status) == (3, 200)


def test_retries_stop_after_num_retries() -> None:
    policy = RetryPolicy(num_retries=2, retry_on=frozenset({"5xx"}))
    assert should_retry(policy, 1, status(503))
    assert should_retry(policy, 2, status(503))
    assert not should_retry(policy, 3, status(503))  # two retries done: URX
    assert is_retriable(policy, status(503))
    assert not should_retry(RetryPolicy(num_retries=0, retry_on=frozenset({"5xx"})), 1, status(503))


def test_success_and_client_errors_are_not_retried() -> None:
    policy = RetryPolicy(num_retries=5, retry_on=frozenset({"5xx", "gateway-error"}))
    for code in (200, 204, 301, 400, 404, 409, 429):
        assert not should_retry(policy, 1, status(code))


def test_nothing_is_retried_without_retry_on() -> None:
    policy = RetryPolicy(num_retries=3)
    assert not should_retry(policy, 1, status(503))
    assert not should_retry(policy, 1, failed(CONNECT_FAILURE))


@pytest.mark.parametrize(
    ("retry_on", "outcome", "expected"),
    [
        ("5xx", status(500), True),
        ("5xx", status(599), True),
        ("5xx", failed(RESET), True),
        ("5xx", failed(TIMEOUT), True),  # a per-try timeout counts as a 5xx
        ("5xx", failed(CONNECT_FAILURE), True),
        ("gateway-error", status(500), False),
        ("gateway-error", status(502), True),
        ("gateway-error", status(503), True),
        ("gateway-error", status(504), True),
        ("gateway-error", failed(TIMEOUT), True),
        ("reset", failed(RESET), True),
        ("reset", failed(TIMEOUT), True),
        ("reset", status(503), False),
        ("connect-failure", failed(CONNECT_FAILURE), True),
        ("connect-failure", failed(RESET), False),
        ("connect-failure", failed(TIMEOUT), False),
        ("connect-failure", status(503), False),
        ("refused-stream", failed(REFUSED_STREAM), True),
        ("refused-stream", failed(RESET), False),
        ("retriable-4xx", status(409), True),
        ("retriable-4xx", status(404), False),
        ("retriable-status-codes", status(418), True),
        ("retriable-status-codes", status(503), False),
        ("unavailable", status(200, grpc_status=14), True),
        ("unavailable", status(200, grpc_status=13), False),
        ("internal", status(200, grpc_status=13), True),
        ("cancelled", status(200, grpc_status=1), True),
        ("deadline-exceeded", status(200, grpc_status=4), True),
        ("resource-exhausted", status(200, grpc_status=8), True),
        ("unavailable", status(200, grpc_status=0), False),
        ("unavailable", failed(RESET), False),
    ],
)
def test_retry_on_conditions(retry_on: str, outcome: Outcome, expected: bool) -> None:
    policy = RetryPolicy(
        num_retries=1, retry_on=frozenset({retry_on}), retriable_status_codes=frozenset({418})
    )
    assert should_retry(policy, 1, outcome) is expected


def test_unknown_retry_on_values_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"unsupported retry_on value.*retriable-headers"):
        RetryPolicy(retry_on=frozenset({"5xx", "retriable-headers"}))


def test_an_outcome_is_a_status_or_a_failure() -> None:
    with pytest.raises(ValueError):
        Outcome()
    with pytest.raises(ValueError):
        Outcome(status=503, failure=RESET)


def test_backoff_is_fully_jittered_and_doubles_up_to_ten_times_the_base() -> None:
    policy = RetryPolicy(num_retries=10, retry_on=frozenset({"5xx"}))  # base 25 ms
    rng = random.Random(7)
    for retry, cap in [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (9, 0.25)]:
        waits = [backoff(policy, retry, rng) for _ in range(200)]
        assert all(0 <= w < cap + 1e-12 for w in waits)
        assert max(waits) > cap * 0.8  # uses the whole range


def test_backoff_honours_configured_intervals() -> None:
    policy = RetryPolicy(base_interval=0.1, max_interval=0.15)

    class Top(random.Random):
        def random(self) -> float:
            return 0.999

    assert backoff(policy, 1, Top()) == pytest.approx(0.0999)
    assert backoff(policy, 3, Top()) == pytest.approx(0.14985)
    with pytest.raises(ValueError, match="shorter than the base"):
        RetryPolicy(base_interval=0.1, max_interval=0.05)


def test_retry_budget_is_a_share_of_active_and_pending_requests_with_a_floor() -> None:
    envoy_budget = RetryBudget()  # 20 %, at least 3
    assert max_active_retries(envoy_budget, 0, 0) == 3
    assert max_active_retries(envoy_budget, 10, 0) == 3
    assert max_active_retries(envoy_budget, 100, 0) == 20
    assert max_active_retries(envoy_budget, 80, 20) == 20
    assert max_active_retries(envoy_budget, 104, 0) == 20  # rounded down
    # Envoy's fixed max_retries (default 3) is a budget without the share.
    assert max_active_retries(RetryBudget(0.0, 3), 1000, 0) == 3
