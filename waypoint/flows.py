"""waypoint/flows: the flow event (`meshcore.flows`) of one request the waypoint handled."""

from __future__ import annotations

import re
import time

from meshcore.flows import FlowEvent, FlowPeer, HttpSummary
from waypoint.feeds import AddressIndex
from waypoint.metrics import RequestRecord
from waypoint.policy.authz import Decision

# istiod_lite (like istiod) names each RBAC policy after its AuthorizationPolicy and rule.
_RBAC_POLICY_NAME = re.compile(r"ns\[(?P<namespace>[^\]]*)\]-policy\[(?P<name>[^\]]*)\]-rule\[\d+\]")


def policy_key(rbac_policy_name: str | None) -> str | None:
    """"ns/name" of the AuthorizationPolicy behind an RBAC policy name; other names as they are."""
    if rbac_policy_name is None:
        return None
    match = _RBAC_POLICY_NAME.fullmatch(rbac_policy_name)
    return f"{match['namespace']}/{match['name']}" if match else rbac_policy_name


def request_flow(proxy: str, record: RequestRecord, authz: Decision | None, addresses: AddressIndex) -> FlowEvent:
    """`record` as a flow; `authz` is None when the request never reached authorization."""
    client = addresses.workload(record.source_address.rpartition(":")[0])
    server = addresses.workload(record.destination_address.rpartition(":")[0].strip("[]")) if record.destination_address else None
    return FlowEvent(
        time=time.time(),
        proxy=proxy,
        reporter="waypoint",
        source=FlowPeer(
            workload=client.name if client else None,
            namespace=record.source.namespace,
            identity=record.source.principal,
            address=record.source_address,
        ),
        destination=FlowPeer(
            workload=server.name if server else record.destination.workload,
            namespace=record.destination.namespace or record.service_namespace,
            identity=record.destination.principal,
            address=record.destination_address,
            service=record.service_host,
        ),
        verdict="denied" if authz is not None and not authz.allowed else "allowed",
        policy=policy_key(authz.policy_name) if authz is not None else None,
        bytes_sent=record.request_bytes,
        bytes_received=record.response_bytes,
        duration_ms=round(record.duration_ms, 3),
        flags=record.response_flags,
        http=HttpSummary(method=record.method, path=record.path, authority=record.authority, status=record.response_code),
    )
