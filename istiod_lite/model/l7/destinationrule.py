"""Istio DestinationRule -> the traffic policy of each cluster of its host.

- `host`: a short name is a Service of the rule's namespace. When several rules name one host,
  the oldest is used (as Istio does for sidecars without merging).
- `trafficPolicy`: `loadBalancer.simple` (ROUND_ROBIN, LEAST_REQUEST (alias LEAST_CONN),
  RANDOM), `connectionPool.tcp` (maxConnections, connectTimeout) and `.http`
  (http1MaxPendingRequests, http2MaxRequests, maxRequestsPerConnection, maxRetries,
  idleTimeout, h2UpgradePolicy, useClientProtocol), `outlierDetection` (consecutive5xxErrors,
  consecutiveGatewayErrors, interval, baseEjectionTime, maxEjectionPercent; minHealthPercent
  only 0: waypoints do not route to ejected endpoints in panic), `portLevelSettings`. Counts
  of 0 mean "not set", as in Istio.
- `subsets[]`: a name, pod labels, and a policy of their own.
- The policy of one cluster (port, subset) is Istio's `MergeTrafficPolicy`: the top-level
  policy, overridden section by section (loadBalancer, connectionPool, outlierDetection) by
  its port-level settings for that port, then by the subset's policy and the subset's
  port-level settings.
- `tls` modes DISABLE and ISTIO_MUTUAL are accepted and change nothing (traffic between
  waypoint and endpoints is HBONE mTLS anyway); origination (SIMPLE, MUTUAL) is rejected.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from istiod_lite.model.fields import (
    ObjectRef,
    boolean,
    mapping,
    port_number,
    sequence,
    string,
    string_map,
)
from istiod_lite.model.l7 import values

# Envoy's `simple` load balancer names; LEAST_CONN is Istio's deprecated alias.
LOAD_BALANCERS: Mapping[str, str] = {
    "ROUND_ROBIN": "ROUND_ROBIN",
    "LEAST_REQUEST": "LEAST_REQUEST",
    "LEAST_CONN": "LEAST_REQUEST",
    "RANDOM": "RANDOM",
}
_MAX_COUNT = 2**31 - 1
_MAX_PERCENT = 100
_ACCEPTED_TLS_MODES = frozenset({"DISABLE", "ISTIO_MUTUAL"})

_SPEC = frozenset({"host", "trafficPolicy", "subsets", "exportTo"})
_SPEC_UNSUPPORTED = frozenset({"workloadSelector"})
_POLICY = frozenset(
    {"loadBalancer", "connectionPool", "outlierDetection", "tls", "portLevelSettings"}
)
_POLICY_UNSUPPORTED = frozenset({"proxyProtocol", "tunnel", "retryBudget"})
_PORT_POLICY = frozenset({"port", "loadBalancer", "connectionPool", "outlierDetection", "tls"})
_PORT_SELECTOR = frozenset({"number"})
_LOAD_BALANCER = frozenset({"simple"})
_LOAD_BALANCER_UNSUPPORTED = frozenset(
    {"consistentHash", "localityLbSetting", "warmupDurationSecs", "warmup"}
)
_CONNECTION_POOL = frozenset({"tcp", "http"})
_TCP = frozenset({"maxConnections", "connectTimeout"})
_TCP_UNSUPPORTED = frozenset({"tcpKeepalive", "maxConnectionDuration", "idleTimeout"})
_HTTP = frozenset(
    {
        "http1MaxPendingRequests",
        "http2MaxRequests",
        "maxRequestsPerConnection",
        "maxRetries",
        "idleTimeout",
        "h2UpgradePolicy",
        "useClientProtocol",
    }
)
_HTTP_UNSUPPORTED = frozenset({"maxConcurrentStreams"})
_OUTLIER = frozenset(
    {
        "consecutive5xxErrors",
        "consecutiveGatewayErrors",
        "interval",
        "baseEjectionTime",
        "maxEjectionPercent",
    }
)
_OUTLIER_UNSUPPORTED = frozenset(
    {
        "minHealthPercent",
        "consecutiveErrors",
        "splitExternalLocalOriginErrors",
        "consecutiveLocalOriginFailures",
    }
)
_TLS = frozenset({"mode"})
_SUBSET = frozenset({"name", "labels", "trafficPolicy"})
_H2_UPGRADE_POLICIES = frozenset({"DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"})


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    """Limits; None where not set (the cluster then has Istio's defaults)."""

    max_connections: int | None = None
    connect_timeout: datetime.timedelta | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: datetime.timedelta | None = None
    h2_upgrade: bool = False  # speak HTTP/2 to the endpoints even for HTTP/1.1 clients
    use_client_protocol: bool = False  # speak the client's protocol to the endpoints


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx_errors: int | None
    consecutive_gateway_errors: int | None
    interval: datetime.timedelta | None
    base_ejection_time: datetime.timedelta | None
    max_ejection_percent: int | None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """One cluster's policy; each section None where not set."""

    load_balancer: str | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None

    def overridden_by(self, other: TrafficPolicy | None) -> TrafficPolicy:
        """Istio's merge: each section `other` sets replaces this one's."""
        if other is None:
            return self
        return TrafficPolicy(
            load_balancer=other.load_balancer or self.load_balancer,
            connection_pool=other.connection_pool or self.connection_pool,
            outlier_detection=other.outlier_detection or self.outlier_detection,
        )


NO_POLICY = TrafficPolicy()


@dataclass(frozen=True, slots=True)
class PolicyWithPorts:
    """A policy plus its `portLevelSettings`."""

    policy: TrafficPolicy
    ports: tuple[tuple[int, TrafficPolicy], ...] = ()

    def for_port(self, port: int) -> TrafficPolicy:
        return self.policy.overridden_by(dict(self.ports).get(port))


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: tuple[tuple[str, str], ...]
    policy: PolicyWithPorts | None


@dataclass(frozen=True, slots=True)
class DestinationRule:
    namespace: str
    name: str
    created: str
    host: str  # FQDN (or a wildcard, which waypoints do not use)
    policy: PolicyWithPorts
    subsets: tuple[Subset, ...]

    @property
    def age_key(self) -> tuple[str, str, str]:
        return (self.created, self.namespace, self.name)

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)

    def policy_for(self, port: int, subset: Subset | None) -> TrafficPolicy:
        policy = self.policy.for_port(port)
        if subset is not None and subset.policy is not None:
            policy = policy.overridden_by(subset.policy.for_port(port))
        return policy


