"""Endpoint choice: healthy endpoints that serve the port, random weighted by capacity."""

from __future__ import annotations

import random
from collections import Counter
from ipaddress import ip_address

import pytest

from ztunnel.lb import Endpoint, choose_endpoint
from ztunnel.proxy.errors import NoHealthyUpstream
from ztunnel.state.model import HealthStatus, Port, Service, Workload
from ztunnel.state.store import ProxyState

SERVICE = Service(
    name="reviews",
    namespace="bookinfo",
    hostname="reviews.bookinfo.svc.cluster.local",
    vips=(("", ip_address("10.96.0.10")),),
    # 9080 -> 9080; 8443 is a named port (target 0) only the pods can resolve.
    ports=(Port(9080, 9080), Port(8443, 0)),
)


def pod(name: str, ip: str, ports: tuple[Port, ...] = (), **fields: object) -> Workload:
    """A pod that is an endpoint of SERVICE with the given port mapping."""
    return Workload(
        uid=f"Kubernetes//Pod/bookinfo/{name}",
        name=name,
        namespace="bookinfo",
        addresses=(ip_address(ip),),
        node="node-a",
        services=((SERVICE.key, ports),),
        **fields,  # type: ignore[arg-type]
    )


def state_of(*workloads: Workload) -> ProxyState:
    return ProxyState({w.uid: w for w in workloads}, {SERVICE.key: SERVICE}, {}, version=1)


def pick(state: ProxyState, port: int = 9080, seed: int = 0) -> Endpoint:
    return choose_endpoint(state, SERVICE, port, random.Random(seed))


def picks(state: ProxyState, n: int, port: int = 9080) -> Counter[str]:
    rng = random.Random(1234)
    return Counter(choose_endpoint(state, SERVICE, port, rng).workload.name for _ in range(n))


def test_only_healthy_endpoints_are_chosen() -> None:
    state = state_of(
        pod("v1", "10.0.0.1", status=HealthStatus.UNHEALTHY),
        pod("v2", "10.0.0.2"),
    )
    assert picks(state, 200) == {"v2": 200}


def test_capacity_zero_is_never_chosen() -> None:
    state = state_of(pod("v1", "10.0.0.1", capacity=0), pod("v2", "10.0.0.2"))
    assert picks(state, 200) == {"v2": 200}


def test_choice_is_weighted_by_capacity() -> None:
    state = state_of(pod("v1", "10.0.0.1", capacity=1), pod("v2", "10.0.0.2", capacity=3))
    counts = picks(state, 4000)
    assert counts["v1"] + counts["v2"] == 4000
    assert 0.72 < counts["v2"] / 4000 < 0.78


def test_equal_capacity_spreads_evenly() -> None:
    state = state_of(*(pod(f"v{i}", f"10.0.0.{i}") for i in range(1, 5)))
    counts = picks(state, 4000)
    assert set(counts) == {"v1", "v2", "v3", "v4"}
    assert all(900 < n < 1100 for n in counts.values())


def test_workload_port_mapping_wins_over_service_target_port() -> None:
    v1 = pod("v1", "10.0.0.1", ports=(Port(9080, 19080),))
    assert pick(state_of(v1)) == Endpoint(v1, ip_address("10.0.0.1"), 19080)


def test_service_target_port_is_used_without_a_workload_mapping() -> None:
    state = state_of(pod("v1", "10.0.0.1"))
    assert pick(state).target_port == 9080


def test_named_port_needs_the_workload_mapping() -> None:
    state = state_of(
        pod("unmapped", "10.0.0.1"),
        pod("mapped", "10.0.0.2", ports=(Port(8443, 8443),)),
    )
    assert picks(state, 100, port=8443) == {"mapped": 100}
    assert pick(state, port=8443).target_port == 8443


@pytest.mark.parametrize(
    ("workloads", "port", "message"),
    [
        ((), 9080, "service bookinfo/reviews.bookinfo.svc.cluster.local port 9080 has no usable "
                   "endpoint (0 known, 0 unhealthy or drained, 0 without an address for the "
                   "port)"),
        ((pod("v1", "10.0.0.1", status=HealthStatus.UNHEALTHY),), 9080, "1 unhealthy"),
        ((pod("v1", "10.0.0.1", capacity=0),), 9080, "1 unhealthy or drained"),
        ((pod("v1", "10.0.0.1"),), 8443, "1 without an address for the port"),
        ((pod("v1", "10.0.0.1"),), 9999, "has no port 9999 (declared ports: 9080, 8443)"),
    ],
)
def test_no_usable_endpoint_raises_no_healthy_upstream(
    workloads: tuple[Workload, ...], port: int, message: str
) -> None:
    with pytest.raises(NoHealthyUpstream) as raised:
        pick(state_of(*workloads), port=port)
    assert message in str(raised.value)
    assert (raised.value.status, raised.value.response_flag) == (503, "CONNECT")


def test_workload_without_address_is_skipped() -> None:
    addressless = Workload(
        uid="Kubernetes//Pod/bookinfo/gone",
        name="gone",
        namespace="bookinfo",
        addresses=(),
        node="node-a",
        services=((SERVICE.key, ()),),
    )
    state = state_of(addressless, pod("v1", "10.0.0.1"))
    assert picks(state, 50) == {"v1": 50}
