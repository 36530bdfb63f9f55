"""The incremental translator: change events in, changed ztunnel resources out.

Theory of operation
    `apply(event)` parses the object (a malformed one raises `TranslationError` before
    anything changes, so the previous good version keeps serving), stores it in the
    `ClusterState`, and marks what the change can affect:

    | event                       | recomputed                                              |
    |-----------------------------|---------------------------------------------------------|
    | Pod                         | that pod's Workload                                     |
    | Namespace                   | its pods' Workloads, if its dataplane-mode label changed |
    | Service                     | the Service; old+new selected pods if selector/ports changed |
    | AuthorizationPolicy         | the policy; old+new selected pods if its attachment changed |
    | PeerAuthentication          | the static STRICT policy; the converted port-level policies |
    |                             | and pods in its reach (selected / namespace / everything) |
    | VirtualService, DestinationRule, HTTPRoute, Waypoint, Gateway, targetRef policies:     |
    |                             | waypoint resources, see `l7/config.py` (`WaypointConfig`) |

    Each marked resource is rebuilt from the state and serialized deterministically; only
    resources whose bytes differ from what was last emitted appear in the returned
    `ResourceDelta`, as upserts, or as removals when they no longer exist. Applying every
    delta in order to an empty store therefore yields exactly `resources()`, which equals
    what a fresh translator computes from the same final objects in any order.

    Waypoint resources (Envoy Listener, RouteConfiguration, Cluster, ClusterLoadAssignment)
    carry an audience, the waypoints allowed to see them, in `ResourceDelta.audiences`; an
    audience change alone is emitted as a change. Services and pods bound to a waypoint
    (`istio.io/use-waypoint`) get its address in their Service/Workload resources.

Resource names (ambient-facts §4): Workload `Kubernetes//Pod/<ns>/<name>`, Service
`<ns>/<hostname>` (both type Address), Authorization `<ns>/<name>`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import prometheus_client
from google.protobuf.message import Message

from istiod_lite.model.errors import TranslationError, TranslationWarning
from istiod_lite.model.fields import ObjectRef
from istiod_lite.model.l7.authz import has_target_refs, parse_waypoint_policy
from istiod_lite.model.l7.config import L7_KINDS, L7_TYPE_URLS, L7Affected, WaypointConfig
from istiod_lite.model.l7.waypoints import gateway_address
from istiod_lite.model.policies import (
    STATIC_STRICT_POLICY_NAME,
    AuthorizationPolicy,
    convert_peer_authentication,
    converted_peer_authentication_name,
    parse_authorization_policy,
    parse_peer_authentication,
    static_strict_policy,
    workload_peer_authentication_policies,
)
from istiod_lite.model.services import (
    KubeService,
    ServicePort,
    build_service,
    parse_service,
    service_hostname,
    workload_ports,
)
from istiod_lite.model.state import ClusterState, ObjectKey
from istiod_lite.model.workloads import (
    Namespace,
    Pod,
    PodKey,
    build_workload,
    parse_namespace,
    parse_pod,
    workload_uid,
)
from istiod_lite.sources.base import ObjectEvent
from meshcore._gen import workload_pb2
from meshcore.identity.spiffe import Identity, check_trust_domain
from meshcore.log import get_logger
from meshcore.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL

_log = get_logger("translate")

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_ROOT_NAMESPACE = "istio-system"


class TypeDelta(NamedTuple):
    """Changes to the resources of one type: new or changed ones, and names now gone."""

    upserts: dict[str, Message]
    removals: set[str]


class ResourceDelta(dict[str, TypeDelta]):
    """type URL -> TypeDelta; only types that changed are present (empty: nothing changed).

    `audiences`: type URL -> name -> the waypoints ("<ns>/<name>") allowed to see that upsert;
    upserts not listed are visible to every proxy.
    """

    def __init__(self) -> None:
        super().__init__()
        self.audiences: dict[str, dict[str, frozenset[str]]] = {}


@dataclass
class _Affected:
    """What one event can have changed, to be rebuilt and compared."""

    pods: set[PodKey] = field(default_factory=set)
    services: set[ObjectKey] = field(default_factory=set)
    policies: set[ObjectKey] = field(default_factory=set)
    peer_authentications: set[ObjectKey] = field(default_factory=set)
    static_strict: bool = False
    l7: L7Affected = field(default_factory=L7Affected)


class Translator:
    """Kubernetes objects -> ztunnel resources, incrementally (see the module docstring)."""

    def __init__(
        self,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        registry: prometheus_client.CollectorRegistry | None = None,
    ) -> None:
        self.trust_domain = check_trust_domain(trust_domain)
        self.root_namespace = root_namespace
        self.state = ClusterState(root_namespace=root_namespace)
        self.waypoints = WaypointConfig(self.state, trust_domain=self.trust_domain)
        self._errors: dict[tuple[str, str, str], TranslationError] = {}
        # type URL -> name -> (message, serialized bytes, audience), as last emitted.
        self._emitted: dict[str, dict[str, tuple[Message, bytes, frozenset[str] | None]]] = {
            type_url: {} for type_url in (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, *L7_TYPE_URLS)
        }
        # Each handler gets the object, or None for a delete.
        self._handlers: Mapping[
            str, Callable[[ObjectEvent, Mapping[str, Any] | None, _Affected], None]
        ] = {
            "Namespace": self._namespace,
            "Pod": self._pod,
            "Service": self._service,
            "AuthorizationPolicy": self._authorization_policy,
            "PeerAuthentication": self._peer_authentication,
            **dict.fromkeys(L7_KINDS, self._waypoint_config),
        }
        self._error_counter = (
            prometheus_client.Counter(
                "istiod_translation_errors",
                "Objects rejected by translation (the previous good version keeps serving)",
                ["kind"],
                registry=registry,
            )
            if registry is not None
            else None
        )

    # --- Public API ---

    def apply(self, event: ObjectEvent) -> ResourceDelta:
        """Take in one change; return the resources whose content changed because of it."""
        handler = self._handlers.get(event.kind)
        if handler is None:  # kinds that do not shape ztunnel resources (ServiceAccount, ...)
            return ResourceDelta()
        key = (event.kind, event.namespace, event.name)
        affected = _Affected()
        obj = None if event.action == "delete" else event.obj
        try:
            if event.action != "delete" and not isinstance(obj, Mapping):
                raise ObjectRef(event.kind, event.namespace, event.name).error(
                    "", f"expected the object as a mapping, got {type(obj).__name__}"
                )
            handler(event, obj, affected)
        except TranslationError as exc:
            self._reject(key, exc)
            return ResourceDelta()
        if self._errors.pop(key, None) is not None:
            _log.info(
                "object accepted again", kind=event.kind, namespace=event.namespace, name=event.name
            )
        return self._rebuild(affected)

    def errors(self) -> list[TranslationError]:
        """Objects whose latest version was rejected (their previous version, if any, serves),
        then routes naming what does not exist (the host's last good routes serve)."""
        rejected = [self._errors[key] for key in sorted(self._errors)]
        unresolved = sorted(self.waypoints.errors() - set(rejected), key=str)
        return rejected + unresolved

    def warnings(self) -> list[TranslationWarning]:
        """Accepted objects that are enforced differently from what they say."""
        return [
            warning
            for key in sorted(self.state.authorization_policies)
            for warning in self.state.authorization_policies[key].warnings
        ] + self.waypoints.warnings()

    def resources(self) -> dict[str, dict[str, Message]]:
        """Every current resource: type URL -> name -> message (the ztunnel types always, the
        waypoint types once they have resources)."""
        return {
            type_url: {name: message for name, (message, _, _) in emitted.items()}
            for type_url, emitted in self._emitted.items()
            if emitted or type_url not in L7_TYPE_URLS
        }

    def pods_on_node(self, node: str) -> list[Pod]:
        """The pods scheduled on `node`, running or not, by (namespace, name)."""
        return self.state.pods_on_node(node)

    def identities_on_node(self, node: str) -> set[Identity]:
        """Identities a ztunnel on `node` may hold certificates for: its not-finished pods'."""
        return {
            pod.identity(self.trust_domain)
            for pod in self.state.pods_on_node(node)
            if not pod.finished
        }

    # --- Event handlers: update the state, mark what is affected ---

    def _namespace(
        self, event: ObjectEvent, obj: Mapping[str, Any] | None, affected: _Affected
    ) -> None:
        new: Namespace | None = None
        if obj is None:
            old = self.state.remove_namespace(event.name)
        else:
            new = parse_namespace(event.name, obj)
            old = self.state.put_namespace(new)
        old_mode = old.dataplane_mode if old is not None else ""
        if old_mode != (new.dataplane_mode if new is not None else ""):
            affected.pods.update(self.state.pods_in_namespace(event.name))
        self.waypoints.namespace_changed(
            event.name,
            old.labels if old is not None else {},
            new.labels if new is not None else {},
            affected.l7,
        )

    def _pod(self, event: ObjectEvent, obj: Mapping[str, Any] | None, affected: _Affected) -> None:
        key = (event.namespace, event.name)
        new = parse_pod(event.namespace, event.name, obj) if obj is not None else None
        old = self.state.pods.get(key)
        if old is not None and self.waypoints.has_waypoints:
            # The services selecting the pod as it was: it may have left their endpoints.
            self.waypoints.pod_services_changed(self.state.services_selecting(old), affected.l7)
        if new is None:
            self.state.remove_pod(key)
        else:
            self.state.put_pod(new)
        affected.pods.add(key)

    def _service(
        self, event: ObjectEvent, obj: Mapping[str, Any] | None, affected: _Affected
    ) -> None:
        key = (event.namespace, event.name)
        if obj is None:
            old = self.state.remove_service(key)
            new = None
        else:
            new = parse_service(event.namespace, event.name, obj)
            old = self.state.put_service(new)
        affected.services.add(key)
        self.waypoints.service_changed(service_hostname(*key), affected.l7)
        if _endpoint_shape(old) != _endpoint_shape(new):
            for service in (old, new):
                if service is not None and service.selects_pods:
                    affected.pods.update(
                        self.state.pods_selected(service.namespace, service.selector)
                    )

    def _authorization_policy(
        self, event: ObjectEvent, obj: Mapping[str, Any] | None, affected: _Affected
    ) -> None:
        key = (event.namespace, event.name)
        waypoint_policy = None
        if obj is None:
            old = self.state.remove_authorization_policy(key)
            new = None
        else:
            new = parse_authorization_policy(
                event.namespace, event.name, obj, root_namespace=self.root_namespace
            )
            if has_target_refs(obj):
                waypoint_policy = parse_waypoint_policy(
                    event.namespace, event.name, obj, root_namespace=self.root_namespace
                )
            old = self.state.put_authorization_policy(new)
        self.waypoints.put_policy(key, waypoint_policy, affected.l7)
        affected.policies.add(key)
        if _attachment(old) != _attachment(new):
            for policy in (old, new):
                if (
                    policy is not None
                    and policy.attaches_by_selector
                    and policy.selector is not None
                ):
                    # Root-namespace selector policies apply in every namespace.
                    scope = None if policy.namespace == self.root_namespace else policy.namespace
                    affected.pods.update(self.state.pods_selected(scope, policy.selector))
        warnings = (
            *(new.warnings if new else ()),
            *(waypoint_policy.warnings if waypoint_policy else ()),
        )
        for warning in warnings:
            _log.warning("policy accepted with a warning", warning=str(warning))

    def _peer_authentication(
        self, event: ObjectEvent, obj: Mapping[str, Any] | None, affected: _Affected
    ) -> None:
        key = (event.namespace, event.name)
        if obj is None:
            old = self.state.remove_peer_authentication(key)
            new = None
        else:
            new = parse_peer_authentication(event.namespace, event.name, obj)
            old = self.state.put_peer_authentication(new)
        affected.static_strict = True
        affected.peer_authentications.add(key)
        for policy in (old, new):
            if policy is None:
                continue
            if policy.selector is None and policy.namespace == self.root_namespace:
                affected.pods.update(self.state.pods)
                affected.peer_authentications.update(self.state.peer_authentications)
            elif policy.selector is None:
                affected.pods.update(self.state.pods_in_namespace(policy.namespace))
                affected.peer_authentications.update(
                    (p.namespace, p.name)
                    for p in self.state.peer_authentications_in(policy.namespace)
                )
            elif policy.namespace != self.root_namespace:
                affected.pods.update(self.state.pods_selected(policy.namespace, policy.selector))

    def _waypoint_config(
        self, event: ObjectEvent, obj: Mapping[str, Any] | None, affected: _Affected
    ) -> None:
        self.waypoints.apply(event.kind, event.namespace, event.name, obj, affected.l7)

    def _reject(self, key: tuple[str, str, str], error: TranslationError) -> None:
        self._errors[key] = error
        if self._error_counter is not None:
            self._error_counter.labels(kind=error.kind).inc()
        _log.warning(
            "object rejected; its previous version keeps serving",
            kind=error.kind,
            namespace=error.namespace,
            name=error.name,
            field=error.field,
            error=error.message,
        )

    # --- Rebuilding resources ---

    def _rebuild(self, affected: _Affected) -> ResourceDelta:
        delta = ResourceDelta()
        affected.pods |= affected.l7.pods
        affected.services |= affected.l7.services
        for pod_key in affected.pods:
            pod = self.state.pods.get(pod_key)
            services = self.state.services_selecting(pod) if pod is not None else []
            self.waypoints.pod_services_changed(services, affected.l7)
            if pod is not None and pod.has_workload:
                self._emit(
                    delta,
                    ADDRESS_TYPE_URL,
                    pod.uid,
                    workload_pb2.Address(workload=self._workload(pod, services)),
                )
            else:
                self._emit(delta, ADDRESS_TYPE_URL, workload_uid(*pod_key), None)
        for service_key in affected.services:
            service = self.state.services.get(service_key)
            built = None
            if service is not None:
                waypoint = self.waypoints.service_waypoint(service)
                built = build_service(
                    service, waypoint=gateway_address(waypoint) if waypoint is not None else None
                )
            name = f"{service_key[0]}/{service_hostname(*service_key)}"
            self._emit(
                delta,
                ADDRESS_TYPE_URL,
                name,
                workload_pb2.Address(service=built) if built else None,
            )
        for policy_key in affected.policies:
            policy = self.state.authorization_policies.get(policy_key)
            authorization = policy.authorization if policy is not None else None
            self._emit(delta, AUTHORIZATION_TYPE_URL, "/".join(policy_key), authorization)
        for peer_key in affected.peer_authentications:
            self._emit_converted_peer_authentication(delta, peer_key)
        if affected.static_strict:
            static = (
                static_strict_policy(self.root_namespace)
                if self.state.peer_authentications
                else None
            )
            self._emit(
                delta,
                AUTHORIZATION_TYPE_URL,
                f"{self.root_namespace}/{STATIC_STRICT_POLICY_NAME}",
                static,
            )
        for emit in self.waypoints.rebuild(affected.l7):
            self._emit(delta, emit.type_url, emit.name, emit.message, emit.audience)
        return delta

    def _workload(self, pod: Pod, selecting: list[KubeService]) -> workload_pb2.Workload:
        services = {service.key: workload_ports(service, pod) for service in selecting}
        policies = sorted(policy.resource_name for policy in self.state.policies_selecting(pod))
        namespace_wide = (
            self.state.namespace_wide_peer_authentication(pod.namespace)
            if pod.namespace != self.root_namespace
            else None
        )
        policies += workload_peer_authentication_policies(
            self.root_namespace,
            mesh_wide=self.state.namespace_wide_peer_authentication(self.root_namespace),
            namespace_wide=namespace_wide,
            workload=self.state.workload_peer_authentication(pod),
        )
        workload = build_workload(
            pod,
            namespace_dataplane_mode=self.state.namespace_dataplane_mode(pod.namespace),
            services=services,
            authorization_policies=policies,
            trust_domain=self.trust_domain,
        )
        waypoint = self.waypoints.pod_waypoint(pod)
        if waypoint is not None:
            workload.waypoint.CopyFrom(gateway_address(waypoint))
        return workload

    def _emit_converted_peer_authentication(self, delta: ResourceDelta, key: ObjectKey) -> None:
        policy = self.state.peer_authentications.get(key)
        converted = None
        if policy is not None:
            converted = convert_peer_authentication(
                self.root_namespace,
                policy,
                namespace_wide=self.state.namespace_wide_peer_authentication(policy.namespace),
                mesh_wide=self.state.namespace_wide_peer_authentication(self.root_namespace),
            )
        self._emit(
            delta, AUTHORIZATION_TYPE_URL, converted_peer_authentication_name(*key), converted
        )

    def _emit(
        self,
        delta: ResourceDelta,
        type_url: str,
        name: str,
        message: Message | None,
        audience: frozenset[str] | None = None,
    ) -> None:
        emitted = self._emitted[type_url]
        if message is None:
            if emitted.pop(name, None) is not None:
                delta.setdefault(type_url, TypeDelta({}, set())).removals.add(name)
            return
        serialized = message.SerializeToString(deterministic=True)
        previous = emitted.get(name)
        if previous is not None and previous[1] == serialized and previous[2] == audience:
            return
        emitted[name] = (message, serialized, audience)
        delta.setdefault(type_url, TypeDelta({}, set())).upserts[name] = message
        if audience is not None:
            delta.audiences.setdefault(type_url, {})[name] = audience


def _endpoint_shape(
    service: KubeService | None,
) -> tuple[Mapping[str, str], tuple[ServicePort, ...]] | None:
    """What of a Service shapes the Workloads it selects."""
    if service is None or not service.selects_pods:
        return None
    return (service.selector, service.ports)


def _attachment(policy: AuthorizationPolicy | None) -> Mapping[str, str] | None:
    """The selector by which Workloads list a policy; None if they do not."""
    if policy is None or not policy.attaches_by_selector:
        return None
    return policy.selector
