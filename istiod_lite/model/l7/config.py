"""WaypointConfig: waypoints, their bindings and L7 config -> Envoy resources, incrementally.

Theory of operation
    The translator hands every change of an L7 kind (VirtualService, DestinationRule,
    HTTPRoute, targetRef AuthorizationPolicy, Waypoint, Gateway) and of the objects L7 config
    reads (Namespace labels, Services, Pods) to this class. Each change is parsed first (a
    malformed object raises `TranslationError` before anything changes) and then marks service
    hostnames in an `L7Affected`:

    | change                       | routes rebuilt for                | clusters rebuilt for  |
    |------------------------------|-----------------------------------|-----------------------|
    | VirtualService               | its hosts                         | (via references)      |
    | HTTPRoute                    | its Services / its waypoint's     | (via references)      |
    | AuthorizationPolicy          | its Services / its waypoint's     |                       |
    | DestinationRule              | hosts whose routes name its host  | its host              |
    | Service                      | it, hosts whose routes name it    | it                    |
    | Waypoint, Gateway, Namespace | services (re)bound to it          | (via references)      |
    | Pod                          |                                   | services selecting it |

    Rebuilding a host's routes builds its Listener and RouteConfiguration per service port
    (when the service is bound to a waypoint) and records which clusters those routes use;
    every host whose clusters gained or lost a user is then rebuilt too. A host's clusters are
    those its own listeners need (each port, with and without each subset) plus those other
    hosts' routes name; each cluster is visible to the waypoints that use it.

Route errors that depend on other objects (a destination subset no DestinationRule defines)
are found when a host's routes are built: the host keeps its last good routes, the error is
listed against the route's VirtualService until a rebuild succeeds. Hosts whose routes name
another host are rebuilt when that host's DestinationRule or Service changes, so a
DestinationRule arriving after its VirtualService resolves the error without a resend.

A host with no VirtualService or HTTPRoute gets one default route to `outbound|<port>||<host>`.
HTTPRoutes attached to a service take precedence over VirtualServices for its host; among
several VirtualServices for a host, an exact host beats a wildcard and then the oldest wins.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from google.protobuf.message import Message

from istiod_lite.model.errors import TranslationError, TranslationWarning
from istiod_lite.model.fields import ObjectRef
from istiod_lite.model.l7 import envoy
from istiod_lite.model.l7.authz import PolicyTarget, WaypointPolicy
from istiod_lite.model.l7.destinationrule import NO_POLICY, DestinationRule, parse_destination_rule
from istiod_lite.model.l7.envoy import ClusterRef, UpstreamEndpoint
from istiod_lite.model.l7.httproute import HttpRoute, parse_http_route
from istiod_lite.model.l7.routes import Destination, RouteRule
from istiod_lite.model.l7.values import host_matches, service_of_host
from istiod_lite.model.l7.virtualservice import VirtualService, parse_virtual_service
from istiod_lite.model.l7.waypoints import (
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL,
    WAYPOINT_GATEWAY_CLASS,
    Waypoint,
    WaypointKey,
    audience_key,
    parse_gateway,
    parse_waypoint,
    requested_waypoint,
)
from istiod_lite.model.services import KubeService, workload_ports
from istiod_lite.model.state import ClusterState, ObjectKey
from istiod_lite.model.workloads import Pod, PodKey, is_enrolled
from meshcore._gen import workload_pb2
from meshcore.log import get_logger
from meshcore.xds.types import (
    CLUSTER_TYPE_URL,
    ENDPOINT_TYPE_URL,
    LISTENER_TYPE_URL,
    ROUTE_TYPE_URL,
)

_log = get_logger("translate")

L7_TYPE_URLS = (LISTENER_TYPE_URL, ROUTE_TYPE_URL, CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL)
# The kinds `WaypointConfig.apply` takes (AuthorizationPolicy comes through `put_policy`).
L7_KINDS = frozenset({"VirtualService", "DestinationRule", "HTTPRoute", "Gateway", "Waypoint"})
_ANY_ADDRESS = "0.0.0.0"
_ALL_WAYPOINTS = PolicyTarget("GatewayClass", "", WAYPOINT_GATEWAY_CLASS)


class Emit(NamedTuple):
    """One resource to (re)emit, or remove when `message` is None, for `audience`."""

    type_url: str
    name: str
    message: Message | None
    audience: frozenset[str] | None


@dataclass
class L7Affected:
    """What a change can have altered: hostnames to rebuild, and ztunnel objects whose
    waypoint may have changed."""

    route_hosts: set[str] = field(default_factory=set)
    cluster_hosts: set[str] = field(default_factory=set)
    services: set[ObjectKey] = field(default_factory=set)
    pods: set[PodKey] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class _Built:
    """A host's routes as last emitted: for which waypoint, on which ports, using which clusters."""

    waypoint: WaypointKey
    ports: tuple[int, ...]
    clusters: frozenset[ClusterRef]


