"""Service VIPs for traffic outside the mesh, done the way kube-proxy's nftables mode does it.

For every Service port: new connections to VIP:port are DNATed to one of the ready
endpoints (pods of the Service's namespace matching its selector, with a podIP and the
Ready condition), picked by `numgen random mod N`; a pod that reaches itself through
its Service is masqueraded (else its reply would bypass the NAT); a Service port with no ready endpoint
is refused with a TCP reset at once rather than left to time out. The same table is
installed in every node namespace (pods' traffic is routed through their node: prerouting;
node processes: output) and in the host namespace (a user's curl: output), always the
whole table in one `nft -f` transaction, so a connection never sees half an update.

Mesh traffic does not get here: in-pod capture takes an enrolled pod's connection to a VIP
before it leaves the pod, and ztunnel resolves the VIP itself.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ambientctl.runtime.addressing import SERVICE_NETWORK

FAMILY = "ip"
TABLE = "ambient_kubeproxy"
# kube-proxy's masquerade bit; ztunnel's 0x539 marks live in pod namespaces and never meet it.
MASQUERADE_MARK = 0x4000


class KubeProxyError(Exception):
    """nft refused the rules; says where (host or which namespace) and nft's message."""


@dataclass(frozen=True, order=True, kw_only=True)
class ServicePortRule:
    """Where connections to one Service port go."""

    vip: str
    port: int
    service: str  # "namespace/name", for the rule's comment
    endpoints: tuple[tuple[str, int], ...]  # (podIP, targetPort), sorted


def is_ready(pod: Mapping[str, Any]) -> bool:
    """A pod that may receive traffic: running, Ready, with an IP, not being deleted."""
    status = pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
    deleting = bool(pod.get("metadata", {}).get("deletionTimestamp"))
    return status.get("phase") == "Running" and ready and bool(status.get("podIP")) and not deleting


def service_rules(services: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]) -> tuple[ServicePortRule, ...]:
    """The rules for stored Services (with ClusterIPs) and Pods (with status)."""
    ready_pods = [pod for pod in pods if is_ready(pod)]
    rules = []
    for service in services:
        metadata, spec = service["metadata"], service["spec"]
        vip = spec.get("clusterIP")
        if not vip:
            continue
        selector = spec.get("selector") or {}
        # As in Kubernetes, a Service without a selector gets no endpoints from pods.
        members = [
            pod
            for pod in ready_pods
            if selector
            and pod["metadata"].get("namespace") == metadata["namespace"]
            and all((pod["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
        ]
        for port in spec["ports"]:
            endpoints = []
            for pod in members:
                target = _target_port(port.get("targetPort", port["port"]), pod)
                if target is not None:
                    endpoints.append((pod["status"]["podIP"], target))
            rules.append(
                ServicePortRule(
                    vip=vip, port=port["port"], service=f"{metadata['namespace']}/{metadata['name']}", endpoints=tuple(sorted(endpoints))
                )
            )
    return tuple(sorted(rules))


def render(rules: Iterable[ServicePortRule]) -> str:
    """An `nft -f` script that replaces the whole table atomically."""
    services, endpoints, refuse = [], [], []
    for rule in rules:
        match = f"ip daddr {rule.vip} tcp dport {rule.port}"
        comment = f'comment "{rule.service}:{rule.port}"'
        if not rule.endpoints:
            refuse.append(f"    {match} reject with tcp reset {comment}")
            continue
        chains = []
        for ip, port in rule.endpoints:
            chain = f"endpoint_{len(endpoints)}"
            chains.append(chain)
            endpoints += [
                f"  chain {chain} {{",
                # Hairpin: a pod reaching itself through its own Service must see the reply come
                # back through the node, so that connection is masqueraded (kube-proxy does the same).
                f"    ip saddr {ip} meta mark set meta mark | {MASQUERADE_MARK:#x}",
                f"    meta l4proto tcp dnat ip to {ip}:{port}",
                "  }",
            ]
        if len(chains) == 1:
            services.append(f"    {match} goto {chains[0]} {comment}")
        else:
            choices = ", ".join(f"{index} : goto {chain}" for index, chain in enumerate(chains))
            services.append(f"    {match} numgen random mod {len(chains)} vmap {{ {choices} }} {comment}")
    vips = f"ip daddr {SERVICE_NETWORK}"
    lines = [
        # Declaring the table first makes the delete valid even when it does not exist yet.
        f"table {FAMILY} {TABLE}",
        f"delete table {FAMILY} {TABLE}",
        f"table {FAMILY} {TABLE} {{",
        *endpoints,
        "  chain services {",
        *services,
        "  }",
        "  chain no_endpoints {",
        *refuse,
        "  }",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat;",
        f"    {vips} jump services",
        "  }",
        "  chain output {",
        "    type nat hook output priority -100;",
        f"    {vips} jump services",
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat;",
        f"    meta mark & {MASQUERADE_MARK:#x} == {MASQUERADE_MARK:#x} masquerade",
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter;",
        f"    {vips} jump no_endpoints",
        "  }",
        "  chain local_output {",
        "    type filter hook output priority filter;",
        f"    {vips} jump no_endpoints",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def install(script: str, *, netns: str | None) -> None:
    """Load `script` (from `render`) in a named namespace, or in the host's (netns None)."""
    command = ["ip", "netns", "exec", netns, "nft", "-f", "-"] if netns else ["nft", "-f", "-"]
    result = subprocess.run(command, input=script, capture_output=True, text=True)
    if result.returncode != 0:
        where = f"namespace {netns}" if netns else "the host namespace"
        raise KubeProxyError(f"nft refused the service rules in {where}: {result.stderr.strip()}")


def remove_host_table() -> None:
    """Delete the table from the host namespace (absent already is fine)."""
    subprocess.run(["nft", "delete", "table", FAMILY, TABLE], capture_output=True)


def _target_port(target: int | str, pod: Mapping[str, Any]) -> int | None:
    if isinstance(target, int):
        return target
    for container in pod["spec"].get("containers") or ():
        for port in container.get("ports") or ():
            if port.get("name") == target:
                return int(port["containerPort"])
    return None  # this pod does not have the named port: not an endpoint of it
