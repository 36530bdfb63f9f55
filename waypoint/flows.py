"""waypoint/flows: the flow event (`meshcore.flows`) of one request the waypoint handled."""

from __future__ import annotations

import re

from meshcore.flows import FlowEvent, FlowPeer, HttpSummary
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


def request_flow(
    proxy: str, record: RequestRecord, authz: Decision | None, pods: tuple[str | None, str | None], at: float
) -> FlowEvent:
    """`record` as a flow at `at` (Unix time); `pods` are the client's and the endpoint's pod
    names; `authz` is None when the request never reached authorization."""
    client_pod, server_pod = pods
    return FlowEvent(
        time=at,
        proxy=proxy,
        reporter="waypoint",
        source=FlowPeer(
            workload=client_pod,
            namespace=record.source.namespace,
            identity=record.source.principal,
            address=record.source_address,
        ),
        destination=FlowPeer(
            workload=server_pod or record.destination.workload,
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
