"""The one-machine mesh's address plan, as pure functions over the names of nodes and pods.

Everything lives in 198.18.0.0/15 (RFC 2544 benchmarking space: never routed on a real
network, so nothing here can shadow an address the machine really uses):

    198.18.<i>.0/24      pods of node i (i = 1..N in the order nodes are given);
                         .1 is the gateway on the node's bridge, pods get .2 upwards
    198.19.0.0/24        the node link: .1 is the mesh-net router, node i is .(1 + i)
    198.19.128.0/17      service VIPs (ClusterIPs), lowest free first
    198.19.255.0/30      the host veth: host .1 <-> mesh-net .2 (carved out of the VIP range)

Allocations are decided from what is already allocated (a pod keeps its node and IP, a
service its VIP), so a restart of the runtime reproduces the same addresses; new pods are
placed in name order on the least loaded node, which makes the plan deterministic.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

MESH_NETWORK = IPv4Network("198.18.0.0/15")
NODE_LINK_NETWORK = IPv4Network("198.19.0.0/24")
SERVICE_NETWORK = IPv4Network("198.19.128.0/17")
HOST_LINK_NETWORK = IPv4Network("198.19.255.0/30")
HOST_ADDRESS = IPv4Address("198.19.255.1")
HOST_PEER_ADDRESS = IPv4Address("198.19.255.2")
ROUTER_LINK_ADDRESS = IPv4Address("198.19.0.1")
# Node i uses 198.18.i.0/24 and 198.19.0.(1 + i): both run out at 253 nodes.
MAX_NODES = 253


class AddressError(ValueError):
    """The plan cannot be made: too many nodes, no VIP left, an address outside its range."""


@dataclass(frozen=True, kw_only=True)
class NodeAddresses:
    """Where one node sits in the plan."""

    name: str
    index: int  # 1-based position among the nodes
    pod_network: IPv4Network  # 198.18.<index>.0/24
    gateway: IPv4Address  # the node bridge's address, the pods' default route
    link_address: IPv4Address  # on the node link, reported as the pods' hostIP


@dataclass(frozen=True, kw_only=True)
class PlacementHint:
    """What is already known of a pod's place: the node it is bound to, the IP it had."""

    node: str | None = None
    ip: IPv4Address | None = None


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where a pod runs: its node and its IP in that node's pod network."""

    node: str
    ip: IPv4Address


def plan_nodes(names: Sequence[str]) -> tuple[NodeAddresses, ...]:
    """Addresses for each node, by position (the first node is index 1)."""
    if not names:
        raise AddressError("at least one node is needed")
    if len(names) > MAX_NODES:
        raise AddressError(f"{len(names)} nodes requested; the address plan has room for {MAX_NODES}")
    if len(set(names)) != len(names):
        raise AddressError(f"node names must be unique, got {list(names)}")
    plan = []
    for index, name in enumerate(names, start=1):
        pod_network = IPv4Network(f"198.18.{index}.0/24")
        plan.append(
            NodeAddresses(
                name=name,
                index=index,
                pod_network=pod_network,
                gateway=pod_network.network_address + 1,
                link_address=NODE_LINK_NETWORK.network_address + 1 + index,
            )
        )
    return tuple(plan)


def place_pods(nodes: Sequence[NodeAddresses], pods: Mapping[str, PlacementHint]) -> dict[str, Placement]:
    """Placements for `pods` (keys like "ns/name", each with what is already known of it).

    A pod keeps its node if that node exists, and its IP if that is free and in the node's
    pod network. The others are placed in sorted key order on the node with the fewest
    pods (ties: the earlier node); each new IP is its node's lowest free one. A pod that
    fits nowhere (its node's network, or every network, is full) is left out: it stays
    Pending, as an unschedulable pod does in Kubernetes.
    """
    by_name = {node.name: node for node in nodes}
    placements: dict[str, Placement] = {}
    taken: set[IPv4Address] = set()
    for key in sorted(pods):
        hint = pods[key]
        node = by_name.get(hint.node) if hint.node else None
        if node is not None and hint.ip is not None and _usable(hint.ip, node) and hint.ip not in taken:
            placements[key] = Placement(node=node.name, ip=hint.ip)
            taken.add(hint.ip)
    load = {node.name: 0 for node in nodes}
    for placement in placements.values():
        load[placement.node] += 1
    # Pods with a known node first, so that the least-loaded choice sees them.
    unplaced = sorted((key for key in pods if key not in placements), key=lambda key: (pods[key].node not in by_name, key))
    for key in unplaced:
        known = by_name.get(pods[key].node or "")
        candidates = [known] if known else sorted(nodes, key=lambda candidate: (load[candidate.name], candidate.index))
        for node in candidates:
            ip = _lowest_free(node.pod_network, taken, reserved={node.gateway})
            if ip is not None:
                placements[key] = Placement(node=node.name, ip=ip)
                taken.add(ip)
                load[node.name] += 1
                break
    return placements


def next_service_ip(used: Collection[IPv4Address]) -> IPv4Address:
    """The lowest free VIP in 198.19.128.0/17, never one of the host link's addresses."""
    ip = _lowest_free(SERVICE_NETWORK, used, reserved=set(HOST_LINK_NETWORK))
    if ip is None:
        raise AddressError(f"no free address left in the service VIP range {SERVICE_NETWORK}")
    return ip


def check_service_ip(ip: IPv4Address) -> None:
    """Raise AddressError unless `ip` may be a service VIP (a ClusterIP given in a manifest)."""
    if ip not in SERVICE_NETWORK or ip == SERVICE_NETWORK.network_address or ip in HOST_LINK_NETWORK:
        raise AddressError(
            f"{ip} is not a usable service VIP: expected an address in {SERVICE_NETWORK} "
            f"outside {HOST_LINK_NETWORK} (the host link)"
        )


def _usable(ip: IPv4Address, node: NodeAddresses) -> bool:
    return ip in node.pod_network and ip not in (node.gateway, node.pod_network.network_address, node.pod_network.broadcast_address)


def _lowest_free(network: IPv4Network, used: Collection[IPv4Address], *, reserved: Collection[IPv4Address]) -> IPv4Address | None:
    for ip in network.hosts():
        if ip not in used and ip not in reserved:
            return ip
    return None
