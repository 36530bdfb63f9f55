"""Conversion of the xDS protos (`istio.workload.Address`, `istio.security.Authorization`)
into the ztunnel's frozen model, at the edge where resources arrive.

Mirrors ztunnel's `TryFrom` impls (src/state/workload.rs, src/state/service.rs, src/rbac.rs):
empty trust domain means `cluster.local`, empty service account `default`, empty cluster id
`Kubernetes`, unset capacity 1; a workload using LEGACY_ISTIO_MTLS is rejected. Everything
invalid raises `ProtoConversionError` naming the resource and the field path, so the xDS
handler can NACK that one resource and apply the rest. Where ztunnel silently drops a bad
entry (an IP match with a bad length, an empty StringMatch) we reject the resource instead:
dropping a condition would widen or narrow a policy without anyone noticing.

Not converted because this ztunnel does not implement them (the fields are accepted and
ignored): Workload hostname, network_gateway, native_tunnel, application_tunnel, locality,
network_mode, extensions; Service load_balancing, ip_families, weighted_waypoints,
canonical, ingress_use_waypoint, visibility, extensions; the network of a waypoint
address; Authorization and Match extensions. CIDR service VIPs are rejected.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_network
from typing import TypeVar

from google.protobuf import any_pb2
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import DecodeError, Message

from meshcore._gen import authorization_pb2, workload_pb2
from meshcore.identity.spiffe import Identity, InvalidIdentity
from meshcore.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from ztunnel.state.model import (
    DEFAULT_CLUSTER_ID,
    DEFAULT_SERVICE_ACCOUNT,
    DEFAULT_TRUST_DOMAIN,
    HBONE_PORT,
    AppProtocol,
    Authorization,
    Clause,
    GatewayAddress,
    HealthStatus,
    IpAddress,
    IpNetwork,
    Match,
    MatchKind,
    NamespacedHostname,
    PolicyAction,
    PolicyScope,
    Port,
    Rule,
    Service,
    ServiceAccountMatch,
    StringMatch,
    TunnelProtocol,
    Workload,
    WorkloadType,
)

E = TypeVar("E", bound=enum.Enum)
M = TypeVar("M", bound=Message)

_MAX_PORT = 65535


class ProtoConversionError(ValueError):
    """An xDS resource cannot be converted; says which resource and which field."""

    def __init__(self, resource: str, field: str, message: str) -> None:
        self.resource = resource
        self.field = field
        self.message = message
        where = f"{resource}: {field}" if field else resource
        super().__init__(f"{where}: {message}")


class _FieldError(Exception):
    """Raised below the top-level converters; they add the resource name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field = field
        self.message = message


# --- Public API ---


def address_from_any(resource: any_pb2.Any) -> Workload | Service:
    """Unpack and convert one `istio.workload.Address` resource."""
    address = _unpack(resource, workload_pb2.Address, ADDRESS_TYPE_URL, "address")
    match address.WhichOneof("type"):
        case "workload":
            return workload_from_proto(address.workload)
        case "service":
            return service_from_proto(address.service)
        case _:
            raise ProtoConversionError("address", "type", "neither workload nor service is set")


def authorization_from_any(resource: any_pb2.Any) -> Authorization:
    """Unpack and convert one `istio.security.Authorization` resource."""
    policy = _unpack(
        resource, authorization_pb2.Authorization, AUTHORIZATION_TYPE_URL, "authorization"
    )
    return authorization_from_proto(policy)


def workload_from_proto(msg: workload_pb2.Workload) -> Workload:
    """Convert an `istio.workload.Workload`, applying ztunnel's defaults."""
    resource = f"workload {msg.uid}" if msg.uid else f"workload {msg.namespace}/{msg.name}"
    try:
        workload = _workload(msg)
    except _FieldError as e:
        raise ProtoConversionError(resource, e.field, e.message) from None
    try:
        workload.identity  # noqa: B018 - validates trust domain, namespace, service account
    except InvalidIdentity as e:
        raise ProtoConversionError(resource, _identity_field(msg), str(e)) from None
    return workload


def service_from_proto(msg: workload_pb2.Service) -> Service:
    """Convert an `istio.workload.Service` (its endpoints come from workloads)."""
    try:
        return _service(msg)
    except _FieldError as e:
        resource = f"service {msg.namespace}/{msg.hostname}"
        raise ProtoConversionError(resource, e.field, e.message) from None


def authorization_from_proto(msg: authorization_pb2.Authorization) -> Authorization:
    """Convert an `istio.security.Authorization` (rules -> clauses -> matches)."""
    try:
        return _authorization(msg)
    except _FieldError as e:
        resource = f"authorization {msg.namespace}/{msg.name}"
        raise ProtoConversionError(resource, e.field, e.message) from None


# --- Helpers ---


def _unpack(resource: any_pb2.Any, message_type: type[M], type_url: str, what: str) -> M:
    if resource.type_url != type_url:
        raise ProtoConversionError(
            what, "type_url", f"expected {type_url!r}, got {resource.type_url!r}"
        )
    message = message_type()
    try:
        resource.Unpack(message)
    except DecodeError as e:
        raise ProtoConversionError(what, "value", f"not a valid {type_url}: {e}") from None
    return message


