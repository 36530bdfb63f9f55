"""Routing decisions for the proxies: decide here, act in the trio shells.

`build_outbound_request` is ztunnel's `build_request` (src/proxy/outbound.rs) without the
multi-network (double HBONE) branch:

  1. loopback destination on one of ztunnel's own ports: refuse (it would loop);
  2. a Service VIP whose Service has a waypoint: HBONE to a waypoint endpoint, with the
     *original* VIP:port as authority (the waypoint does the L7 routing);
  3. a Service VIP: pick an endpoint (random weighted by capacity); a workload IP: that
     workload, port unchanged; anything else: plain TCP passthrough to the original target;
  4. a workload-addressed destination with a waypoint, unless the caller *is* that waypoint:
     HBONE to the waypoint, authority the original ip:port;
  5. HBONE workloads: dial ip:15008 and CONNECT ip:targetPort; others: plain TCP.

A waypoint is always reached over HBONE, whatever its own tunnel protocol. The TLS peer must
present one of `expected_identities`: the destination workload's identity plus the SANs of
the service it was reached through.

`inbound_destination` checks an HBONE CONNECT's :authority on the receiving side.
"""

from __future__ import annotations

import ipaddress
import random
import re
from dataclasses import dataclass
from typing import Literal

from meshcore.identity.spiffe import Identity, InvalidIdentity
from ztunnel.lb import choose_endpoint
from ztunnel.proxy.errors import (
    MalformedConnect,
    NoLocalWorkload,
    SelfCall,
    UnknownWaypoint,
)
from ztunnel.state.model import (
    HBONE_PORT,
    GatewayAddress,
    IpAddress,
    Service,
    TunnelProtocol,
    Workload,
)
from ztunnel.state.store import ProxyState

# Ports ztunnel listens on inside every enrolled pod (outbound, inbound plaintext, HBONE,
# SOCKS5); traffic addressed to them must never be forwarded.
ZTUNNEL_PORTS = frozenset({15001, 15006, 15008, 15080})


@dataclass(frozen=True, slots=True)
class OutboundRequest:
    """How to carry one outbound connection, decided before any I/O."""

    protocol: Literal["hbone", "tcp"]
    # The TCP address to connect to: a pod or waypoint ip:15008 for HBONE, else the target.
    dial: tuple[IpAddress, int]
    # The CONNECT :authority ("ip:port"); None for plain TCP.
    authority: str | None
    # SPIFFE IDs the HBONE server may present; empty for plain TCP.
    expected_identities: tuple[Identity, ...]
    source: Workload
    # The workload actually dialed (a waypoint when via_waypoint); None for passthrough.
    destination_workload: Workload | None
    # The service the client addressed, if it addressed one.
    destination_service: Service | None
    via_waypoint: bool


# --- Authority ---

_AUTHORITY = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[0-9.]+)):(?P<port>[0-9]{1,5})")


def format_authority(ip: IpAddress, port: int) -> str:
    """The HBONE :authority for ip:port; IPv6 is bracketed."""
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def parse_authority(authority: str) -> tuple[IpAddress, int]:
    """Parse "ip:port" / "[v6]:port"; anything else raises MalformedConnect."""
    found = _AUTHORITY.fullmatch(authority)
    port = int(found["port"]) if found else 0
    try:
        if found and 0 < port <= 65535:
            if found["v6"] is not None:
                return ipaddress.IPv6Address(found["v6"]), port
            return ipaddress.IPv4Address(found["v4"]), port
    except ValueError:
        pass
    raise MalformedConnect(f"CONNECT authority {authority!r} is not 'ip:port' or '[ipv6]:port'")


# --- Outbound ---


def build_outbound_request(
    state: ProxyState,
    source: Workload,
    dst_ip: IpAddress,
    dst_port: int,
    *,
    rng: random.Random,
    own_ports: frozenset[int],
) -> OutboundRequest:
    """Decide how `source`'s connection to dst_ip:dst_port leaves this node."""
    if dst_ip.is_loopback and dst_port in own_ports:
        raise SelfCall(f"{source} connected to ztunnel's own port {dst_ip}:{dst_port}")
    original = format_authority(dst_ip, dst_port)

    service = state.service_by_vip(dst_ip, source.network, prefer_namespace=source.namespace)
    if service is not None:
        if service.waypoint is not None:
            return _via_waypoint(state, source, service.waypoint, original, service, rng)
        endpoint = choose_endpoint(state, service, dst_port, rng)
        return _direct(source, endpoint.workload, endpoint.address, endpoint.target_port, service)

    workload = state.workload_by_ip(dst_ip, source.network)
    if workload is None:
        return OutboundRequest(
            protocol="tcp",
            dial=(dst_ip, dst_port),
            authority=None,
            expected_identities=(),
            source=source,
            destination_workload=None,
            destination_service=None,
            via_waypoint=False,
        )
    if workload.waypoint is not None and not _is_waypoint(state, source, workload.waypoint):
        return _via_waypoint(state, source, workload.waypoint, original, None, rng)
    return _direct(source, workload, dst_ip, dst_port, None)


