"""The local (no-istiod) config file: ztunnel's `LOCAL_XDS_PATH` YAML.

The format is Istio ztunnel's own (examples/localhost.yaml; serde shapes of `LocalConfig`
in src/xds.rs, `Workload` in src/state/workload.rs, `Service` in src/state/service.rs and
`Authorization` in src/rbac.rs), so files written for ztunnel load here unchanged:

    workloads:
    - uid: cluster1//v1/Pod/default/local        # optional: Kubernetes//Pod/<ns>/<name>
      name: local
      namespace: default
      serviceAccount: default
      workloadIps: ["127.0.0.1"]
      protocol: HBONE                            # or TCP
      node: local
      services: {"default/example.com": {80: 8080}}
      waypoint: {destination: "/10.0.0.9", hboneMtlsPort: 15008}   # "network/ip" or "ns/host"
    services:
    - {name: local, namespace: default, hostname: example.com,
       vips: ["/127.10.0.1"], ports: {80: 8080}, subjectAltNames: [...]}
    policies:
    - name: deny-9999
      namespace: default
      scope: Namespace                           # Global | Namespace | WorkloadSelector
      action: Allow                              # Allow | Deny
      rules: [[[{notDestinationPorts: [9999]}]]] # rules -> clauses -> matches
      dryRun: false

String matches are serde's externally tagged enum, either `{Exact: v}` (also Prefix,
Suffix, `Presence: []`) or the YAML tag form `!Exact v`. IP matches are CIDRs ("10.0.0.0/8";
a bare IP means that one address).

Unlike ztunnel, every error names the file and the path to the offending field, and unknown
keys are rejected with a suggestion instead of being a serde message.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

from meshcore.identity.spiffe import Identity, InvalidIdentity
from ztunnel.state.model import (
    DEFAULT_CLUSTER_ID,
    DEFAULT_SERVICE_ACCOUNT,
    DEFAULT_TRUST_DOMAIN,
    HBONE_PORT,
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

T = TypeVar("T")


class LocalConfigError(ValueError):
    """The local config file is invalid; the message names the file and field path."""


@dataclass(frozen=True, slots=True)
class LocalConfig:
    """Everything a local config file declares."""

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Authorization, ...] = ()


def load_local_config(path: Path) -> LocalConfig:
    """Read and parse the local config file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LocalConfigError(f"{path}: cannot read local config: {e}") from e
    return parse_local_config(text, source=path.name)


def parse_local_config(text: str, *, source: str) -> LocalConfig:
    """Parse local config YAML; `source` names the file in error messages."""
    try:
        document = yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        raise LocalConfigError(f"{source}: not valid YAML: {e}") from e
    except RecursionError:
        raise LocalConfigError(f"{source}: not valid YAML: nested too deeply") from None
    if document is None:
        return LocalConfig()
    top = _Fields(source, "", document, ("workloads", "services", "policies"))
    workloads = top.sequence("workloads", _workload)
    services = top.sequence("services", _service)
    policies = top.sequence("policies", _policy)
    _reject_duplicates(source, "workloads", "uid", [w.uid for w in workloads])
    _reject_duplicates(source, "services", "namespace/hostname", [s.key for s in services])
    _reject_duplicates(source, "policies", "namespace/name", [p.key for p in policies])
    return LocalConfig(workloads, services, policies)


# --- YAML loading ---


