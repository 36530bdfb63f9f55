"""Nodes and pods as Linux network namespaces, and the journal that lets `down` remove them.

Topology (addresses from addressing.py):

    host ── mesh-host 198.19.255.1 ══ host0 198.19.255.2 ── [mesh-net: br-mesh 198.19.0.1]
                                                                  ║ veth per node (node side eth0)
        [mesh-<node>: eth0 198.19.0.(1+i), bridge cni0 198.18.i.1/24, ip_forward]
                                    ║ veth per pod (pod side eth0, default via 198.18.i.1)
        [mesh-pod-<ns>-<name>: eth0 198.18.i.k/24]

Nodes route each other's pod networks directly over the node link and everything else in
198.18.0.0/15 (the host link, service VIPs before kube-proxy's DNAT) to mesh-net, which
routes pod networks to their nodes. The host gets one route, 198.18.0.0/15 via mesh-net.
No namespace has a route to anything outside 198.18.0.0/15, so nothing reaches a real network.

`RunState` is the journal: every namespace, host link and host nftables table is recorded
*before* it is created, every process right after it is spawned, and forgotten once it is
gone. A crash leaves the journal behind; teardown works from it and ignores what is already
gone, so it can run any number of times.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ambientctl.runtime.addressing import (
    HOST_ADDRESS,
    HOST_LINK_NETWORK,
    HOST_PEER_ADDRESS,
    MESH_NETWORK,
    NODE_LINK_NETWORK,
    ROUTER_LINK_ADDRESS,
    NodeAddresses,
)
from ambientctl.runtime.processes import ProcessRecord

NETNS_DIR = Path("/var/run/netns")
ROUTER_NETNS = "mesh-net"
HOST_LINK = "mesh-host"  # the host's end of the host veth
_HOST_PEER_LINK = "host0"  # its end inside mesh-net
_ROUTER_BRIDGE = "br-mesh"
NODE_BRIDGE = "cni0"
NODE_LINK = "eth0"  # a node's interface on the node link
POD_INTERFACE = "eth0"

# Capability bits (linux/capability.h): creating network namespaces needs both.
_CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}


class NetworkError(Exception):
    """A network operation failed; says which command and what the kernel answered."""


def node_netns(node: str) -> str:
    return f"mesh-{node}"


def pod_netns(namespace: str, name: str) -> str:
    return f"mesh-pod-{namespace}-{name}"


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


# --- preflight ---


def missing_capabilities(effective: int) -> list[str]:
    """The capabilities the runtime needs that the mask `effective` lacks."""
    return [name for name, bit in _CAPABILITIES.items() if not effective >> bit & 1]


def effective_capabilities() -> int:
    """This process's effective capability mask."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def preflight_problems() -> list[str]:
    """Why this process cannot build the mesh here (empty: it can)."""
    problems = []
    missing = missing_capabilities(effective_capabilities())
    if missing:
        problems.append(
            f"missing {' and '.join(missing)}: network namespaces, veths and nftables rules need root "
            "(run with sudo, or grant CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        )
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` not found: install the {package} package")
    if not Path("/proc/sys/net/bridge").is_dir():
        problems.append(
            "the br_netfilter kernel module is not loaded (`modprobe br_netfilter`): like kube-proxy, "
            "service traffic between pods on one node needs it to be un-NATed"
        )
    return problems


# --- the journal ---


@dataclass(kw_only=True)
class RunState:
    """What this run created, saved to `path` (JSON) on every change. Thread-safe."""

    path: Path
    supervisor: ProcessRecord | None = None
    netns: list[str] = field(default_factory=list)
    host_links: list[str] = field(default_factory=list)
    host_nft_tables: list[str] = field(default_factory=list)  # "family name"
    processes: dict[str, ProcessRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path) -> RunState:
        """The journal at `path` (an empty one if there is none)."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path=path)
        except (OSError, ValueError) as exc:
            raise NetworkError(f"cannot read the run state {path}: {exc}; remove leftovers by hand") from exc
        supervisor = data.get("supervisor")
        return cls(
            path=path,
            supervisor=ProcessRecord.from_json(supervisor) if supervisor else None,
            netns=list(data.get("netns", [])),
            host_links=list(data.get("host_links", [])),
            host_nft_tables=list(data.get("host_nft_tables", [])),
            processes={name: ProcessRecord.from_json(record) for name, record in data.get("processes", {}).items()},
        )

    @property
    def is_empty(self) -> bool:
        return not (self.supervisor or self.netns or self.host_links or self.host_nft_tables or self.processes)

    def set_supervisor(self, record: ProcessRecord | None) -> None:
        with self._lock:
            self.supervisor = record
            self._save()

    def record_netns(self, name: str) -> None:
        self._add(self.netns, name)

    def forget_netns(self, name: str) -> None:
        self._discard(self.netns, name)

    def record_host_link(self, name: str) -> None:
        self._add(self.host_links, name)

    def forget_host_link(self, name: str) -> None:
        self._discard(self.host_links, name)

    def record_host_nft_table(self, family: str, name: str) -> None:
        self._add(self.host_nft_tables, f"{family} {name}")

    def forget_host_nft_table(self, family: str, name: str) -> None:
        self._discard(self.host_nft_tables, f"{family} {name}")

    def record_process(self, record: ProcessRecord) -> None:
        with self._lock:
            self.processes[record.name] = record
            self._save()

    def forget_process(self, name: str) -> None:
        with self._lock:
            if self.processes.pop(name, None) is not None:
                self._save()

    def remove(self) -> None:
        """Delete the journal file (everything in it is gone)."""
        with self._lock:
            self.path.unlink(missing_ok=True)

    def _add(self, items: list[str], item: str) -> None:
        with self._lock:
            if item not in items:
                items.append(item)
                self._save()

    def _discard(self, items: list[str], item: str) -> None:
        with self._lock:
            if item in items:
                items.remove(item)
                self._save()

    def _save(self) -> None:
        data = {
            "supervisor": self.supervisor.to_json() if self.supervisor else None,
            "netns": self.netns,
            "host_links": self.host_links,
            "host_nft_tables": self.host_nft_tables,
            "processes": {name: record.to_json() for name, record in self.processes.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text(json.dumps(data, indent=1))
        os.replace(temporary, self.path)


# --- building ---


def create_router(state: RunState, nodes: Sequence[NodeAddresses]) -> None:
    """mesh-net (the node link's bridge and router) and the host veth with the host's one route."""
    _claim_netns(state, ROUTER_NETNS)
    if Path(f"/sys/class/net/{HOST_LINK}").exists():
        raise NetworkError(f"a link named {HOST_LINK} already exists on the host (another mesh?); remove it with `ip link del {HOST_LINK}`")
    _ip("link", "set", "lo", "up", netns=ROUTER_NETNS)
    _ip("link", "add", _ROUTER_BRIDGE, "type", "bridge", netns=ROUTER_NETNS)
    _ip("addr", "add", f"{ROUTER_LINK_ADDRESS}/{NODE_LINK_NETWORK.prefixlen}", "dev", _ROUTER_BRIDGE, netns=ROUTER_NETNS)
    _ip("link", "set", _ROUTER_BRIDGE, "up", netns=ROUTER_NETNS)
    _sysctl(ROUTER_NETNS, "net.ipv4.ip_forward", "1")
    state.record_host_link(HOST_LINK)
    _ip("link", "add", HOST_LINK, "type", "veth", "peer", "name", _HOST_PEER_LINK, "netns", ROUTER_NETNS)
    _ip("addr", "add", f"{HOST_ADDRESS}/{HOST_LINK_NETWORK.prefixlen}", "dev", HOST_LINK)
    _ip("link", "set", HOST_LINK, "up")
    _ip("addr", "add", f"{HOST_PEER_ADDRESS}/{HOST_LINK_NETWORK.prefixlen}", "dev", _HOST_PEER_LINK, netns=ROUTER_NETNS)
    _ip("link", "set", _HOST_PEER_LINK, "up", netns=ROUTER_NETNS)
    _ip("route", "add", str(MESH_NETWORK), "via", str(HOST_PEER_ADDRESS), "dev", HOST_LINK)
    for node in nodes:
        _ip("route", "add", str(node.pod_network), "via", str(node.link_address), netns=ROUTER_NETNS)


def create_node(state: RunState, node: NodeAddresses, nodes: Sequence[NodeAddresses]) -> str:
    """A node's namespace, joined to the node link, with its pod bridge; returns its netns name."""
    netns = node_netns(node.name)
    _claim_netns(state, netns)
    _ip("link", "set", "lo", "up", netns=netns)
    # Created in mesh-net with its peer placed in the node: the link dies with either namespace.
    router_port = f"vnode{node.index}"
    _ip("link", "add", router_port, "type", "veth", "peer", "name", NODE_LINK, "netns", netns, netns=ROUTER_NETNS)
    _ip("link", "set", router_port, "master", _ROUTER_BRIDGE, "up", netns=ROUTER_NETNS)
    _ip("addr", "add", f"{node.link_address}/{NODE_LINK_NETWORK.prefixlen}", "dev", NODE_LINK, netns=netns)
    _ip("link", "set", NODE_LINK, "up", netns=netns)
    _ip("link", "add", NODE_BRIDGE, "type", "bridge", netns=netns)
    _ip("addr", "add", f"{node.gateway}/{node.pod_network.prefixlen}", "dev", NODE_BRIDGE, netns=netns)
    _ip("link", "set", NODE_BRIDGE, "up", netns=netns)
    for other in nodes:
        if other.name != node.name:
            _ip("route", "add", str(other.pod_network), "via", str(other.link_address), netns=netns)
    _ip("route", "add", str(MESH_NETWORK), "via", str(ROUTER_LINK_ADDRESS), netns=netns)
    _sysctl(netns, "net.ipv4.ip_forward", "1")
    # Bridged pod-to-pod replies must pass conntrack to undo a service DNAT (kube-proxy's need).
    _sysctl(netns, "net.bridge.bridge-nf-call-iptables", "1")
    return netns


def create_pod_network(state: RunState, *, netns: str, node: NodeAddresses, ip: str) -> None:
    """A pod's namespace with eth0 on its node's bridge, `ip`, and a default route to the node."""
    _claim_netns(state, netns)
    node_ns = node_netns(node.name)
    # The node-side name must fit IFNAMSIZ (15) and be unique on the node: hash the netns name.
    node_side = "veth" + hashlib.sha1(netns.encode()).hexdigest()[:8]
    _ip("link", "set", "lo", "up", netns=netns)
    _ip("link", "add", node_side, "type", "veth", "peer", "name", POD_INTERFACE, "netns", netns, netns=node_ns)
    _ip("link", "set", node_side, "master", NODE_BRIDGE, "up", netns=node_ns)
    # br_netfilter turns a pod's connection to its own Service back out of the port it came
    # in on; the bridge only does that with hairpin on (kubelet's hairpin-veth mode).
    _ip("link", "set", node_side, "type", "bridge_slave", "hairpin", "on", netns=node_ns)
    _ip("addr", "add", f"{ip}/{node.pod_network.prefixlen}", "dev", POD_INTERFACE, netns=netns)
    _ip("link", "set", POD_INTERFACE, "up", netns=netns)
    _ip("route", "add", "default", "via", str(node.gateway), netns=netns)


def delete_netns(state: RunState, name: str) -> None:
    """Remove a network namespace (gone already is fine)."""
    if netns_path(name).exists():
        _ip("netns", "delete", name, missing_ok=True)
    state.forget_netns(name)


def delete_host_link(state: RunState, name: str) -> None:
    """Remove a link of the host namespace (gone already is fine)."""
    if Path(f"/sys/class/net/{name}").exists():
        _ip("link", "delete", name, missing_ok=True)
    state.forget_host_link(name)


def _claim_netns(state: RunState, name: str) -> None:
    """Journal, then create, a namespace that must not exist yet."""
    if netns_path(name).exists():
        if name in state.netns:  # e.g. pods "a-b/c" and "a/b-c" map to the same name
            raise NetworkError(f"network namespace {name} is already used by another object of this mesh")
        raise NetworkError(
            f"network namespace {name} already exists but this run did not create it "
            f"(another mesh, or a different run dir?); remove it with `ip netns delete {name}`"
        )
    state.record_netns(name)
    _ip("netns", "add", name)


def _ip(*args: str, netns: str | None = None, missing_ok: bool = False) -> None:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    _run(command, missing_ok=missing_ok)


def _sysctl(netns: str, name: str, value: str) -> None:
    _run(["ip", "netns", "exec", netns, "sysctl", "-qw", f"{name}={value}"])


def _run(command: list[str], *, missing_ok: bool = False) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        if missing_ok and ("No such" in detail or "Cannot find" in detail or "does not exist" in detail):
            return
        raise NetworkError(f"`{' '.join(command)}` failed: {detail}")
