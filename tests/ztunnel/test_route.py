"""Routing decisions: where an outbound connection goes, and what an inbound CONNECT targets."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcore.identity.spiffe import Identity
from ztunnel.proxy.errors import (
    MalformedConnect,
    NoHealthyUpstream,
    NoLocalWorkload,
    ProxyError,
    SelfCall,
    UnknownWaypoint,
)
from ztunnel.proxy.route import (
    ZTUNNEL_PORTS,
    OutboundRequest,
    build_outbound_request,
    format_authority,
    inbound_destination,
    parse_authority,
)
from ztunnel.state.localconfig import load_local_config
from ztunnel.state.model import (
    GatewayAddress,
    NamespacedHostname,
    Port,
    Service,
    TunnelProtocol,
    Workload,
)
from ztunnel.state.store import ProxyState, StateStore

EXAMPLE = Path(__file__).parents[2] / "ztunnel" / "examples" / "localhost.yaml"
HBONE = TunnelProtocol.HBONE
WAYPOINT_HOST = NamespacedHostname("apps", "waypoint.apps.svc.cluster.local")


def ip(text: str) -> IPv4Address | IPv6Address:
    return ip_address(text)


def identity(sa: str) -> Identity:
    return Identity(trust_domain="cluster.local", namespace="apps", service_account=sa)


def service(name: str, vip: str, ports: tuple[Port, ...], **fields: object) -> Service:
    return Service(
        name=name,
        namespace="apps",
        hostname=f"{name}.apps.svc.cluster.local",
        vips=(("", ip(vip)),),
        ports=ports,
        **fields,  # type: ignore[arg-type]
    )


WEB = service(
    "web",
    "10.96.0.1",
    (Port(80, 8080),),
    subject_alt_names=("spiffe://cluster.local/ns/apps/sa/web-canary", "not-a-spiffe-id"),
)
LEGACY = service("legacy", "10.96.0.5", (Port(5432, 5432),))
REVIEWS = service(
    "reviews", "10.96.0.2", (Port(9080, 9080),), waypoint=GatewayAddress(None, WAYPOINT_HOST)
)
EMPTY = service("empty", "10.96.0.3", (Port(80, 80),))
WAYPOINT_SVC = service(
    "waypoint",
    "10.96.0.9",
    (Port(15008, 15008),),
    subject_alt_names=("spiffe://cluster.local/ns/apps/sa/waypoint-alt",),
)


def pod(name: str, addr: str, *services: Service, **fields: object) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/apps/{name}",
        name=name,
        namespace="apps",
        addresses=(ip(addr),),
        node="node-a",
        service_account=name,
        services=tuple((s.key, ()) for s in services),
        **fields,  # type: ignore[arg-type]
    )


CLIENT = pod("sleep", "10.0.0.10", tunnel_protocol=HBONE)
# The waypoint pod itself speaks plain TCP: it must still be reached over HBONE.
WAYPOINT = pod("waypoint", "10.0.9.1", WAYPOINT_SVC)
WORKLOADS = (
    CLIENT,
    WAYPOINT,
    pod("web", "10.0.1.1", WEB, tunnel_protocol=HBONE),
    pod("web6", "fd00::1", tunnel_protocol=HBONE),
    pod("legacy", "10.0.2.1", LEGACY),
    pod("reviews", "10.0.3.1", REVIEWS, tunnel_protocol=HBONE),
    pod("db", "10.0.4.1", tunnel_protocol=HBONE, waypoint=GatewayAddress(ip("10.0.9.1"), None)),
    pod("cache", "10.0.5.1", tunnel_protocol=HBONE, waypoint=GatewayAddress(ip("10.96.0.9"), None)),
    pod("ghost", "10.0.6.1", waypoint=GatewayAddress(None, NamespacedHostname("apps", "missing"))),
)
STATE = ProxyState(
    {w.uid: w for w in WORKLOADS},
    {s.key: s for s in (WEB, LEGACY, REVIEWS, EMPTY, WAYPOINT_SVC)},
    {},
    version=1,
)


def route(dst: str, port: int, source: Workload = CLIENT, state: ProxyState = STATE,
          seed: int = 0) -> OutboundRequest:
    return build_outbound_request(
        state, source, ip(dst), port, rng=random.Random(seed), own_ports=ZTUNNEL_PORTS
    )


OUTBOUND_CASES = [
    # (case, dst, port, protocol, dial, authority, destination workload, service, via waypoint)
    ("service VIP to HBONE pod: CONNECT targetPort via 15008",
     "10.96.0.1", 80, "hbone", ("10.0.1.1", 15008), "10.0.1.1:8080", "web", WEB, False),
    ("pod IP of an HBONE pod: port unchanged",
     "10.0.1.1", 8080, "hbone", ("10.0.1.1", 15008), "10.0.1.1:8080", "web", None, False),
    ("IPv6 authority is bracketed",
     "fd00::1", 8080, "hbone", ("fd00::1", 15008), "[fd00::1]:8080", "web6", None, False),
    ("service VIP to plain TCP pod",
     "10.96.0.5", 5432, "tcp", ("10.0.2.1", 5432), None, "legacy", LEGACY, False),
    ("pod IP of a plain TCP pod",
     "10.0.2.1", 5432, "tcp", ("10.0.2.1", 5432), None, "legacy", None, False),
    ("service with a waypoint: HBONE to the waypoint, authority the original VIP",
     "10.96.0.2", 9080, "hbone", ("10.0.9.1", 15008), "10.96.0.2:9080", "waypoint", REVIEWS,
     True),
    ("workload with a waypoint given by pod IP",
     "10.0.4.1", 5432, "hbone", ("10.0.9.1", 15008), "10.0.4.1:5432", "waypoint", None, True),
    ("workload with a waypoint given by VIP",
     "10.0.5.1", 6379, "hbone", ("10.0.9.1", 15008), "10.0.5.1:6379", "waypoint", None, True),
    ("unknown destination: passthrough",
     "93.184.216.34", 443, "tcp", ("93.184.216.34", 443), None, None, None, False),
    ("loopback to an app port: passthrough",
     "127.0.0.1", 8080, "tcp", ("127.0.0.1", 8080), None, None, None, False),
]


@pytest.mark.parametrize(
    ("case", "dst", "port", "protocol", "dial", "authority", "workload", "svc", "via_waypoint"),
    OUTBOUND_CASES,
    ids=[c[0] for c in OUTBOUND_CASES],
)
def test_outbound_decision(
    case: str,
    dst: str,
    port: int,
    protocol: str,
    dial: tuple[str, int],
    authority: str | None,
    workload: str | None,
    svc: Service | None,
    via_waypoint: bool,
) -> None:
    request = route(dst, port)
    assert request.protocol == protocol
    assert request.dial == (ip(dial[0]), dial[1])
    assert request.authority == authority
    assert request.source == CLIENT
    destination = request.destination_workload
    assert (destination.name if destination else None) == workload
    assert request.destination_service == svc
    assert request.via_waypoint is via_waypoint
    if protocol == "tcp":
        assert request.expected_identities == ()


@pytest.mark.parametrize(
    ("dst", "port", "expected"),
    [
        # Destination workload first, then the service's SANs; non-SPIFFE SANs are ignored.
        ("10.96.0.1", 80, (identity("web"), identity("web-canary"))),
        ("10.0.1.1", 8080, (identity("web"),)),
        # Through a waypoint service: the waypoint's identity plus that service's SANs.
        ("10.96.0.2", 9080, (identity("waypoint"), identity("waypoint-alt"))),
        ("10.0.5.1", 6379, (identity("waypoint"), identity("waypoint-alt"))),
        ("10.0.4.1", 5432, (identity("waypoint"),)),
    ],
)
def test_expected_identities(dst: str, port: int, expected: tuple[Identity, ...]) -> None:
    assert route(dst, port).expected_identities == expected


def test_the_waypoint_itself_goes_direct() -> None:
    request = route("10.0.4.1", 5432, source=WAYPOINT)
    assert (request.dial, request.via_waypoint) == ((ip("10.0.4.1"), 15008), False)


def test_waypoint_identity_from_another_ip_still_goes_through_the_waypoint() -> None:
    impostor = pod("waypoint", "10.0.0.99")
    assert route("10.0.4.1", 5432, source=impostor).via_waypoint


@pytest.mark.parametrize(
    ("dst", "port", "error", "message"),
    [
        ("127.0.0.1", 15001, SelfCall, "own port 127.0.0.1:15001"),
        ("::1", 15008, SelfCall, "own port ::1:15008"),
        ("127.0.0.1", 15080, SelfCall, "own port"),
        ("10.96.0.3", 80, NoHealthyUpstream, "apps/empty.apps.svc.cluster.local port 80"),
        ("10.96.0.1", 81, NoHealthyUpstream, "has no port 81"),
        ("10.0.6.1", 80, UnknownWaypoint, "waypoint apps/missing:15008 is neither"),
    ],
)
def test_outbound_errors(dst: str, port: int, error: type[ProxyError], message: str) -> None:
    with pytest.raises(error) as raised:
        route(dst, port)
    assert message in str(raised.value)
    assert raised.value.status == 503


def test_waypoint_with_no_healthy_pod() -> None:
    without_waypoint_pods = ProxyState(
        {w.uid: w for w in WORKLOADS if w is not WAYPOINT},
        {s.key: s for s in (REVIEWS, WAYPOINT_SVC)},
        {},
        version=1,
    )
    with pytest.raises(NoHealthyUpstream, match="apps/waypoint.apps.svc.cluster.local"):
        route("10.96.0.2", 9080, state=without_waypoint_pods)


# --- The shipped localhost example ---


def example_state() -> ProxyState:
    store = StateStore()
    return store.replace(load_local_config(EXAMPLE))


def test_localhost_example_service_reaches_both_endpoints() -> None:
    state = example_state()
    local = state.workload_by_ip(ip("127.0.0.1"))
    assert local is not None
    seen = {
        (r.protocol, r.dial, r.authority, r.expected_identities)
        for r in (route("127.10.0.1", 80, source=local, state=state, seed=s) for s in range(20))
    }
    assert seen == {
        (
            "hbone",
            (ip("127.0.0.1"), 15008),
            "127.0.0.1:8080",
            (
                Identity.parse("spiffe://cluster.local/ns/default/sa/default"),
                Identity.parse("spiffe://cluster.local/ns/default/sa/local"),
            ),
        ),
        ("tcp", (ip("127.0.0.2"), 8080), None, ()),
    }


def test_localhost_example_vip_on_another_network_is_passthrough() -> None:
    state = example_state()
    local = state.workload_by_ip(ip("127.0.0.1"))
    assert local is not None
    request = route("127.10.0.2", 80, source=local, state=state)
    assert (request.protocol, request.dial) == ("tcp", (ip("127.10.0.2"), 80))


# --- Inbound ---


def test_inbound_destination_finds_the_local_workload() -> None:
    state = example_state()
    workload, dst_ip, port = inbound_destination(state, "127.0.0.1:8080", "local")
    assert (workload.name, dst_ip, port) == ("local", ip("127.0.0.1"), 8080)


def test_inbound_ipv6_authority() -> None:
    workload, dst_ip, port = inbound_destination(STATE, "[fd00::1]:8080", "node-a")
    assert (workload.name, dst_ip, port) == ("web6", ip("fd00::1"), 8080)


@pytest.mark.parametrize(
    ("authority", "node", "error", "status"),
    [
        ("127.0.0.3:8080", "local", NoLocalWorkload, 503),
        ("127.0.0.1:8080", "other-node", NoLocalWorkload, 503),
        ("127.0.0.1:15008", "local", SelfCall, 503),
        ("127.0.0.1:15006", "local", SelfCall, 503),
        ("example.com:80", "local", MalformedConnect, 400),
    ],
)
def test_inbound_refusals(
    authority: str, node: str, error: type[ProxyError], status: int
) -> None:
    with pytest.raises(error) as raised:
        inbound_destination(example_state(), authority, node)
    assert raised.value.status == status
    assert authority in str(raised.value)


@pytest.mark.parametrize(
    "authority",
    [
        "", "127.0.0.1", "127.0.0.1:", ":80", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:+80",
        "127.0.0.1:080000", "example.com:80", "::1:80", "[127.0.0.1]:80", "[::1]", "[::1]:80x",
        "127.0.0.1:80 ", " 127.0.0.1:80", "1.2.3.4.5:80", "[fe80::1%eth0]:80", "127.0.0.01:80",
        "127.0.0.1:٨٠", "[::1]:80/path",
    ],
)
def test_malformed_authorities(authority: str) -> None:
    with pytest.raises(MalformedConnect) as raised:
        parse_authority(authority)
    assert (raised.value.status, raised.value.response_flag) == (400, "CONNECT")


@given(st.ip_addresses(), st.integers(1, 65535))
def test_authority_round_trips(address: IPv4Address | IPv6Address, port: int) -> None:
    assert parse_authority(format_authority(address, port)) == (address, port)


@given(st.text(max_size=60))
def test_any_authority_parses_or_is_malformed(authority: str) -> None:
    try:
        parse_authority(authority)
    except MalformedConnect:
        pass
