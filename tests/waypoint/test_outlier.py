"""Outlier detection on a fake clock: consecutive-5xx ejection, return, backoff, limits."""

from __future__ import annotations

from waypoint.config.model import Endpoint, OutlierConfig
from waypoint.policy.outlier import OutlierDetector
from waypoint.policy.retry import UpstreamFailure

A, B, C = (Endpoint(f"10.0.0.{i}", 8080) for i in (1, 2, 3))
# The seed's DestinationRule: 5 consecutive 5xx, checked every 10 s, out for 30 s.
CONFIG = OutlierConfig(
    consecutive_5xx=5, interval=10.0, base_ejection_time=30.0, max_ejection_percent=50
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def detector(
    config: OutlierConfig = CONFIG, endpoints: tuple[Endpoint, ...] = (A, B)
) -> tuple[OutlierDetector, FakeClock]:
    clock = FakeClock()
    return OutlierDetector(config, endpoints, clock=clock), clock


def test_five_consecutive_5xx_eject_an_endpoint_until_the_ejection_time_has_passed() -> None:
    outliers, clock = detector()
    for _ in range(4):
        outliers.record(A, 503)
    assert outliers.healthy([A, B]) == [A, B]
    clock.now += 5  # ejected at t=1005
    outliers.record(A, 500)
    assert outliers.is_ejected(A)
    assert outliers.healthy([A, B]) == [B]
    # Ticks at 1010, 1020, 1030: not yet 30 s out.
    clock.now = 1034.9
    assert outliers.healthy([A, B]) == [B]
    # The tick at 1040 is the first one 30 s after the ejection.
    clock.now = 1040.0
    assert outliers.healthy([A, B]) == [A, B]
    assert outliers.statistics().ejections_total == 1


def test_a_success_resets_the_consecutive_count() -> None:
    outliers, _ = detector()
    for code in (503, 503, 503, 503, 200, 503, 503, 503, 503):
        outliers.record(A, code)
    assert not outliers.is_ejected(A)
    outliers.record(A, 503)
    assert outliers.is_ejected(A)


def test_failures_without_a_response_count_as_5xx() -> None:
    outliers, _ = detector()
    for failure in (
        UpstreamFailure.CONNECT_FAILURE,
        UpstreamFailure.RESET,
        UpstreamFailure.TIMEOUT,
        UpstreamFailure.REFUSED_STREAM,
        UpstreamFailure.CONNECT_FAILURE,
    ):
        outliers.record(A, failure)
    assert outliers.is_ejected(A)


def test_consecutive_gateway_failures_eject_when_that_detector_is_on() -> None:
    outliers, _ = detector(
        OutlierConfig(consecutive_5xx=0, consecutive_gateway_failure=3, max_ejection_percent=50)
    )
    for code in (502, 503, 500, 504, 503):  # the 500 breaks the run of gateway errors
        outliers.record(A, code)
    assert not outliers.is_ejected(A)
    outliers.record(A, UpstreamFailure.TIMEOUT)  # counts as 504
    assert outliers.is_ejected(A)


def test_other_endpoints_errors_do_not_add_up() -> None:
    outliers, _ = detector()
    for _ in range(3):
        outliers.record(A, 503)
        outliers.record(B, 503)
    assert outliers.healthy([A, B]) == [A, B]


def test_an_endpoint_ejected_again_stays_out_twice_as_long() -> None:
    outliers, clock = detector()
    for _ in range(5):
        outliers.record(A, 503)  # ejected at 1000
    clock.now = 1030.0
    assert not outliers.is_ejected(A)  # back at the 1030 tick
    for _ in range(5):
        outliers.record(A, 503)  # ejected again at 1030, now for 60 s
    clock.now = 1080.0
    assert outliers.is_ejected(A)
    clock.now = 1090.0
    assert not outliers.is_ejected(A)


def test_the_backoff_shrinks_while_the_endpoint_stays_healthy() -> None:
    outliers, clock = detector()
    for _ in range(5):
        outliers.record(A, 503)  # ejected at 1000 for 30 s
    clock.now = 1030.0
    assert not outliers.is_ejected(A)
    clock.now = 1100.0  # healthy for several intervals: backoff back to 0
    for _ in range(5):
        outliers.record(A, 503)  # ejected at 1100, for 30 s again
    clock.now = 1130.0
    assert not outliers.is_ejected(A)


def test_max_ejection_percent_keeps_enough_endpoints() -> None:
    outliers, _ = detector(endpoints=(A, B, C))  # 50 %: one of three may be out
    for _ in range(5):
        outliers.record(A, 503)
        outliers.record(B, 503)
    assert outliers.healthy([A, B, C]) == [B, C]
    assert outliers.statistics().ejections_overflow == 1


def test_envoys_default_ten_percent_ejects_nothing_of_two_endpoints() -> None:
    outliers, _ = detector(OutlierConfig())
    for _ in range(10):
        outliers.record(A, 503)
    assert not outliers.is_ejected(A)


def test_consecutive_5xx_zero_disables_ejection() -> None:
    outliers, _ = detector(OutlierConfig(consecutive_5xx=0, max_ejection_percent=100))
    for _ in range(50):
        outliers.record(A, 503)
    assert not outliers.is_ejected(A)


def test_endpoint_updates_keep_state_of_the_ones_that_stay() -> None:
    outliers, _ = detector(endpoints=(A, B))
    for _ in range(5):
        outliers.record(A, 503)
    # A health change does not reset the ejection: state is kept per address and port.
    unhealthy_a = Endpoint(A.address, A.port, healthy=False)
    outliers.update_endpoints([unhealthy_a, B, C])
    assert outliers.is_ejected(A)
    outliers.update_endpoints([B, C])
    assert outliers.statistics().ejected == 0
    outliers.record(A, 503)  # a late answer from a removed endpoint is ignored
    assert outliers.statistics().endpoints == 2


def test_a_long_idle_clock_jump_is_handled_at_once() -> None:
    outliers, clock = detector()
    clock.now += 10 * 365 * 24 * 3600.0
    assert outliers.healthy([A, B]) == [A, B]
    for _ in range(5):
        outliers.record(A, 503)
    assert outliers.is_ejected(A)