def parse_destination_rule(namespace: str, name: str, obj: Mapping[str, Any]) -> DestinationRule:
    ref = ObjectRef("DestinationRule", namespace, name)
    meta = mapping(ref, obj.get("metadata"), "metadata")
    spec = values.section(ref, obj.get("spec"), "spec", _SPEC, _SPEC_UNSUPPORTED)
    host = string(ref, spec.get("host"), "spec.host")
    if not host:
        raise ref.error("spec.host", "required")
    subsets: list[Subset] = []
    for i, entry in enumerate(sequence(ref, spec.get("subsets"), "spec.subsets")):
        path = f"spec.subsets[{i}]"
        subset = values.section(ref, entry, path, _SUBSET)
        subset_name = string(ref, subset.get("name"), f"{path}.name")
        if not subset_name:
            raise ref.error(f"{path}.name", "required")
        if any(s.name == subset_name for s in subsets):
            raise ref.error(f"{path}.name", f"subset {subset_name!r} is defined twice")
        if "|" in subset_name:
            raise ref.error(f"{path}.name", f"{subset_name!r}: '|' is not allowed in subset names")
        labels = string_map(ref, subset.get("labels"), f"{path}.labels")
        subsets.append(
            Subset(
                name=subset_name,
                labels=tuple(sorted(labels.items())),
                policy=(
                    _policy_with_ports(ref, subset["trafficPolicy"], f"{path}.trafficPolicy")
                    if subset.get("trafficPolicy") is not None
                    else None
                ),
            )
        )
    return DestinationRule(
        namespace=namespace,
        name=name,
        created=string(ref, meta.get("creationTimestamp"), "metadata.creationTimestamp"),
        host=values.resolve_host(host, namespace),
        policy=_policy_with_ports(ref, spec.get("trafficPolicy"), "spec.trafficPolicy"),
        subsets=tuple(subsets),
    )


def _policy_with_ports(ref: ObjectRef, value: Any, path: str) -> PolicyWithPorts:
    spec = values.section(ref, value, path, _POLICY, _POLICY_UNSUPPORTED)
    ports: dict[int, TrafficPolicy] = {}
    for i, entry in enumerate(
        sequence(ref, spec.get("portLevelSettings"), f"{path}.portLevelSettings")
    ):
        entry_path = f"{path}.portLevelSettings[{i}]"
        settings = values.section(ref, entry, entry_path, _PORT_POLICY)
        selector = values.section(ref, settings.get("port"), f"{entry_path}.port", _PORT_SELECTOR)
        port = port_number(ref, selector.get("number"), f"{entry_path}.port.number")
        if port in ports:
            raise ref.error(f"{entry_path}.port.number", f"port {port} has settings twice")
        ports[port] = _policy(ref, settings, entry_path)
    return PolicyWithPorts(_policy(ref, spec, path), tuple(sorted(ports.items())))