class WaypointConfig:
    """L7 objects and waypoints; builds the resources each waypoint sees (module docstring)."""

    def __init__(self, state: ClusterState, *, trust_domain: str) -> None:
        self._state = state
        self._trust_domain = trust_domain
        # (kind, namespace, name) of the declaring Waypoint or Gateway -> the waypoint.
        self._declared: dict[tuple[str, str, str], Waypoint] = {}
        self.virtual_services: dict[ObjectKey, VirtualService] = {}
        self.destination_rules: dict[ObjectKey, DestinationRule] = {}
        self.http_routes: dict[ObjectKey, HttpRoute] = {}
        self.policies: dict[ObjectKey, WaypointPolicy] = {}
        self._virtual_services_by_host: dict[str, set[ObjectKey]] = {}
        self._wildcard_virtual_services: set[ObjectKey] = set()
        self._destination_rules_by_host: dict[str, set[ObjectKey]] = {}
        self._routes_by_service: dict[ObjectKey, set[ObjectKey]] = {}
        self._routes_by_waypoint: dict[WaypointKey, set[ObjectKey]] = {}
        self._policies_by_target: dict[PolicyTarget, set[ObjectKey]] = {}
        # What was built.
        self._built: dict[str, _Built] = {}
        self._hosts_by_waypoint: dict[WaypointKey, set[str]] = {}
        self._referenced_by: dict[str, set[str]] = {}  # host -> hosts whose routes use it
        self._dependents: dict[str, set[str]] = {}  # host -> hosts whose rules name it
        self._depends_on: dict[str, set[str]] = {}
        self._clusters: dict[str, dict[ClusterRef, frozenset[str]]] = {}
        self._route_errors: dict[str, TranslationError] = {}

    # --- Reading ---

    @property
    def has_waypoints(self) -> bool:
        """False: no waypoint is declared, so no L7 resource exists and pods need no work."""
        return bool(self._declared)

    def waypoint(self, key: WaypointKey) -> Waypoint | None:
        """The declared waypoint; a Waypoint object wins over a Gateway of the same name."""
        return self._declared.get(("Waypoint", *key)) or self._declared.get(("Gateway", *key))

    def service_waypoint(self, service: KubeService) -> WaypointKey | None:
        """The waypoint a Service is bound to, if any."""
        if not self._declared:
            return None
        requested = self._requested(service.labels, service.namespace)
        if requested is None or requested == (service.namespace, service.name):
            return None
        waypoint = self.waypoint(requested)
        return requested if waypoint is not None and waypoint.traffic_type.for_services else None

    def pod_waypoint(self, pod: Pod) -> WaypointKey | None:
        """The waypoint a pod's (workload-addressed) traffic goes through, if any."""
        if not self._declared:
            return None
        requested = self._requested(pod.labels, pod.namespace)
        if requested is None:
            return None
        waypoint = self.waypoint(requested)
        return requested if waypoint is not None and waypoint.traffic_type.for_workloads else None

    def errors(self) -> set[TranslationError]:
        """Route errors of the hosts currently keeping their last good routes."""
        return set(self._route_errors.values())

    def warnings(self) -> list[TranslationWarning]:
        """Accepted policies that waypoints cannot enforce as written."""
        return [w for key in sorted(self.policies) for w in self.policies[key].warnings]

    def _requested(self, labels: Mapping[str, str], namespace: str) -> WaypointKey | None:
        space = self._state.namespaces.get(namespace)
        return requested_waypoint(labels, space.labels if space else {}, namespace)

    # --- Changes ---

    def apply(
        self,
        kind: str,
        namespace: str,
        name: str,
        obj: Mapping[str, Any] | None,
        affected: L7Affected,
    ) -> None:
        """Take one change of an `L7_KINDS` object (None: deleted)."""
        key = (namespace, name)
        if kind == "VirtualService":
            self._put_virtual_service(
                key, parse_virtual_service(namespace, name, obj) if obj else None, affected
            )
        elif kind == "DestinationRule":
            self._put_destination_rule(
                key, parse_destination_rule(namespace, name, obj) if obj else None, affected
            )
        elif kind == "HTTPRoute":
            self._put_http_route(
                key, parse_http_route(namespace, name, obj) if obj else None, affected
            )
        elif kind == "Waypoint":
            self._declare(
                (kind, namespace, name),
                parse_waypoint(namespace, name, obj) if obj else None,
                affected,
            )
        else:  # Gateway
            self._declare(
                (kind, namespace, name),
                parse_gateway(namespace, name, obj) if obj else None,
                affected,
            )

    def put_policy(
        self, key: ObjectKey, policy: WaypointPolicy | None, affected: L7Affected
    ) -> None:
        """A targetRef AuthorizationPolicy changed (None: gone or no longer targetRef)."""
        old = self.policies.pop(key, None)
        for target in old.targets if old else ():
            _discard(self._policies_by_target, target, key)
        if policy is not None:
            self.policies[key] = policy
            for target in policy.targets:
                self._policies_by_target.setdefault(target, set()).add(key)
        for target in {*(old.targets if old else ()), *(policy.targets if policy else ())}:
            affected.route_hosts |= self._hosts_of_target(target)

    def namespace_changed(
        self,
        name: str,
        old_labels: Mapping[str, str],
        new_labels: Mapping[str, str],
        affected: L7Affected,
    ) -> None:
        """A namespace's labels changed: its services and pods may use another waypoint now."""
        labels = (USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL)
        if all(old_labels.get(label) == new_labels.get(label) for label in labels):
            return
        for key in self._state.services:
            if key[0] == name:
                affected.services.add(key)
                affected.route_hosts.add(self._state.services[key].hostname)
        affected.pods.update(self._state.pods_in_namespace(name))

    def service_changed(self, host: str, affected: L7Affected) -> None:
        affected.route_hosts.add(host)
        affected.route_hosts |= self._dependents.get(host, set())
        affected.cluster_hosts.add(host)

    def pod_services_changed(self, services: Iterable[KubeService], affected: L7Affected) -> None:
        """Pods of these services came, went or changed: their endpoints may differ."""
        if self.has_waypoints:
            affected.cluster_hosts.update(service.hostname for service in services)

    def _put_virtual_service(
        self, key: ObjectKey, new: VirtualService | None, affected: L7Affected
    ) -> None:
        old = self.virtual_services.pop(key, None)
        for virtual_service in (old, new):
            if virtual_service is not None:
                affected.route_hosts |= self._hosts_named(virtual_service.hosts)
        if old is not None:
            self._wildcard_virtual_services.discard(key)
            for host in old.hosts:
                _discard(self._virtual_services_by_host, host, key)
        if new is not None:
            self.virtual_services[key] = new
            for host in new.hosts:
                if host.startswith("*"):
                    self._wildcard_virtual_services.add(key)
                else:
                    self._virtual_services_by_host.setdefault(host, set()).add(key)

    def _put_destination_rule(
        self, key: ObjectKey, new: DestinationRule | None, affected: L7Affected
    ) -> None:
        if new is not None and new.host.startswith("*"):
            raise ObjectRef("DestinationRule", *key).error(
                "spec.host", f"{new.host!r}: wildcard hosts are not supported by waypoints"
            )
        old = self.destination_rules.pop(key, None)
        if old is not None:
            _discard(self._destination_rules_by_host, old.host, key)
        if new is not None:
            self.destination_rules[key] = new
            self._destination_rules_by_host.setdefault(new.host, set()).add(key)
        for rule in (old, new):
            if rule is not None:
                affected.cluster_hosts.add(rule.host)
                affected.route_hosts |= self._dependents.get(rule.host, set())

    def _put_http_route(self, key: ObjectKey, new: HttpRoute | None, affected: L7Affected) -> None:
        old = self.http_routes.pop(key, None)
        for route, index in ((old, _discard), (new, _add)):
            if route is None:
                continue
            for parent in route.parents:
                if parent.kind == "Service":
                    index(self._routes_by_service, (parent.namespace, parent.name), key)
                    service = self._state.services.get((parent.namespace, parent.name))
                    if service is not None:
                        affected.route_hosts.add(service.hostname)
                else:
                    index(self._routes_by_waypoint, (parent.namespace, parent.name), key)
                    affected.route_hosts |= self._hosts_by_waypoint.get(
                        (parent.namespace, parent.name), set()
                    )
        if new is not None:
            self.http_routes[key] = new

    def _declare(
        self, source: tuple[str, str, str], waypoint: Waypoint | None, affected: L7Affected
    ) -> None:
        key = (source[1], source[2])
        before = self.waypoint(key)
        if waypoint is None:
            self._declared.pop(source, None)
        else:
            self._declared[source] = waypoint
        if self.waypoint(key) == before:
            return
        # Whatever asks for this waypoint may be bound differently now.
        for service_key, service in self._state.services.items():
            if self._requested(service.labels, service.namespace) == key:
                affected.services.add(service_key)
                affected.route_hosts.add(service.hostname)
        name = key[1]
        candidates = set(self._state.pods_selected(None, {USE_WAYPOINT_LABEL: name}))
        for space in self._state.namespaces.values():
            if space.labels.get(USE_WAYPOINT_LABEL) == name:
                candidates.update(self._state.pods_in_namespace(space.name))
        affected.pods.update(
            pod_key
            for pod_key in candidates
            if self._requested(self._state.pods[pod_key].labels, pod_key[0]) == key
        )

    def _hosts_named(self, hosts: Iterable[str]) -> set[str]:
        """Hostnames VirtualService hosts cover: exact ones, and bound hosts a wildcard matches."""
        found = set()
        for pattern in hosts:
            if pattern.startswith("*"):
                found.update(host for host in self._built if host_matches(pattern, host))
            else:
                found.add(pattern)
        return found

    def _hosts_of_target(self, target: PolicyTarget) -> set[str]:
        if target.kind == "Service":
            service = self._state.services.get((target.namespace, target.name))
            return {service.hostname} if service is not None else set()
        if target.kind == "Waypoint":
            return set(self._hosts_by_waypoint.get((target.namespace, target.name), ()))
        return set(self._built)

    # --- Building ---

    def rebuild(self, affected: L7Affected) -> list[Emit]:
        """The resources of the affected hosts, as emits (only changes reach the proxies)."""
        emits: list[Emit] = []
        if not affected.route_hosts and not affected.cluster_hosts:
            return emits
        cluster_hosts = set(affected.cluster_hosts) | affected.route_hosts
        for host in sorted(affected.route_hosts):
            cluster_hosts |= self._rebuild_routes(host, emits)
        for host in sorted(cluster_hosts):
            self._rebuild_clusters(host, emits)
        return emits

    def _service(self, host: str) -> KubeService | None:
        key = service_of_host(host)
        service = self._state.services.get(key) if key is not None else None
        return service if service is not None and not service.external_name else None

    def _rebuild_routes(self, host: str, emits: list[Emit]) -> set[str]:
        """Rebuild one host's listeners and routes; returns the hosts whose users changed."""
        service = self._service(host)
        waypoint = self.service_waypoint(service) if service is not None else None
        old = self._built.get(host)
        if service is None or waypoint is None:
            self._set_dependencies(host, set())
            self._route_errors.pop(host, None)
            if old is None:
                return set()
            for port in old.ports:
                emits.append(Emit(LISTENER_TYPE_URL, envoy.listener_name(host, port), None, None))
                emits.append(Emit(ROUTE_TYPE_URL, envoy.listener_name(host, port), None, None))
            self._forget(host, old)
            return {cluster.host for cluster in old.clusters} | {host}

        rules_by_port = {p.port: self._rules(service, p.port, waypoint) for p in service.ports}
        self._set_dependencies(
            host,
            {host}
            | {
                d.host
                for rules in rules_by_port.values()
                for rule in rules or ()
                for d in rule.destinations
            },
        )
        try:
            built = {
                port: self._routes(service, port, rules) for port, rules in rules_by_port.items()
            }
        except TranslationError as error:
            if self._route_errors.get(host) != error:
                _log.warning(
                    "routes not rebuilt; the last good ones keep serving",
                    host=host,
                    kind=error.kind,
                    namespace=error.namespace,
                    name=error.name,
                    field=error.field,
                    error=error.message,
                )
            self._route_errors[host] = error
            return set()
        if self._route_errors.pop(host, None) is not None:
            _log.info("routes rebuilt again", host=host)

        audience = frozenset({audience_key(waypoint)})
        address = (
            str(ipaddress.ip_address(service.addresses[0])) if service.addresses else _ANY_ADDRESS
        )
        deny, allow = self._policies_for(service, waypoint)
        clusters: set[ClusterRef] = set()
        for port, (routes, used) in built.items():
            name = envoy.listener_name(host, port)
            listener = envoy.build_listener(
                host=host, port=port, address=address, deny=deny, allow=allow
            )
            emits.append(Emit(LISTENER_TYPE_URL, name, listener, audience))
            emits.append(
                Emit(
                    ROUTE_TYPE_URL,
                    name,
                    envoy.build_route_configuration(host, port, routes),
                    audience,
                )
            )
            clusters |= used
        for port in old.ports if old else ():
            if port not in built:
                emits.append(Emit(LISTENER_TYPE_URL, envoy.listener_name(host, port), None, None))
                emits.append(Emit(ROUTE_TYPE_URL, envoy.listener_name(host, port), None, None))
        if old is not None:
            self._forget(host, old)
        new = _Built(waypoint=waypoint, ports=tuple(built), clusters=frozenset(clusters))
        self._built[host] = new
        self._hosts_by_waypoint.setdefault(waypoint, set()).add(host)
        for cluster in new.clusters:
            self._referenced_by.setdefault(cluster.host, set()).add(host)
        return {
            cluster.host for cluster in new.clusters | (old.clusters if old else frozenset())
        } | {host}

    def _forget(self, host: str, built: _Built) -> None:
        del self._built[host]
        _discard(self._hosts_by_waypoint, built.waypoint, host)
        for cluster in built.clusters:
            _discard(self._referenced_by, cluster.host, host)

    def _set_dependencies(self, host: str, targets: set[str]) -> None:
        for target in self._depends_on.pop(host, set()):
            _discard(self._dependents, target, host)
        if targets:
            self._depends_on[host] = targets
            for target in targets:
                self._dependents.setdefault(target, set()).add(host)

    def _rules(
        self, service: KubeService, port: int, waypoint: WaypointKey
    ) -> list[RouteRule] | None:
        """The rules for one service port, in evaluation order; None: no route is configured."""
        routes = [
            self.http_routes[key]
            for key in self._routes_by_service.get((service.namespace, service.name), ())
            if any(
                p.kind == "Service" and p.name == service.name and p.port in (None, port)
                for p in self.http_routes[key].parents
            )
        ]
        routes += [
            self.http_routes[key]
            for key in self._routes_by_waypoint.get(waypoint, ())
            if self.http_routes[key].serves_host(service.hostname)
        ]
        if routes:
            ordered = sorted(
                (route.sort_key(rule, i), rule.rule)
                for route in {r.key: r for r in routes}.values()
                for i, rule in enumerate(route.rules)
            )
            return [rule for _, rule in ordered]
        virtual_service = self._virtual_service(service.hostname)
        return list(virtual_service.rules) if virtual_service is not None else None

    def _virtual_service(self, host: str) -> VirtualService | None:
        exact = [self.virtual_services[k] for k in self._virtual_services_by_host.get(host, ())]
        candidates = [v for v in exact if v.for_mesh] or [
            self.virtual_services[k]
            for k in self._wildcard_virtual_services
            if self.virtual_services[k].for_mesh
            and any(host_matches(h, host) for h in self.virtual_services[k].hosts)
        ]
        return min(candidates, key=lambda v: v.age_key, default=None)

    def _destination_rule(self, host: str) -> DestinationRule | None:
        return min(
            (self.destination_rules[k] for k in self._destination_rules_by_host.get(host, ())),
            key=lambda r: r.age_key,
            default=None,
        )

    def _routes(
        self, service: KubeService, port: int, rules: list[RouteRule] | None
    ) -> tuple[list[Any], set[ClusterRef]]:
        """One port's Envoy routes and the clusters they use; TranslationError on bad references."""
        if rules is not None:
            routes: list[Any] = []
            used: set[ClusterRef] = set()
            for rule in rules:
                clusters = [self._cluster_of(rule, d, service, port) for d in rule.destinations]
                envoy_routes = envoy.envoy_routes(rule, clusters, port)
                if envoy_routes:
                    routes += envoy_routes
                    used.update(clusters)
            if routes:
                return routes, used
        default = ClusterRef(service.hostname, port)
        return [envoy.default_route(default)], {default}

    def _cluster_of(
        self, rule: RouteRule, destination: Destination, service: KubeService, port: int
    ) -> ClusterRef:
        target_port = destination.port
        if target_port is None:
            target = self._service(destination.host)
            if (
                destination.host != service.hostname
                and target is not None
                and len(target.ports) == 1
            ):
                target_port = target.ports[0].port
            else:
                target_port = port
        if destination.subset:
            found = self._destination_rule(destination.host)
            if found is None or found.subset(destination.subset) is None:
                where = (
                    f"DestinationRule {found.namespace}/{found.name} has no such subset"
                    if found is not None
                    else f"no DestinationRule for {destination.host} defines subsets"
                )
                raise rule.source.error(
                    f"{destination.field}.subset", f"unknown subset {destination.subset!r}: {where}"
                )
        return ClusterRef(destination.host, target_port, destination.subset)

    def _policies_for(
        self, service: KubeService, waypoint: WaypointKey
    ) -> tuple[list[WaypointPolicy], list[WaypointPolicy]]:
        """(DENY, ALLOW) policies on a service's listeners, ordered by namespace/name."""
        keys: set[ObjectKey] = set()
        for target in (
            PolicyTarget("Service", service.namespace, service.name),
            PolicyTarget("Waypoint", *waypoint),
            _ALL_WAYPOINTS,
        ):
            keys |= self._policies_by_target.get(target, set())
        policies = [self.policies[key] for key in sorted(keys)]
        return [p for p in policies if p.action == "DENY"], [
            p for p in policies if p.action == "ALLOW"
        ]

    def _rebuild_clusters(self, host: str, emits: list[Emit]) -> None:
        service = self._service(host)
        destination_rule = self._destination_rule(host)
        audiences: dict[ClusterRef, set[str]] = {}
        own = self._built.get(host)
        if own is not None and service is not None:
            subsets = (
                [""] + [s.name for s in destination_rule.subsets] if destination_rule else [""]
            )
            for port in own.ports:
                for subset in subsets:
                    audiences.setdefault(ClusterRef(host, port, subset), set()).add(
                        audience_key(own.waypoint)
                    )
        for user in self._referenced_by.get(host, ()):
            built = self._built[user]
            for cluster in built.clusters:
                if cluster.host == host:
                    audiences.setdefault(cluster, set()).add(audience_key(built.waypoint))
        emitted = self._clusters.pop(host, {})
        current: dict[ClusterRef, frozenset[str]] = {}
        for cluster in sorted(audiences):
            subset = (
                destination_rule.subset(cluster.subset)
                if destination_rule and cluster.subset
                else None
            )
            if cluster.subset and subset is None:
                continue  # the subset is gone; routes still naming it are listed as errors
            audience = frozenset(audiences[cluster])
            policy = (
                destination_rule.policy_for(cluster.port, subset) if destination_rule else NO_POLICY
            )
            service_port = (
                next((p for p in service.ports if p.port == cluster.port), None)
                if service
                else None
            )
            emits.append(
                Emit(
                    CLUSTER_TYPE_URL,
                    cluster.name,
                    envoy.build_cluster(
                        cluster,
                        policy=policy,
                        app_protocol=(
                            service_port.app_protocol
                            if service_port is not None
                            else workload_pb2.AppProtocol.UNKNOWN
                        ),
                        service=(service.namespace, service.name) if service is not None else None,
                    ),
                    audience,
                )
            )
            endpoints = self._endpoints(service, cluster.port, subset.labels if subset else ())
            emits.append(
                Emit(
                    ENDPOINT_TYPE_URL,
                    cluster.name,
                    envoy.build_load_assignment(cluster, endpoints),
                    audience,
                )
            )
            current[cluster] = audience
        for cluster in emitted:
            if cluster not in current:
                emits.append(Emit(CLUSTER_TYPE_URL, cluster.name, None, None))
                emits.append(Emit(ENDPOINT_TYPE_URL, cluster.name, None, None))
        if current:
            self._clusters[host] = current

    def _endpoints(
        self, service: KubeService | None, port: int, subset_labels: Iterable[tuple[str, str]]
    ) -> list[UpstreamEndpoint]:
        if service is None or not service.selects_pods:
            return []
        selector = dict(service.selector)
        for key, value in subset_labels:
            if selector.setdefault(key, value) != value:
                return []  # the subset contradicts the service's selector
        endpoints = []
        for pod_key in sorted(self._state.pods_selected(service.namespace, selector)):
            pod = self._state.pods[pod_key]
            if not pod.has_workload:
                continue
            target = next(
                (
                    p.target_port
                    for p in workload_ports(service, pod).ports
                    if p.service_port == port
                ),
                None,
            )
            if target is None:
                continue  # a named target port this pod does not declare
            enrolled = is_enrolled(pod, self._state.namespace_dataplane_mode(pod.namespace))
            endpoints.append(
                UpstreamEndpoint(
                    address=str(ipaddress.ip_address(pod.addresses[0])),
                    port=target,
                    healthy=pod.healthy,
                    workload=f"{pod.namespace}/{pod.name}",
                    identity=pod.identity(self._trust_domain).uri,
                    tunnel=envoy.TUNNEL_HBONE if enrolled else envoy.TUNNEL_TCP,
                )
            )
        return endpoints


def _add(index: dict[Any, set[Any]], key: Any, value: Any) -> None:
    index.setdefault(key, set()).add(value)


def _discard(index: dict[Any, set[Any]], key: Any, value: Any) -> None:
    bucket = index.get(key)
    if bucket is not None:
        bucket.discard(value)
        if not bucket:
            del index[key]