def _required(field: str, value: str) -> str:
    if not value:
        raise _FieldError(field, "required, but empty")
    return value


def _enum(field: str, enum_type: type[E], value: int, proto_enum: EnumTypeWrapper) -> E:
    """The model enum member with the proto number `value` (proto3 enums are open)."""
    try:
        return enum_type(value)
    except ValueError:
        pass
    try:
        problem = f"{proto_enum.Name(value)} is not supported"
    except ValueError:
        problem = f"unknown value {value}"
    expected = ", ".join(member.name for member in enum_type)
    raise _FieldError(field, f"{problem}; expected one of {expected}")


def _port_number(field: str, value: int) -> int:
    if value > _MAX_PORT:
        raise _FieldError(field, f"{value} is not a port number (0-{_MAX_PORT})")
    return value


def _ip(field: str, raw: bytes) -> IpAddress:
    if len(raw) == 4:
        return IPv4Address(raw)
    if len(raw) == 16:
        return IPv6Address(raw)
    raise _FieldError(field, f"expected 4 (IPv4) or 16 (IPv6) address bytes, got {len(raw)}")


def _prefix(field: str, address: IpAddress, length: int) -> IpNetwork:
    if length > address.max_prefixlen:
        raise _FieldError(
            field, f"prefix length {length} is longer than {address.max_prefixlen} for {address}"
        )
    # strict=False: host bits may be set, the range is the same (as with ztunnel's IpNet).
    return ip_network((address, length), strict=False)


def _ports(field: str, ports: Sequence[workload_pb2.Port]) -> tuple[Port, ...]:
    return tuple(
        Port(
            service_port=_port_number(f"{field}[{i}].service_port", port.service_port),
            target_port=_port_number(f"{field}[{i}].target_port", port.target_port),
            app_protocol=_enum(
                f"{field}[{i}].app_protocol",
                AppProtocol,
                port.app_protocol,
                workload_pb2.AppProtocol,
            ),
        )
        for i, port in enumerate(ports)
    )


def _gateway(field: str, msg: workload_pb2.GatewayAddress) -> GatewayAddress:
    # istiod always sets 15008; an unset (0) port means the same, not "dial port 0".
    port = _port_number(f"{field}.hbone_mtls_port", msg.hbone_mtls_port) or HBONE_PORT
    match msg.WhichOneof("destination"):
        case "hostname":
            hostname = NamespacedHostname(
                namespace=_required(f"{field}.hostname.namespace", msg.hostname.namespace),
                hostname=_required(f"{field}.hostname.hostname", msg.hostname.hostname),
            )
            return GatewayAddress(address=None, hostname=hostname, hbone_mtls_port=port)
        case "address":
            address = _ip(f"{field}.address.address", msg.address.address)
            return GatewayAddress(address=address, hostname=None, hbone_mtls_port=port)
        case _:
            raise _FieldError(field, "neither hostname nor address is set")


# --- Workloads ---


def _service_key(field: str, key: str) -> str:
    namespace, slash, hostname = key.partition("/")
    if not (namespace and slash and hostname):
        raise _FieldError(field, f"{key!r} is not of the form 'namespace/hostname'")
    return key


def _workload(msg: workload_pb2.Workload) -> Workload:
    services = tuple(
        (
            _service_key(f"services[{key!r}]", key),
            _ports(f"services[{key!r}].ports", msg.services[key].ports),
        )
        # A map has no order; sort so that equal pushes give equal states.
        for key in sorted(msg.services)
    )
    return Workload(
        uid=_required("uid", msg.uid),
        name=msg.name,
        namespace=msg.namespace,
        addresses=tuple(_ip(f"addresses[{i}]", raw) for i, raw in enumerate(msg.addresses)),
        node=msg.node,
        service_account=msg.service_account or DEFAULT_SERVICE_ACCOUNT,
        trust_domain=msg.trust_domain or DEFAULT_TRUST_DOMAIN,
        tunnel_protocol=_enum(
            "tunnel_protocol", TunnelProtocol, msg.tunnel_protocol, workload_pb2.TunnelProtocol
        ),
        network=msg.network,
        canonical_name=msg.canonical_name,
        canonical_revision=msg.canonical_revision,
        workload_name=msg.workload_name,
        workload_type=_enum(
            "workload_type",
            WorkloadType,
            msg.workload_type,
            workload_pb2.WorkloadType,
        ),
        cluster_id=msg.cluster_id or DEFAULT_CLUSTER_ID,
        status=_enum(
            "status",
            HealthStatus,
            msg.status,
            workload_pb2.WorkloadStatus,
        ),
        capacity=msg.capacity.value if msg.HasField("capacity") else 1,
        services=services,
        authorization_policies=tuple(msg.authorization_policies),
        waypoint=_gateway("waypoint", msg.waypoint) if msg.HasField("waypoint") else None,
    )


