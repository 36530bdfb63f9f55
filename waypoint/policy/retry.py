"""Retry decisions with Envoy's semantics (source/common/router/retry_state_impl.cc).

An attempt ends in an `Outcome`: a response (status, and grpc-status when the response
carried one in its headers) or an `UpstreamFailure`. `retry_on` decides which outcomes are
retriable:

- 5xx: any 5xx response, and every failure (connect failure, reset, refused stream,
  per-try timeout: Envoy counts them all as "5xx");
- gateway-error: 502, 503, 504, and every failure, like 5xx;
- reset: every failure, no response status;
- connect-failure: a failed connect; refused-stream: an HTTP/2 REFUSED_STREAM;
- retriable-4xx: 409; retriable-status-codes: the policy's `retriable_status_codes`;
- cancelled, deadline-exceeded, internal, resource-exhausted, unavailable: that grpc-status.

A retriable outcome is retried while retries remain (`num_retries`); when none remain the
answer carries flag URX. Each retry also needs room in the cluster's retry budget
(`max_active_retries`, accounted in `policy.limits`); without room the answer is the last
outcome with flag UO. Between tries Envoy waits a fully jittered exponential backoff
(`backoff`).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from waypoint.config.model import RetryBudget, RetryPolicy

__all__ = [
    "Outcome",
    "RetryPolicy",
    "UpstreamFailure",
    "backoff",
    "is_retriable",
    "max_active_retries",
    "should_retry",
]

_GATEWAY_ERRORS = frozenset({502, 503, 504})
_CONFLICT = 409
_GRPC_RETRY_ON = {
    1: "cancelled",
    4: "deadline-exceeded",
    8: "resource-exhausted",
    13: "internal",
    14: "unavailable",
}
# Failures every one of these conditions retries (Envoy treats a reset as a "5xx").
_ANY_FAILURE = frozenset({"5xx", "gateway-error", "reset"})


class UpstreamFailure(enum.Enum):
    """An attempt that produced no response head."""

    CONNECT_FAILURE = "connect-failure"  # connection or HBONE tunnel not opened (flag UF)
    RESET = "reset"  # reset or closed before the response head
    REFUSED_STREAM = "refused-stream"  # HTTP/2 REFUSED_STREAM: not processed upstream
    TIMEOUT = "timeout"  # the per-try timeout expired


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended: a response `status` (with `grpc_status` if its headers carried
    one), or a `failure`."""

    status: int | None = None
    grpc_status: int | None = None
    failure: UpstreamFailure | None = None

    def __post_init__(self) -> None:
        if (self.status is None) == (self.failure is None):
            raise ValueError("an outcome is either a response status or a failure")


def is_retriable(policy: RetryPolicy, outcome: Outcome) -> bool:
    """Whether `policy.retry_on` covers `outcome`, retries left or not."""
    retry_on = policy.retry_on
    if outcome.failure is not None:
        return (
            not retry_on.isdisjoint(_ANY_FAILURE)
            or (
                outcome.failure is UpstreamFailure.CONNECT_FAILURE and "connect-failure" in retry_on
            )
            or (outcome.failure is UpstreamFailure.REFUSED_STREAM and "refused-stream" in retry_on)
        )
    status = outcome.status
    assert status is not None
    return (
        ("5xx" in retry_on and 500 <= status <= 599)
        or ("gateway-error" in retry_on and status in _GATEWAY_ERRORS)
        or ("retriable-4xx" in retry_on and status == _CONFLICT)
        or ("retriable-status-codes" in retry_on and status in policy.retriable_status_codes)
        or (
            outcome.grpc_status in _GRPC_RETRY_ON
            and _GRPC_RETRY_ON[outcome.grpc_status] in retry_on
        )
    )


def should_retry(policy: RetryPolicy, attempt: int, outcome: Outcome) -> bool:
    """Whether to try again after attempt number `attempt` (1 = the original request)
    ended with `outcome`."""
    return is_retriable(policy, outcome) and attempt - 1 < policy.num_retries


def backoff(policy: RetryPolicy, retry: int, rng: random.Random) -> float:
    """Seconds to wait before retry number `retry` (1-based): uniform in [0, interval),
    where the interval doubles from `base_interval` per retry up to the cap."""
    interval = min(policy.base_interval * 2 ** (retry - 1), policy.backoff_cap)
    return rng.random() * interval


def max_active_retries(budget: RetryBudget, active_requests: int, pending_requests: int) -> int:
    """How many retries a cluster may have in flight now (Envoy's RetryBudgetImpl::max)."""
    share = int(budget.budget_percent / 100.0 * (active_requests + pending_requests))
    return max(share, budget.min_retry_concurrency)
