"""The address plan: where nodes, pods and service VIPs land, and that restarts keep them."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from ambientctl.runtime.addressing import (
    HOST_ADDRESS,
    HOST_PEER_ADDRESS,
    SERVICE_NETWORK,
    AddressError,
    PlacementHint,
    check_service_ip,
    next_service_ip,
    place_pods,
    plan_nodes,
)


def test_node_i_gets_its_own_pod_network_gateway_and_link_address():
    first, second = plan_nodes(["node-1", "node-2"])
    assert (first.pod_network, first.gateway, first.link_address) == (
        IPv4Network("198.18.1.0/24"),
        IPv4Address("198.18.1.1"),
        IPv4Address("198.19.0.2"),
    )
    assert (second.pod_network, second.gateway, second.link_address) == (
        IPv4Network("198.18.2.0/24"),
        IPv4Address("198.18.2.1"),
        IPv4Address("198.19.0.3"),
    )


@pytest.mark.parametrize("names", [[], ["a", "a"], [f"n{i}" for i in range(254)]])
def test_impossible_node_lists_are_refused(names):
    with pytest.raises(AddressError):
        plan_nodes(names)


def test_new_pods_are_spread_over_nodes_in_name_order():
    nodes = plan_nodes(["node-1", "node-2"])
    placements = place_pods(nodes, {key: PlacementHint() for key in ["ns/d", "ns/a", "ns/c", "ns/b"]})
    assert {key: (p.node, str(p.ip)) for key, p in placements.items()} == {
        "ns/a": ("node-1", "198.18.1.2"),
        "ns/b": ("node-2", "198.18.2.2"),
        "ns/c": ("node-1", "198.18.1.3"),
        "ns/d": ("node-2", "198.18.2.3"),
    }
    assert place_pods(nodes, {key: PlacementHint() for key in ["ns/a", "ns/b", "ns/c", "ns/d"]}) == placements


def test_pods_keep_node_and_ip_across_a_restart_when_new_pods_arrive():
    nodes = plan_nodes(["node-1", "node-2"])
    before = place_pods(nodes, {"ns/m": PlacementHint(), "ns/n": PlacementHint()})
    hints = {key: PlacementHint(node=p.node, ip=p.ip) for key, p in before.items()}
    after = place_pods(nodes, {**hints, "ns/a": PlacementHint(), "ns/b": PlacementHint()})
    assert after["ns/m"] == before["ns/m"] and after["ns/n"] == before["ns/n"]
    assert len({p.ip for p in after.values()}) == 4


def test_a_node_that_is_gone_or_an_ip_held_twice_gets_a_fresh_placement():
    nodes = plan_nodes(["node-1", "node-2"])
    placements = place_pods(
        nodes,
        {
            "ns/a": PlacementHint(node="node-1", ip=IPv4Address("198.18.1.7")),
            "ns/b": PlacementHint(node="node-1", ip=IPv4Address("198.18.1.7")),  # same IP
            "ns/c": PlacementHint(node="node-9", ip=IPv4Address("198.18.9.2")),  # no such node
            "ns/d": PlacementHint(node="node-2"),  # bound by the user, no IP yet
        },
    )
    assert placements["ns/a"].ip == IPv4Address("198.18.1.7")
    assert placements["ns/b"].node == "node-1" and placements["ns/b"].ip == IPv4Address("198.18.1.2")
    assert placements["ns/c"].node in ("node-1", "node-2") and placements["ns/c"].ip.packed[1] == 18
    assert placements["ns/d"].node == "node-2"


def test_pods_that_fit_nowhere_are_left_unplaced():
    nodes = plan_nodes(["only"])
    placements = place_pods(nodes, {f"ns/p{i:03}": PlacementHint() for i in range(254)})
    assert len(placements) == 253 and "ns/p253" not in placements  # .2 to .254: 253 pods
    bound_to_b = {f"ns/p{i:03}": PlacementHint(node="b") for i in range(254)}
    placements = place_pods(plan_nodes(["a", "b"]), bound_to_b)
    assert len(placements) == 253 and {p.node for p in placements.values()} == {"b"}


def test_service_vips_are_the_lowest_free_and_never_the_host_link():
    assert next_service_ip(set()) == IPv4Address("198.19.128.1")
    assert next_service_ip({IPv4Address("198.19.128.1")}) == IPv4Address("198.19.128.2")
    below_host_link = {ip for ip in SERVICE_NETWORK.hosts() if ip < IPv4Address("198.19.255.0")}
    assert next_service_ip(below_host_link) == IPv4Address("198.19.255.4")
    for ip in ("10.0.0.1", "198.19.0.5", str(HOST_ADDRESS), str(HOST_PEER_ADDRESS)):
        with pytest.raises(AddressError):
            check_service_ip(IPv4Address(ip))
    check_service_ip(IPv4Address("198.19.200.9"))