def _direct(
    source: Workload,
    workload: Workload,
    address: IpAddress,
    port: int,
    service: Service | None,
) -> OutboundRequest:
    if workload.tunnel_protocol is TunnelProtocol.HBONE:
        return OutboundRequest(
            protocol="hbone",
            dial=(address, HBONE_PORT),
            authority=format_authority(address, port),
            expected_identities=_expected_identities(workload, service),
            source=source,
            destination_workload=workload,
            destination_service=service,
            via_waypoint=False,
        )
    return OutboundRequest(
        protocol="tcp",
        dial=(address, port),
        authority=None,
        expected_identities=(),
        source=source,
        destination_workload=workload,
        destination_service=service,
        via_waypoint=False,
    )


def _via_waypoint(
    state: ProxyState,
    source: Workload,
    gateway: GatewayAddress,
    original: str,
    service: Service | None,
    rng: random.Random,
) -> OutboundRequest:
    waypoint, address, port, waypoint_service = _resolve_waypoint(state, source, gateway, rng)
    return OutboundRequest(
        protocol="hbone",
        dial=(address, port),
        authority=original,
        expected_identities=_expected_identities(waypoint, waypoint_service),
        source=source,
        destination_workload=waypoint,
        destination_service=service,
        via_waypoint=True,
    )


def _resolve_waypoint(
    state: ProxyState, source: Workload, gateway: GatewayAddress, rng: random.Random
) -> tuple[Workload, IpAddress, int, Service | None]:
    """The waypoint workload to dial, its address and HBONE port, and its Service if any.

    A waypoint named by hostname or by a VIP is a Service: its endpoint is chosen like any
    other, for the service port `hbone_mtls_port`. An IP that is no VIP is the waypoint pod.
    """
    service = _waypoint_service(state, source, gateway)
    if service is not None:
        endpoint = choose_endpoint(state, service, gateway.hbone_mtls_port, rng)
        return endpoint.workload, endpoint.address, endpoint.target_port, service
    if gateway.address is not None:
        workload = state.workload_by_ip(gateway.address, source.network)
        if workload is not None:
            return workload, gateway.address, gateway.hbone_mtls_port, None
    raise UnknownWaypoint(f"waypoint {gateway} is neither a known service nor a known workload")


def _waypoint_service(
    state: ProxyState, source: Workload, gateway: GatewayAddress
) -> Service | None:
    if gateway.hostname is not None:
        return state.service_by_key(gateway.hostname.key)
    if gateway.address is not None:
        return state.service_by_vip(gateway.address, source.network)
    return None


def _is_waypoint(state: ProxyState, source: Workload, gateway: GatewayAddress) -> bool:
    """Whether `source` is one of the waypoint's pods (ztunnel's `check_from_waypoint`).

    Traffic the waypoint forwards to its destination must not be sent back to it.
    """
    service = _waypoint_service(state, source, gateway)
    if service is not None:
        candidates = state.endpoints(service)
    elif gateway.address is not None:
        found = state.workload_by_ip(gateway.address, source.network)
        candidates = (found,) if found is not None else ()
    else:
        candidates = ()
    return any(
        waypoint.identity == source.identity
        and not set(waypoint.addresses).isdisjoint(source.addresses)
        for waypoint in candidates
    )


def _expected_identities(workload: Workload, service: Service | None) -> tuple[Identity, ...]:
    identities = [workload.identity]
    for san in service.subject_alt_names if service is not None else ():
        try:
            identities.append(Identity.parse(san))
        except InvalidIdentity:
            # istiod may send SANs that are not SPIFFE IDs; ztunnel ignores them too.
            continue
    return tuple(dict.fromkeys(identities))


# --- Inbound ---


def inbound_destination(
    state: ProxyState,
    authority: str,
    local_node: str,
    *,
    own_ports: frozenset[int] = ZTUNNEL_PORTS,
) -> tuple[Workload, IpAddress, int]:
    """The local workload, IP and port an inbound HBONE CONNECT asks for."""
    ip, port = parse_authority(authority)
    workload = next((w for w in state.local_workloads(local_node) if ip in w.addresses), None)
    if workload is None:
        raise NoLocalWorkload(
            f"CONNECT to {authority}: no workload with IP {ip} on node {local_node!r}"
        )
    if port in own_ports:
        raise SelfCall(f"CONNECT to {authority} targets ztunnel's own port {port} in {workload}")
    return workload, ip, port
