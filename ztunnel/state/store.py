"""The ztunnel's state: immutable, indexed snapshots and the single writer that swaps them.

Readers (every proxied connection) take `StateStore.current` once and look things up in that
`ProxyState` without locks; it never changes under them. The one writer (the xDS handler or
the local config loader) calls `replace` or `apply`, which build a complete new snapshot off
to the side and publish it with one assignment, then wake `wait_for_change` callers (the
connection manager re-checking policy on open connections, the admin server).

Resources are keyed like their xDS names: workloads by uid, services by "ns/hostname",
policies by "ns/name". Services carry no endpoint list; endpoints are the workloads whose
`services` mention the service key, so a workload may arrive before its Service.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from ztunnel.state.model import (
    Authorization,
    GatewayAddress,
    IpAddress,
    Match,
    PolicyScope,
    Port,
    Service,
    StringMatch,
    TunnelProtocol,
    Workload,
)

if TYPE_CHECKING:
    from ztunnel.state.localconfig import LocalConfig


class ProxyState:
    """One consistent snapshot of workloads, services and policies, with lookup indexes."""

    def __init__(
        self,
        workloads: Mapping[str, Workload],
        services: Mapping[str, Service],
        policies: Mapping[str, Authorization],
        *,
        version: int,
    ) -> None:
        self.version = version
        self._workloads = dict(sorted(workloads.items()))
        self._services = dict(sorted(services.items()))
        self._policies = dict(sorted(policies.items()))

        by_address: dict[tuple[str, IpAddress], Workload] = {}
        by_node: defaultdict[str, list[Workload]] = defaultdict(list)
        endpoints: defaultdict[str, list[Workload]] = defaultdict(list)
        for workload in self._workloads.values():
            for address in workload.addresses:
                # Two workloads with one address (host-network pods) are ambiguous; the
                # lowest uid wins so the answer does not depend on arrival order.
                by_address.setdefault((workload.network, address), workload)
            by_node[workload.node].append(workload)
            for service_key, _ in workload.services:
                endpoints[service_key].append(workload)
        self._workloads_by_address = by_address
        self._workloads_by_node = {node: tuple(wls) for node, wls in by_node.items()}
        self._endpoints = {key: tuple(wls) for key, wls in endpoints.items()}

        by_vip: defaultdict[tuple[str, IpAddress], list[Service]] = defaultdict(list)
        for service in self._services.values():
            for network, vip in service.vips:
                by_vip[(network, vip)].append(service)
        self._services_by_vip = {vip: tuple(svcs) for vip, svcs in by_vip.items()}

        # "" holds GLOBAL policies, like ztunnel's PolicyStore.
        by_namespace: defaultdict[str, list[str]] = defaultdict(list)
        for key, policy in self._policies.items():
            if policy.scope is PolicyScope.GLOBAL:
                by_namespace[""].append(key)
            elif policy.scope is PolicyScope.NAMESPACE:
                by_namespace[policy.namespace].append(key)
        self._policies_by_namespace = {ns: tuple(keys) for ns, keys in by_namespace.items()}

    @classmethod
    def empty(cls) -> ProxyState:
        """The state before any configuration arrived."""
        return cls({}, {}, {}, version=0)

    # --- Lookups ---

    @property
    def workloads(self) -> tuple[Workload, ...]:
        """All workloads, ordered by uid."""
        return tuple(self._workloads.values())

    @property
    def services(self) -> tuple[Service, ...]:
        """All services, ordered by key."""
        return tuple(self._services.values())

    @property
    def policies(self) -> tuple[Authorization, ...]:
        """All authorization policies, ordered by key."""
        return tuple(self._policies.values())

    def workload_by_uid(self, uid: str) -> Workload | None:
        return self._workloads.get(uid)

    def workload_by_ip(self, ip: IpAddress, network: str = "") -> Workload | None:
        return self._workloads_by_address.get((network, ip))

    def service_by_key(self, key: str) -> Service | None:
        """The service named "ns/hostname"."""
        return self._services.get(key)

    def service_by_vip(
        self, ip: IpAddress, network: str = "", *, prefer_namespace: str | None = None
    ) -> Service | None:
        """The service with this VIP; when several share it, prefer one in `prefer_namespace`."""
        services = self._services_by_vip.get((network, ip), ())
        for service in services:
            if service.namespace == prefer_namespace:
                return service
        return services[0] if services else None

    def endpoints(self, service: Service) -> tuple[Workload, ...]:
        """Workloads that list `service` in their `services`, ordered by uid."""
        return self._endpoints.get(service.key, ())

    def policies_for(self, workload: Workload) -> tuple[Authorization, ...]:
        """Policies applying to `workload`: its namespace's, GLOBAL ones and its selectors'.

        Selector policies that are not (yet) known are skipped, as ztunnel does while a
        policy is in flight from istiod.
        """
        keys = (
            *self._policies_by_namespace.get(workload.namespace, ()),
            *self._policies_by_namespace.get("", ()),
            *workload.authorization_policies,
        )
        found = (self._policies.get(key) for key in dict.fromkeys(keys))
        return tuple(policy for policy in found if policy is not None)

    def local_workloads(self, node: str) -> tuple[Workload, ...]:
        """Workloads scheduled on `node`, ordered by uid."""
        return self._workloads_by_node.get(node, ())

    # --- Config dump ---

    def to_json(self) -> dict[str, Any]:
        """The /config_dump view, in the local config file's shape plus `version`.

        Feeding the workloads/services/policies back through `parse_local_config` yields
        this state again (app protocols aside, which that format cannot express).
        """
        return {
            "version": self.version,
            "workloads": [_workload_json(w) for w in self._workloads.values()],
            "services": [_service_json(s) for s in self._services.values()],
            "policies": [_policy_json(p) for p in self._policies.values()],
        }


class StateStore:
    """The single writer of ztunnel state; readers use `current`."""

    def __init__(self) -> None:
        self._current = ProxyState.empty()
        self._changed = trio.Event()

    @property
    def current(self) -> ProxyState:
        return self._current

    def replace(self, config: LocalConfig) -> ProxyState:
        """Make `config` the whole state (local config load or an xDS state-of-the-world)."""
        return self._publish(
            {w.uid: w for w in config.workloads},
            {s.key: s for s in config.services},
            {p.key: p for p in config.policies},
        )

    def apply(
        self,
        upsert_workloads: Iterable[Workload] = (),
        remove_workloads: Iterable[str] = (),
        upsert_services: Iterable[Service] = (),
        remove_services: Iterable[str] = (),
        upsert_policies: Iterable[Authorization] = (),
        remove_policies: Iterable[str] = (),
    ) -> ProxyState:
        """Apply one batch of xDS changes atomically; removals are by resource name.

        Removing a name that is not present is not an error (xDS may repeat removals).
        """
        state = self._current
        workloads = dict(state._workloads)
        services = dict(state._services)
        policies = dict(state._policies)
        for uid in remove_workloads:
            workloads.pop(uid, None)
        for key in remove_services:
            services.pop(key, None)
        for key in remove_policies:
            policies.pop(key, None)
        workloads.update((w.uid, w) for w in upsert_workloads)
        services.update((s.key, s) for s in upsert_services)
        policies.update((p.key, p) for p in upsert_policies)
        return self._publish(workloads, services, policies)

    async def wait_for_change(self, after_version: int) -> ProxyState:
        """Wait until the state is newer than `after_version`, and return it."""
        while self._current.version <= after_version:
            await self._changed.wait()
        return self._current

    def _publish(
        self,
        workloads: dict[str, Workload],
        services: dict[str, Service],
        policies: dict[str, Authorization],
    ) -> ProxyState:
        old = self._current
        if (workloads, services, policies) == (old._workloads, old._services, old._policies):
            # An unchanged push must not wake policy re-checks of every open connection.
            return old
        self._current = ProxyState(workloads, services, policies, version=old.version + 1)
        # Swap before setting, so a waiter that loops sees a fresh, unset Event.
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        return self._current


# --- JSON rendering (camelCase, like ztunnel's local config and config dump) ---


def _ports_json(ports: Iterable[Port]) -> dict[str, int]:
    return {str(p.service_port): p.target_port for p in ports}


def _gateway_json(gateway: GatewayAddress) -> dict[str, Any]:
    destination = (
        gateway.hostname.key if gateway.hostname is not None else f"/{gateway.address}"
    )
    return {"destination": destination, "hboneMtlsPort": gateway.hbone_mtls_port}


def _workload_json(w: Workload) -> dict[str, Any]:
    out: dict[str, Any] = {
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "workloadIps": [str(ip) for ip in w.addresses],
        "protocol": "HBONE" if w.tunnel_protocol is TunnelProtocol.HBONE else "TCP",
        "node": w.node,
        "network": w.network,
        "serviceAccount": w.service_account,
        "trustDomain": w.trust_domain,
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "workloadName": w.workload_name,
        "workloadType": w.workload_type.name.lower(),
        "clusterId": w.cluster_id,
        "status": w.status.name.capitalize(),
        "capacity": w.capacity,
        "services": {key: _ports_json(ports) for key, ports in w.services},
        "authorizationPolicies": list(w.authorization_policies),
    }
    if w.waypoint is not None:
        out["waypoint"] = _gateway_json(w.waypoint)
    return out


def _service_json(s: Service) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": [f"{network}/{ip}" for network, ip in s.vips],
        "ports": _ports_json(s.ports),
        "subjectAltNames": list(s.subject_alt_names),
    }
    if s.waypoint is not None:
        out["waypoint"] = _gateway_json(s.waypoint)
    return out


def _string_match_json(sm: StringMatch) -> dict[str, Any]:
    return {sm.kind.capitalize(): [] if sm.kind == "presence" else sm.value}


_MATCH_FIELDS = (
    ("namespaces", "namespaces", _string_match_json),
    ("not_namespaces", "notNamespaces", _string_match_json),
    ("principals", "principals", _string_match_json),
    ("not_principals", "notPrincipals", _string_match_json),
    ("source_ips", "sourceIps", str),
    ("not_source_ips", "notSourceIps", str),
    ("destination_ips", "destinationIps", str),
    ("not_destination_ips", "notDestinationIps", str),
    ("destination_ports", "destinationPorts", int),
    ("not_destination_ports", "notDestinationPorts", int),
    (
        "service_accounts",
        "serviceAccounts",
        lambda sa: {"namespace": sa.namespace, "serviceAccount": sa.service_account},
    ),
    (
        "not_service_accounts",
        "notServiceAccounts",
        lambda sa: {"namespace": sa.namespace, "serviceAccount": sa.service_account},
    ),
)


def _match_json(m: Match) -> dict[str, Any]:
    return {
        key: [render(v) for v in getattr(m, attr)]
        for attr, key, render in _MATCH_FIELDS
        if getattr(m, attr)
    }


def _policy_json(p: Authorization) -> dict[str, Any]:
    return {
        "name": p.name,
        "namespace": p.namespace,
        "scope": "".join(part.capitalize() for part in p.scope.name.split("_")),
        "action": p.action.name.capitalize(),
        "rules": [
            [[_match_json(m) for m in clause.matches] for clause in rule.clauses]
            for rule in p.rules
        ],
        "dryRun": p.dry_run,
    }
