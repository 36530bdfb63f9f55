"""Applies delta xDS responses (Address and Authorization resources) to the StateStore.

The xDS client calls `apply` once per response. Like ztunnel's `ProxyStateUpdater`, each
resource is converted on its own: a bad one is reported by name (the client NACKs with
those messages) while the good ones in the same response are still applied, all in one
`StateStore.apply` so readers never see half a response.

Resource names must be the keys the store uses (workload uid, service "ns/hostname",
policy "ns/name"); otherwise a later removal by name would miss. An Address removal is
tried as a workload uid first, then as a service "ns/hostname", as ztunnel does.
"""

from __future__ import annotations

from google.protobuf import any_pb2

from meshcore.log import get_logger
from meshcore.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from ztunnel.state.model import Authorization, Service, Workload
from ztunnel.state.proto import ProtoConversionError, address_from_any, authorization_from_any
from ztunnel.state.store import StateStore

_log = get_logger("xds")


class XdsStateHandler:
    """The single writer of xDS-delivered state: converts resources and applies them."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def apply(
        self,
        type_url: str,
        upserts: list[tuple[str, str, any_pb2.Any]],
        removals: list[str],
    ) -> dict[str, str]:
        """Apply one response; returns {resource name: error} for rejected resources."""
        if type_url == ADDRESS_TYPE_URL:
            errors = self._apply_addresses(upserts, removals)
        elif type_url == AUTHORIZATION_TYPE_URL:
            errors = self._apply_authorizations(upserts, removals)
        else:
            message = f"type URL {type_url!r} is not handled by ztunnel"
            errors = {name: message for name, _, _ in upserts}
        for name, error in errors.items():
            _log.warning("xds resource rejected", type_url=type_url, resource=name, error=error)
        return errors

    def _apply_addresses(
        self, upserts: list[tuple[str, str, any_pb2.Any]], removals: list[str]
    ) -> dict[str, str]:
        errors: dict[str, str] = {}
        workloads: list[Workload] = []
        services: list[Service] = []
        for name, _version, resource in upserts:
            try:
                converted = address_from_any(resource)
            except ProtoConversionError as e:
                errors[name] = str(e)
                continue
            if isinstance(converted, Workload):
                if converted.uid != name:
                    errors[name] = _name_mismatch("workload uid", converted.uid)
                    continue
                workloads.append(converted)
            else:
                if converted.key != name:
                    errors[name] = _name_mismatch("service namespace/hostname", converted.key)
                    continue
                services.append(converted)

        current = self._store.current
        remove_workloads = [n for n in removals if current.workload_by_uid(n) is not None]
        remove_services = [
            n for n in removals if current.workload_by_uid(n) is None and _is_service_key(n)
        ]
        self._store.apply(
            upsert_workloads=workloads,
            remove_workloads=remove_workloads,
            upsert_services=services,
            remove_services=remove_services,
        )
        return errors

    def _apply_authorizations(
        self, upserts: list[tuple[str, str, any_pb2.Any]], removals: list[str]
    ) -> dict[str, str]:
        errors: dict[str, str] = {}
        policies: list[Authorization] = []
        for name, _version, resource in upserts:
            try:
                policy = authorization_from_any(resource)
            except ProtoConversionError as e:
                errors[name] = str(e)
                continue
            if policy.key != name:
                errors[name] = _name_mismatch("policy namespace/name", policy.key)
                continue
            policies.append(policy)
        self._store.apply(upsert_policies=policies, remove_policies=removals)
        return errors


def _name_mismatch(kind: str, key: str) -> str:
    return f"resource name does not match the {kind} {key!r}"


def _is_service_key(name: str) -> bool:
    """Whether `name` is "ns/hostname"; a workload uid has more slashes."""
    namespace, slash, hostname = name.partition("/")
    return bool(namespace and slash and hostname) and "/" not in hostname