def _policy(ref: ObjectRef, spec: Mapping[str, Any], path: str) -> TrafficPolicy:
    if spec.get("tls") is not None:
        tls = values.section(ref, spec["tls"], f"{path}.tls", _TLS)
        mode = string(ref, tls.get("mode"), f"{path}.tls.mode", default="DISABLE")
        if mode not in _ACCEPTED_TLS_MODES:
            raise ref.error(
                f"{path}.tls.mode",
                f"{mode}: waypoints do not originate TLS; endpoints are reached over HBONE mTLS",
            )
    return TrafficPolicy(
        load_balancer=_load_balancer(ref, spec.get("loadBalancer"), f"{path}.loadBalancer"),
        connection_pool=_connection_pool(ref, spec.get("connectionPool"), f"{path}.connectionPool"),
        outlier_detection=_outlier_detection(
            ref, spec.get("outlierDetection"), f"{path}.outlierDetection"
        ),
    )


def _load_balancer(ref: ObjectRef, value: Any, path: str) -> str | None:
    if value is None:
        return None
    spec = values.section(ref, value, path, _LOAD_BALANCER, _LOAD_BALANCER_UNSUPPORTED)
    simple = string(ref, spec.get("simple"), f"{path}.simple", default="UNSPECIFIED")
    if simple == "UNSPECIFIED":
        return None
    if simple not in LOAD_BALANCERS:
        raise ref.error(
            f"{path}.simple",
            f"{simple!r} is not supported; expected ROUND_ROBIN, LEAST_REQUEST or RANDOM",
        )
    return LOAD_BALANCERS[simple]


def _count(ref: ObjectRef, value: Any, path: str) -> int | None:
    """A limit where 0 (or absent) means "not set"."""
    if value is None:
        return None
    return values.integer(ref, value, path, minimum=0, maximum=_MAX_COUNT) or None


def _optional_duration(ref: ObjectRef, value: Any, path: str) -> datetime.timedelta | None:
    return values.duration(ref, value, path) if value is not None else None


def _connection_pool(ref: ObjectRef, value: Any, path: str) -> ConnectionPool | None:
    if value is None:
        return None
    spec = values.section(ref, value, path, _CONNECTION_POOL)
    tcp = values.section(ref, spec.get("tcp"), f"{path}.tcp", _TCP, _TCP_UNSUPPORTED)
    http = values.section(ref, spec.get("http"), f"{path}.http", _HTTP, _HTTP_UNSUPPORTED)
    upgrade = string(
        ref, http.get("h2UpgradePolicy"), f"{path}.http.h2UpgradePolicy", default="DEFAULT"
    )
    if upgrade not in _H2_UPGRADE_POLICIES:
        raise ref.error(
            f"{path}.http.h2UpgradePolicy",
            f"{upgrade!r} is not one of DEFAULT, DO_NOT_UPGRADE, UPGRADE",
        )
    return ConnectionPool(
        max_connections=_count(ref, tcp.get("maxConnections"), f"{path}.tcp.maxConnections"),
        connect_timeout=_optional_duration(
            ref, tcp.get("connectTimeout"), f"{path}.tcp.connectTimeout"
        ),
        http1_max_pending_requests=_count(
            ref, http.get("http1MaxPendingRequests"), f"{path}.http.http1MaxPendingRequests"
        ),
        http2_max_requests=_count(
            ref, http.get("http2MaxRequests"), f"{path}.http.http2MaxRequests"
        ),
        max_requests_per_connection=_count(
            ref, http.get("maxRequestsPerConnection"), f"{path}.http.maxRequestsPerConnection"
        ),
        max_retries=_count(ref, http.get("maxRetries"), f"{path}.http.maxRetries"),
        idle_timeout=_optional_duration(ref, http.get("idleTimeout"), f"{path}.http.idleTimeout"),
        h2_upgrade=upgrade == "UPGRADE",
        use_client_protocol=boolean(
            ref, http.get("useClientProtocol"), f"{path}.http.useClientProtocol"
        ),
    )


def _outlier_detection(ref: ObjectRef, value: Any, path: str) -> OutlierDetection | None:
    if value is None:
        return None
    spec = values.section(ref, value, path, _OUTLIER, _OUTLIER_UNSUPPORTED)

    def count(field: str) -> int | None:
        if spec.get(field) is None:
            return None
        return values.integer(ref, spec[field], f"{path}.{field}", minimum=0, maximum=_MAX_COUNT)

    def percent(field: str) -> int | None:
        if spec.get(field) is None:
            return None
        return values.integer(ref, spec[field], f"{path}.{field}", minimum=0, maximum=_MAX_PERCENT)

    return OutlierDetection(
        consecutive_5xx_errors=count("consecutive5xxErrors"),
        consecutive_gateway_errors=count("consecutiveGatewayErrors"),
        interval=_optional_duration(ref, spec.get("interval"), f"{path}.interval"),
        base_ejection_time=_optional_duration(
            ref, spec.get("baseEjectionTime"), f"{path}.baseEjectionTime"
        ),
        max_ejection_percent=percent("maxEjectionPercent"),
    )
