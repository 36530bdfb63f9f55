"""Load balancing: round robin, least request (power of two choices), random; health."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from waypoint.config.model import Endpoint, LbPolicy
from waypoint.policy.lb import LoadBalancer, NoHealthyUpstream

CLUSTER = "outbound|9080|v1|reviews.bookinfo.svc.cluster.local"
A, B, C = (Endpoint(f"10.0.0.{i}", 9080) for i in (1, 2, 3))


def balancer(policy: LbPolicy, seed: int = 1) -> LoadBalancer:
    return LoadBalancer(CLUSTER, policy, rng=random.Random(seed))


def test_round_robin_takes_turns() -> None:
    lb = balancer(LbPolicy.ROUND_ROBIN)
    assert [lb.choose([A, B, C]) for _ in range(6)] == [A, B, C, A, B, C]


def test_round_robin_follows_weights() -> None:
    heavy = Endpoint("10.0.0.9", 9080, weight=3)
    lb = balancer(LbPolicy.ROUND_ROBIN)
    picks = [lb.choose([heavy, A]) for _ in range(8)]
    assert Counter(picks) == {heavy: 6, A: 2}
    assert picks[:4].count(A) == 1  # spread out, not bunched


def test_round_robin_starts_over_when_the_endpoints_change() -> None:
    lb = balancer(LbPolicy.ROUND_ROBIN)
    lb.choose([A, B, C])
    assert [lb.choose([B, C]) for _ in range(3)] == [B, C, B]


def test_least_request_steers_away_from_a_slow_endpoint() -> None:
    """A is slow (each request takes 10 steps, B and C take 1); one request per step."""

    def run(policy: LbPolicy) -> Counter[Endpoint]:
        lb = balancer(policy, seed=42)
        in_flight: list[tuple[int, Endpoint]] = []
        picks: Counter[Endpoint] = Counter()
        for step in range(900):
            for done in [f for f in in_flight if f[0] <= step]:
                in_flight.remove(done)
                lb.request_finished(done[1])
            endpoint = lb.choose([A, B, C])
            lb.request_started(endpoint)
            in_flight.append((step + (10 if endpoint == A else 1), endpoint))
            picks[endpoint] += 1
        return picks

    assert run(LbPolicy.ROUND_ROBIN)[A] == 300
    assert run(LbPolicy.LEAST_REQUEST)[A] < 150


def test_least_request_prefers_the_endpoint_with_fewer_active_requests() -> None:
    lb = balancer(LbPolicy.LEAST_REQUEST)
    for _ in range(3):
        lb.request_started(A)
    picks = Counter(lb.choose([A, B]) for _ in range(400))
    # A only wins when both draws are A (1 in 4).
    assert 60 < picks[A] < 140
    assert lb.active_requests(A) == 3
    for _ in range(3):
        lb.request_finished(A)
    assert lb.active_requests(A) == 0


def test_random_spreads_evenly() -> None:
    lb = balancer(LbPolicy.RANDOM)
    picks = Counter(lb.choose([A, B, C]) for _ in range(3000))
    assert all(900 < picks[e] < 1100 for e in (A, B, C))


@pytest.mark.parametrize("policy", list(LbPolicy))
def test_unhealthy_endpoints_are_skipped(policy: LbPolicy) -> None:
    lb = balancer(policy)
    sick = Endpoint("10.0.0.8", 9080, healthy=False)
    assert {lb.choose([sick, A, B]) for _ in range(50)} == {A, B}


@pytest.mark.parametrize("policy", list(LbPolicy))
def test_no_healthy_endpoint_is_503_uh(policy: LbPolicy) -> None:
    lb = balancer(policy)
    with pytest.raises(NoHealthyUpstream) as raised:
        lb.choose([Endpoint("10.0.0.8", 9080, healthy=False)], ejected=2)
    assert (raised.value.status, raised.value.response_flag) == (503, "UH")
    assert "3 endpoints known, 2 ejected" in str(raised.value)
    with pytest.raises(NoHealthyUpstream, match=CLUSTER.replace("|", r"\|")):
        lb.choose([])


def test_panic_routing_uses_every_endpoint_when_too_few_are_usable() -> None:
    lb = LoadBalancer(CLUSTER, LbPolicy.ROUND_ROBIN, rng=random.Random(1), panic_threshold=50.0)
    sick = Endpoint("10.0.0.8", 9080, healthy=False)
    everyone = [A, B, C, sick]
    # Two of four usable (50 %): not in panic, the sick one is skipped.
    assert {lb.choose([A, B, sick], panic_from=everyone) for _ in range(20)} == {A, B}
    # One of four usable (C ejected): panic, all four take turns.
    assert {lb.choose([A, sick], panic_from=everyone) for _ in range(20)} == set(everyone)
    # Threshold 0 never panics.
    strict = LoadBalancer(CLUSTER, LbPolicy.ROUND_ROBIN, rng=random.Random(1))
    with pytest.raises(NoHealthyUpstream):
        strict.choose([sick], panic_from=everyone)