def _identity_field(msg: workload_pb2.Workload) -> str:
    """The field to blame for an invalid identity, checked in the order Identity does."""
    try:
        Identity(msg.trust_domain or DEFAULT_TRUST_DOMAIN, "ns", "sa")
    except InvalidIdentity:
        return "trust_domain"
    try:
        Identity(DEFAULT_TRUST_DOMAIN, msg.namespace, "sa")
    except InvalidIdentity:
        return "namespace"
    return "service_account"


# --- Services ---


def _vip(field: str, msg: workload_pb2.NetworkAddress) -> tuple[str, IpAddress]:
    address = _ip(f"{field}.address", msg.address)
    if msg.HasField("length") and msg.length != address.max_prefixlen:
        network = _prefix(f"{field}.length", address, msg.length)
        raise _FieldError(f"{field}.length", f"CIDR VIPs ({network}) are not supported")
    return msg.network, address


def _subject_alt_name(field: str, value: str) -> str:
    try:
        Identity.parse(value)
    except InvalidIdentity as e:
        raise _FieldError(field, str(e)) from None
    return value


def _service(msg: workload_pb2.Service) -> Service:
    return Service(
        name=msg.name,
        namespace=_required("namespace", msg.namespace),
        hostname=_required("hostname", msg.hostname),
        vips=tuple(_vip(f"addresses[{i}]", a) for i, a in enumerate(msg.addresses)),
        ports=_ports("ports", msg.ports),
        subject_alt_names=tuple(
            _subject_alt_name(f"subject_alt_names[{i}]", san)
            for i, san in enumerate(msg.subject_alt_names)
        ),
        waypoint=_gateway("waypoint", msg.waypoint) if msg.HasField("waypoint") else None,
    )


# --- Authorization ---

_MATCH_KINDS = {
    "exact": MatchKind.EXACT,
    "prefix": MatchKind.PREFIX,
    "suffix": MatchKind.SUFFIX,
    "presence": MatchKind.PRESENCE,
}


def _string_matches(
    field: str, matches: Sequence[authorization_pb2.StringMatch]
) -> tuple[StringMatch, ...]:
    converted = []
    for i, match in enumerate(matches):
        which = match.WhichOneof("match_type")
        if which is None:
            raise _FieldError(
                f"{field}[{i}]", "no match type set (exact, prefix, suffix, presence)"
            )
        kind = _MATCH_KINDS[which]
        value = "" if kind is MatchKind.PRESENCE else getattr(match, which)
        converted.append(StringMatch(kind, value))
    return tuple(converted)


def _networks(field: str, addresses: Sequence[authorization_pb2.Address]) -> tuple[IpNetwork, ...]:
    return tuple(
        _prefix(f"{field}[{i}].length", _ip(f"{field}[{i}].address", a.address), a.length)
        for i, a in enumerate(addresses)
    )


def _service_accounts(
    matches: Sequence[authorization_pb2.ServiceAccountMatch],
) -> tuple[ServiceAccountMatch, ...]:
    return tuple(ServiceAccountMatch(m.namespace, m.serviceAccount) for m in matches)


def _match(field: str, msg: authorization_pb2.Match) -> Match:
    return Match(
        namespaces=_string_matches(f"{field}.namespaces", msg.namespaces),
        not_namespaces=_string_matches(f"{field}.not_namespaces", msg.not_namespaces),
        principals=_string_matches(f"{field}.principals", msg.principals),
        not_principals=_string_matches(f"{field}.not_principals", msg.not_principals),
        source_ips=_networks(f"{field}.source_ips", msg.source_ips),
        not_source_ips=_networks(f"{field}.not_source_ips", msg.not_source_ips),
        destination_ips=_networks(f"{field}.destination_ips", msg.destination_ips),
        not_destination_ips=_networks(f"{field}.not_destination_ips", msg.not_destination_ips),
        destination_ports=tuple(
            _port_number(f"{field}.destination_ports[{i}]", p)
            for i, p in enumerate(msg.destination_ports)
        ),
        not_destination_ports=tuple(
            _port_number(f"{field}.not_destination_ports[{i}]", p)
            for i, p in enumerate(msg.not_destination_ports)
        ),
        service_accounts=_service_accounts(msg.service_accounts),
        not_service_accounts=_service_accounts(msg.not_service_accounts),
    )


def _authorization(msg: authorization_pb2.Authorization) -> Authorization:
    rules = tuple(
        Rule(
            tuple(
                Clause(
                    tuple(
                        _match(f"rules[{r}].clauses[{c}].matches[{m}]", match)
                        for m, match in enumerate(clause.matches)
                    )
                )
                for c, clause in enumerate(rule.clauses)
            )
        )
        for r, rule in enumerate(msg.rules)
    )
    return Authorization(
        name=_required("name", msg.name),
        namespace=_required("namespace", msg.namespace),
        scope=_enum("scope", PolicyScope, msg.scope, authorization_pb2.Scope),
        action=_enum(
            "action",
            PolicyAction,
            msg.action,
            authorization_pb2.Action,
        ),
        rules=rules,
        dry_run=msg.dry_run,
    )
