"""Waypoints and what binds to them (ambient-facts §6).

A waypoint named W in namespace NS is declared by our `Waypoint` (istiodlite.io/v1alpha1,
`spec.trafficType`, `spec.replicas`) or by a Gateway API `Gateway` of class `istio-waypoint`
(traffic type from its `istio.io/waypoint-for` label). When both exist, the Waypoint is used.
Either way the waypoint runs as pods of ServiceAccount W behind a Service W (port 15008 `mesh`,
appProtocol hbone): ztunnels reach it as `W.NS.svc.cluster.local:15008`.

Binding (Istio pilot/pkg/serviceregistry/ambient/waypoints.go `GetUseWaypoint`):
- a Service (or a pod) uses the waypoint its `istio.io/use-waypoint` label names, else the one
  its namespace's label names; `istio.io/use-waypoint-namespace` on the same object names the
  waypoint's namespace (default: the object's own); the value `none` opts out even when the
  namespace is labelled;
- the waypoint must exist and carry that traffic: `service` (the default) binds Services,
  `workload` binds pods, `all` both, `none` nothing;
- a waypoint's own Service and pods (labelled `gateway.networking.k8s.io/gateway-name`) never
  use a waypoint: that would loop.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from istiod_lite.model.fields import ObjectRef, mapping, string, string_map
from istiod_lite.model.l7.values import integer
from istiod_lite.model.services import service_hostname
from meshcore._gen import workload_pb2

USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE_LABEL = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
WAYPOINT_GATEWAY_CLASS = "istio-waypoint"
OPT_OUT = "none"
HBONE_PORT = 15008
_MAX_REPLICAS = 1000

WaypointKey = tuple[str, str]  # (namespace, name)


class TrafficType(enum.Enum):
    """What a waypoint handles: traffic addressed to Services, to pods, both, or nothing."""

    SERVICE = "service"
    WORKLOAD = "workload"
    ALL = "all"
    NONE = "none"

    @property
    def for_services(self) -> bool:
        return self in (TrafficType.SERVICE, TrafficType.ALL)

    @property
    def for_workloads(self) -> bool:
        return self in (TrafficType.WORKLOAD, TrafficType.ALL)


@dataclass(frozen=True, slots=True)
class Waypoint:
    """A declared waypoint (from a Waypoint or an istio-waypoint Gateway)."""

    namespace: str
    name: str
    traffic_type: TrafficType


def audience_key(key: WaypointKey) -> str:
    """The waypoint's name in resource audiences and in its proxies' `WAYPOINT` metadata."""
    return f"{key[0]}/{key[1]}"


def gateway_address(key: WaypointKey) -> workload_pb2.GatewayAddress:
    """How ztunnels reach a waypoint: its Service's hostname, HBONE on 15008."""
    namespace, name = key
    return workload_pb2.GatewayAddress(
        hostname=workload_pb2.NamespacedHostname(
            namespace=namespace, hostname=service_hostname(namespace, name)
        ),
        hbone_mtls_port=HBONE_PORT,
    )


def parse_waypoint(namespace: str, name: str, obj: Mapping[str, Any]) -> Waypoint:
    """Our Waypoint CRD."""
    ref = ObjectRef("Waypoint", namespace, name)
    spec = mapping(ref, obj.get("spec"), "spec")
    traffic_type = _traffic_type(
        ref, string(ref, spec.get("trafficType"), "spec.trafficType"), "spec.trafficType"
    )
    if spec.get("replicas") is not None:
        integer(ref, spec.get("replicas"), "spec.replicas", minimum=0, maximum=_MAX_REPLICAS)
    return Waypoint(namespace=namespace, name=name, traffic_type=traffic_type)


def parse_gateway(namespace: str, name: str, obj: Mapping[str, Any]) -> Waypoint | None:
    """A Gateway API Gateway: a waypoint if its class is istio-waypoint, else None."""
    ref = ObjectRef("Gateway", namespace, name)
    spec = mapping(ref, obj.get("spec"), "spec")
    if string(ref, spec.get("gatewayClassName"), "spec.gatewayClassName") != WAYPOINT_GATEWAY_CLASS:
        return None
    meta = mapping(ref, obj.get("metadata"), "metadata")
    labels = string_map(ref, meta.get("labels"), "metadata.labels")
    path = f"metadata.labels[{WAYPOINT_FOR_LABEL}]"
    traffic_type = _traffic_type(ref, labels.get(WAYPOINT_FOR_LABEL, ""), path)
    return Waypoint(namespace=namespace, name=name, traffic_type=traffic_type)


def _traffic_type(ref: ObjectRef, text: str, path: str) -> TrafficType:
    if not text:
        return TrafficType.SERVICE
    try:
        return TrafficType(text)
    except ValueError:
        raise ref.error(path, f"{text!r} is not one of service, workload, all, none") from None


def requested_waypoint(
    labels: Mapping[str, str], namespace_labels: Mapping[str, str], namespace: str
) -> WaypointKey | None:
    """The waypoint an object's (or else its namespace's) labels ask for; None if none/opted out."""
    source = labels if USE_WAYPOINT_LABEL in labels else namespace_labels
    name = source.get(USE_WAYPOINT_LABEL, "")
    if not name or name == OPT_OUT or GATEWAY_NAME_LABEL in labels:
        return None
    return (source.get(USE_WAYPOINT_NAMESPACE_LABEL) or namespace, name)
