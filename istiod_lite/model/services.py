"""Kubernetes Services -> `istio.workload.Service`, and a pod's port list for a service.

A Service resource carries no endpoints: each selected pod's Workload lists the service
(`"<ns>/<hostname>"`) with its own port mapping, because a named targetPort can resolve to a
different container port on each pod (ambient-facts §4; Istio services.go/workloads.go
`constructService`, `constructServices`).

- hostname `<name>.<ns>.svc.cluster.local`; addresses the cluster IPs (none when headless);
- a port's target is its numeric targetPort (absent: the port itself) or 0 when named;
- the app protocol comes from `appProtocol`, else the port name's prefix (`http-web`);
- ExternalName services are left to DNS, as Istio does: no resource, no endpoints;
- a service bound to a waypoint (`istio.io/use-waypoint`, resolved by the translator) carries
  the waypoint's address, so ztunnels send its traffic there.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from istiod_lite.model.fields import ObjectRef, mapping, port_number, sequence, string, string_map
from istiod_lite.model.workloads import Pod
from meshcore._gen import workload_pb2

CLUSTER_DOMAIN = "cluster.local"

_APP_PROTOCOLS: Mapping[str, int] = {
    "http": workload_pb2.AppProtocol.HTTP11,
    "http2": workload_pb2.AppProtocol.HTTP2,
    "grpc": workload_pb2.AppProtocol.GRPC,
    "tcp": workload_pb2.AppProtocol.TCP,
    "tls": workload_pb2.AppProtocol.TLS,
}
# Kubernetes' standard appProtocol for cleartext HTTP/2 (KEP-3726).
_K8S_APP_PROTOCOLS: Mapping[str, int] = {"kubernetes.io/h2c": workload_pb2.AppProtocol.HTTP2}


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    # The numeric target, or 0 when `target_port_name` names a container port.
    target_port: int
    target_port_name: str
    app_protocol: int


@dataclass(frozen=True, slots=True)
class KubeService:
    """What translation needs of a Service."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    # Empty: the service selects no pods (endpoints managed by hand, or none).
    selector: Mapping[str, str]
    addresses: tuple[bytes, ...]
    ports: tuple[ServicePort, ...]
    external_name: bool

    @property
    def hostname(self) -> str:
        return service_hostname(self.namespace, self.name)

    @property
    def key(self) -> str:
        """The xDS resource name and the key in workloads' `services` map."""
        return f"{self.namespace}/{self.hostname}"

    @property
    def selects_pods(self) -> bool:
        return bool(self.selector) and not self.external_name


def service_hostname(namespace: str, name: str) -> str:
    return f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}"


def parse_service(namespace: str, name: str, obj: Mapping[str, Any]) -> KubeService:
    ref = ObjectRef("Service", namespace, name)
    meta = mapping(ref, obj.get("metadata"), "metadata")
    spec = mapping(ref, obj.get("spec"), "spec")
    return KubeService(
        namespace=namespace,
        name=name,
        labels=string_map(ref, meta.get("labels"), "metadata.labels"),
        selector=string_map(ref, spec.get("selector"), "spec.selector"),
        addresses=_cluster_ips(ref, spec),
        ports=tuple(
            _port(ref, mapping(ref, entry, f"spec.ports[{i}]"), f"spec.ports[{i}]")
            for i, entry in enumerate(sequence(ref, spec.get("ports"), "spec.ports"))
        ),
        external_name=string(ref, spec.get("type"), "spec.type") == "ExternalName",
    )


def _cluster_ips(ref: ObjectRef, spec: Mapping[str, Any]) -> tuple[bytes, ...]:
    found = [
        (f"spec.clusterIPs[{i}]", ip)
        for i, ip in enumerate(sequence(ref, spec.get("clusterIPs"), "spec.clusterIPs"))
    ]
    if not found:
        found = [("spec.clusterIP", spec.get("clusterIP"))]
    addresses: list[bytes] = []
    for path, value in found:
        text = string(ref, value, path)
        if text in ("", "None"):  # headless
            continue
        try:
            packed = ipaddress.ip_address(text).packed
        except ValueError:
            raise ref.error(path, f"{text!r} is not an IP address") from None
        if packed not in addresses:
            addresses.append(packed)
    return tuple(addresses)


def _port(ref: ObjectRef, entry: Mapping[str, Any], path: str) -> ServicePort:
    port = port_number(ref, entry.get("port"), f"{path}.port")
    target = entry.get("targetPort")
    target_port, target_name = port, ""
    if isinstance(target, str) and not target.isdigit():
        if not target:
            raise ref.error(f"{path}.targetPort", "empty port name")
        target_port, target_name = 0, target
    elif target is not None:
        target_port = port_number(ref, target, f"{path}.targetPort")
    port_name = string(ref, entry.get("name"), f"{path}.name")
    declared = string(ref, entry.get("appProtocol"), f"{path}.appProtocol")
    return ServicePort(
        port=port,
        target_port=target_port,
        target_port_name=target_name,
        app_protocol=app_protocol(port_name, declared),
    )


def app_protocol(port_name: str, declared: str) -> int:
    """`appProtocol` if recognised, else the port name's protocol prefix ("grpc-api")."""
    if declared:
        known = _APP_PROTOCOLS.get(declared.lower()) or _K8S_APP_PROTOCOLS.get(declared.lower())
        if known is not None:
            return known
    prefix = port_name.split("-", 1)[0].lower()
    return _APP_PROTOCOLS.get(prefix, workload_pb2.AppProtocol.UNKNOWN)


def build_service(
    service: KubeService, *, waypoint: workload_pb2.GatewayAddress | None = None
) -> workload_pb2.Service | None:
    """The Service resource, or None for ExternalName services."""
    if service.external_name:
        return None
    return workload_pb2.Service(
        waypoint=waypoint,
        name=service.name,
        namespace=service.namespace,
        hostname=service.hostname,
        addresses=[workload_pb2.NetworkAddress(network="", address=a) for a in service.addresses],
        ports=[
            workload_pb2.Port(
                service_port=p.port, target_port=p.target_port, app_protocol=p.app_protocol
            )
            for p in service.ports
        ],
    )


def workload_ports(service: KubeService, pod: Pod) -> workload_pb2.PortList:
    """The pod's port mapping for a service selecting it; unresolvable named ports are left out."""
    ports = []
    for p in service.ports:
        target = p.target_port
        if p.target_port_name:
            resolved = pod.container_ports.get(p.target_port_name)
            if resolved is None:
                continue
            target = resolved
        ports.append(workload_pb2.Port(service_port=p.port, target_port=target))
    return workload_pb2.PortList(ports=ports)