class _Tagged:
    """A YAML node carrying a `!Tag`, serde_yaml's spelling of an enum variant."""

    def __init__(self, tag: str, value: Any) -> None:
        self.tag = tag
        self.value = value


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps `!Variant value` nodes instead of refusing them."""


def _construct_tagged(loader: _Loader, tag_suffix: str, node: yaml.Node) -> _Tagged:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return _Tagged(tag_suffix, value)


_Loader.add_multi_constructor("!", _construct_tagged)


# --- Field access with paths ---


def _describe(value: Any) -> str:
    if isinstance(value, _Tagged):
        return f"!{value.tag} {value.value!r}"
    return repr(value)


def _fail(source: str, path: str, message: str) -> NoReturn:
    raise LocalConfigError(f"{source}: {path}: {message}" if path else f"{source}: {message}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Fields:
    """A YAML mapping being read field by field; knows its path for error messages."""

    def __init__(self, source: str, path: str, value: Any, known: tuple[str, ...]) -> None:
        if not isinstance(value, Mapping):
            expected = f"expected a mapping with keys {', '.join(known)}"
            _fail(source, path, f"{expected}, got {_describe(value)}")
        for key in value:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                suggestion = f" (did you mean {close[0]!r}?)" if close else ""
                message = f"unknown key{suggestion}; known keys: {', '.join(known)}"
                _fail(source, _join(path, str(key)), message)
        self.source = source
        self.path = path
        self.value = value

    def path_of(self, key: str) -> str:
        return _join(self.path, key)

    def fail(self, key: str, message: str) -> NoReturn:
        _fail(self.source, self.path_of(key), message)

    def text(self, key: str, default: str | None = None) -> str:
        """A string field; required unless a default is given."""
        value = self.value.get(key)
        if value is None:
            if default is None:
                self.fail(key, "required")
            return default
        return _string(self.source, self.path_of(key), value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.value.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {_describe(value)}")
        return value

    def integer(self, key: str, default: int, *, maximum: int) -> int:
        return _int(self.source, self.path_of(key), self.value.get(key, default), maximum)

    def choice(self, key: str, names: Mapping[str, T], default: T | None = None) -> T:
        """One of `names` (serde's enum variant spelling); required unless a default is given."""
        value = self.value.get(key)
        if value is None and default is not None:
            return default
        if not isinstance(value, str) or value not in names:
            self.fail(key, f"expected one of {', '.join(names)}, got {_describe(value)}")
        return names[value]

    def sequence(self, key: str, item: Callable[[str, str, Any], T]) -> tuple[T, ...]:
        """A list field (absent: empty), each element converted by `item`."""
        value = self.value.get(key)
        if value is None:
            return ()
        return _list(self.source, self.path_of(key), value, item)

    def optional(self, key: str, item: Callable[[str, str, Any], T]) -> T | None:
        value = self.value.get(key)
        return None if value is None else item(self.source, self.path_of(key), value)


def _list(source: str, path: str, value: Any, item: Callable[[str, str, Any], T]) -> tuple[T, ...]:
    if not isinstance(value, list):
        _fail(source, path, f"expected a list, got {_describe(value)}")
    return tuple(item(source, f"{path}[{i}]", element) for i, element in enumerate(value))


def _mapping(source: str, path: str, value: Any) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        _fail(source, path, f"expected a mapping, got {_describe(value)}")
    return value


def _string(source: str, path: str, value: Any) -> str:
    if not isinstance(value, str):
        _fail(source, path, f"expected a string, got {_describe(value)}")
    return value


def _int(source: str, path: str, value: Any, maximum: int) -> int:
    # JSON (e.g. a config dump fed back) spells map keys as strings: accept "80" too.
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        _fail(source, path, f"expected an integer from 0 to {maximum}, got {_describe(value)}")
    return value


def _port(source: str, path: str, value: Any) -> int:
    return _int(source, path, value, 65535)


def _ip(source: str, path: str, value: Any) -> IpAddress:
    text = _string(source, path, value)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        _fail(source, path, f"{text!r} is not an IP address")


def _ip_network(source: str, path: str, value: Any) -> IpNetwork:
    text = _string(source, path, value)
    try:
        # strict=False: host bits set ("10.1.2.3/8") mean the same range, as with ipnet.
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        _fail(source, path, f"{text!r} is not a CIDR like '10.0.0.0/8' or an IP address")


def _namespaced_name(source: str, path: str, value: Any) -> str:
    namespace, slash, name = _string(source, path, value).partition("/")
    if not (namespace and slash and name):
        _fail(source, path, f"{value!r} is not of the form 'namespace/name'")
    return value


def _port_map(source: str, path: str, value: Any) -> tuple[Port, ...]:
    """`{servicePort: targetPort}` as ztunnel writes it (this format has no app protocol)."""
    ports = []
    for service_port, target_port in _mapping(source, path, value).items():
        port_path = f"{path}[{service_port}]"
        ports.append(
            Port(_port(source, port_path, service_port), _port(source, port_path, target_port))
        )
    return tuple(sorted(ports, key=lambda p: p.service_port))


def _gateway(source: str, path: str, value: Any) -> GatewayAddress:
    fields = _Fields(source, path, value, ("destination", "hboneMtlsPort"))
    destination = fields.text("destination")
    port = fields.integer("hboneMtlsPort", HBONE_PORT, maximum=65535)
    # Like serde's untagged enum: "network/ip" if the part after "/" is an IP, else
    # "namespace/hostname".
    prefix, slash, rest = destination.partition("/")
    if not (slash and rest):
        fields.fail("destination", f"{destination!r} is neither 'network/ip' nor 'ns/hostname'")
    try:
        address = ipaddress.ip_address(rest)
    except ValueError:
        return GatewayAddress(None, NamespacedHostname(prefix, rest), port)
    return GatewayAddress(address, None, port)


# --- Workloads ---

_WORKLOAD_KEYS = (
    "uid", "name", "namespace", "serviceAccount", "trustDomain", "workloadIps", "protocol",
    "node", "network", "canonicalName", "canonicalRevision", "workloadName", "workloadType",
    "clusterId", "status", "capacity", "services", "authorizationPolicies", "waypoint",
)
_PROTOCOLS = {"TCP": TunnelProtocol.NONE, "HBONE": TunnelProtocol.HBONE}
_STATUSES = {"Healthy": HealthStatus.HEALTHY, "Unhealthy": HealthStatus.UNHEALTHY}
_WORKLOAD_TYPES = {t.name.lower(): t for t in WorkloadType}


def _workload_services(
    source: str, path: str, value: Any
) -> tuple[tuple[str, tuple[Port, ...]], ...]:
    return tuple(
        (_namespaced_name(source, path, key), _port_map(source, f"{path}[{key}]", ports))
        for key, ports in _mapping(source, path, value).items()
    )


def _workload(source: str, path: str, value: Any) -> Workload:
    fields = _Fields(source, path, value, _WORKLOAD_KEYS)
    namespace = fields.text("namespace")
    name = fields.text("name", "")
    cluster_id = fields.text("clusterId", "") or DEFAULT_CLUSTER_ID
    uid = fields.text("uid", "")
    if not uid:
        if not name:
            fields.fail("uid", "required when the workload has no name")
        # Istio's pod uid format, so dumps and logs look like a cluster's.
        uid = f"{cluster_id}//Pod/{namespace}/{name}"
    workload = Workload(
        uid=uid,
        name=name,
        namespace=namespace,
        addresses=fields.sequence("workloadIps", _ip),
        node=fields.text("node", ""),
        service_account=fields.text("serviceAccount", "") or DEFAULT_SERVICE_ACCOUNT,
        trust_domain=fields.text("trustDomain", "") or DEFAULT_TRUST_DOMAIN,
        tunnel_protocol=fields.choice("protocol", _PROTOCOLS, TunnelProtocol.NONE),
        network=fields.text("network", ""),
        canonical_name=fields.text("canonicalName", ""),
        canonical_revision=fields.text("canonicalRevision", ""),
        workload_name=fields.text("workloadName", ""),
        workload_type=fields.choice("workloadType", _WORKLOAD_TYPES, WorkloadType.DEPLOYMENT),
        cluster_id=cluster_id,
        status=fields.choice("status", _STATUSES, HealthStatus.HEALTHY),
        capacity=fields.integer("capacity", 1, maximum=2**32 - 1),
        services=fields.optional("services", _workload_services) or (),
        authorization_policies=fields.sequence("authorizationPolicies", _namespaced_name),
        waypoint=fields.optional("waypoint", _gateway),
    )
    try:
        workload.identity  # noqa: B018 - validates trust domain, namespace, service account
    except InvalidIdentity as e:
        _fail(source, path, f"workload {uid} has no valid SPIFFE identity: {e}")
    return workload


# --- Services ---

_SERVICE_KEYS = (
    "name", "namespace", "hostname", "vips", "ports", "subjectAltNames", "waypoint",
    # Only decides which of several same-named services DNS answers with; this ztunnel
    # has no DNS proxy, so it is accepted for compatibility and has no effect.
    "canonical",
)


def _vip(source: str, path: str, value: Any) -> tuple[str, IpAddress]:
    network, slash, address = _string(source, path, value).partition("/")
    if not slash:
        _fail(source, path, f"{value!r} is not 'network/ip' (use '/ip' for the default network)")
    return network, _ip(source, path, address)


def _spiffe_uri(source: str, path: str, value: Any) -> str:
    text = _string(source, path, value)
    try:
        Identity.parse(text)
    except InvalidIdentity as e:
        _fail(source, path, f"{text!r} is not a SPIFFE ID: {e}")
    return text


def _service(source: str, path: str, value: Any) -> Service:
    fields = _Fields(source, path, value, _SERVICE_KEYS)
    fields.flag("canonical", True)
    return Service(
        name=fields.text("name"),
        namespace=fields.text("namespace"),
        hostname=fields.text("hostname"),
        vips=fields.sequence("vips", _vip),
        ports=fields.optional("ports", _port_map) or (),
        subject_alt_names=fields.sequence("subjectAltNames", _spiffe_uri),
        waypoint=fields.optional("waypoint", _gateway),
    )


# --- Policies ---

_POLICY_KEYS = ("name", "namespace", "scope", "action", "rules", "dryRun")
_SCOPES = {
    "Global": PolicyScope.GLOBAL,
    "Namespace": PolicyScope.NAMESPACE,
    "WorkloadSelector": PolicyScope.WORKLOAD_SELECTOR,
}
_ACTIONS = {"Allow": PolicyAction.ALLOW, "Deny": PolicyAction.DENY}
_MATCH_KINDS = {kind.capitalize(): kind for kind in MatchKind}
_STRING_MATCH_FORMS = "{Exact: v}, {Prefix: v}, {Suffix: v}, {Presence: []} or !Exact v"


def _string_match(source: str, path: str, value: Any) -> StringMatch:
    if isinstance(value, _Tagged):
        tag, argument = value.tag, value.value
    elif isinstance(value, Mapping) and len(value) == 1:
        ((tag, argument),) = value.items()
    else:
        _fail(source, path, f"expected {_STRING_MATCH_FORMS}, got {_describe(value)}")
    kind = _MATCH_KINDS.get(tag) if isinstance(tag, str) else None
    if kind is None:
        _fail(source, path, f"unknown string match {tag!r}; expected {_STRING_MATCH_FORMS}")
    if kind is MatchKind.PRESENCE:
        if argument not in (None, "", [], {}):
            _fail(source, path, f"Presence takes no value, got {_describe(argument)}")
        return StringMatch(kind)
    return StringMatch(kind, _string(source, f"{path}.{tag}", argument))


def _service_account_match(source: str, path: str, value: Any) -> ServiceAccountMatch:
    fields = _Fields(source, path, value, ("namespace", "serviceAccount"))
    return ServiceAccountMatch(fields.text("namespace"), fields.text("serviceAccount"))


_MATCH_FIELDS: tuple[tuple[str, str, Callable[[str, str, Any], Any]], ...] = (
    ("namespaces", "namespaces", _string_match),
    ("notNamespaces", "not_namespaces", _string_match),
    ("principals", "principals", _string_match),
    ("notPrincipals", "not_principals", _string_match),
    ("sourceIps", "source_ips", _ip_network),
    ("notSourceIps", "not_source_ips", _ip_network),
    ("destinationIps", "destination_ips", _ip_network),
    ("notDestinationIps", "not_destination_ips", _ip_network),
    ("destinationPorts", "destination_ports", _port),
    ("notDestinationPorts", "not_destination_ports", _port),
    ("serviceAccounts", "service_accounts", _service_account_match),
    ("notServiceAccounts", "not_service_accounts", _service_account_match),
)


def _match(source: str, path: str, value: Any) -> Match:
    fields = _Fields(source, path, value, tuple(key for key, _, _ in _MATCH_FIELDS))
    return Match(**{attr: fields.sequence(key, item) for key, attr, item in _MATCH_FIELDS})


def _clause(source: str, path: str, value: Any) -> Clause:
    return Clause(_list(source, path, value, _match))


def _rule(source: str, path: str, value: Any) -> Rule:
    return Rule(_list(source, path, value, _clause))


def _policy(source: str, path: str, value: Any) -> Authorization:
    fields = _Fields(source, path, value, _POLICY_KEYS)
    return Authorization(
        name=fields.text("name"),
        namespace=fields.text("namespace"),
        scope=fields.choice("scope", _SCOPES),
        action=fields.choice("action", _ACTIONS),
        rules=fields.sequence("rules", _rule),
        dry_run=fields.flag("dryRun", False),
    )


def _reject_duplicates(source: str, section: str, what: str, keys: list[str]) -> None:
    first_index: dict[str, int] = {}
    for index, key in enumerate(keys):
        if key in first_index:
            message = f"duplicate {what} {key!r} (also {section}[{first_index[key]}])"
            _fail(source, f"{section}[{index}]", message)
        first_index[key] = index
