"""AuthorizationPolicy and PeerAuthentication -> `istio.security.Authorization` (ambient-facts §7).

Follows Istio's pilot/pkg/serviceregistry/ambient/authorization.go.

AuthorizationPolicy (`convertAuthorizationPolicy`, `handleRule`)
- `targetRef(s)` policies are for waypoints: nothing is sent to ztunnels;
- no selector: NAMESPACE scope (GLOBAL in the root namespace); selector: WORKLOAD_SELECTOR,
  attached by name through each selected Workload's `authorization_policies`;
- action ALLOW or DENY (default ALLOW); CUSTOM and AUDIT cannot be enforced at L4;
- each policy rule becomes one Rule whose clauses are ANDed: one clause for `to` (its
  operations ORed), one for `from` (sources ORed), one per `when` condition;
- HTTP-only attributes (hosts, methods, paths, requestPrincipals, remoteIpBlocks, trust
  domains, other `when` keys) are invisible to a ztunnel. An ALLOW rule using them is dropped
  (stricter: less is allowed). In a DENY rule they are omitted, which widens the rule
  (stricter: more is denied) - an operation or source left without any L4 condition matches
  everything, so its clause goes; a rule left with nothing at all is dropped rather than
  turned into deny-everything. Either way a warning names the attributes.
- string values: `*` presence, `*x` suffix, `x*` prefix, else exact; principals are compared
  without `spiffe://`; serviceAccounts "sa" means the policy's namespace, "ns/sa" another.
  Unlike Istio, a bad CIDR or port rejects the policy instead of silently dropping the
  value, which would widen or narrow the rule unnoticed.

PeerAuthentication (`convertedSelectorPeerAuthentications`, `convertPeerAuthentication`)
- whenever any PeerAuthentication exists, the root namespace carries the static policy
  `istio_converted_static_strict` (DENY unless the peer has an identity); a workload lists
  it when its effective mode is STRICT: the oldest mesh-wide (root namespace, no selector)
  policy, overridden by the oldest namespace-wide one unless UNSET, overridden by the oldest
  selector policy matching it;
- a selector policy with port-level modes that differ from its effective mode becomes its
  own DENY policy `converted_peer_authentication_<name>` listed by the workloads it selects;
- PERMISSIVE adds nothing; DISABLE is rejected: ambient always uses mTLS between ztunnels.
  Where Istio's conditions read "workload mode UNSET and inherited STRICT" but its Go
  operator precedence says otherwise, this follows the documented intent.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import empty_pb2

from istiod_lite.model.errors import TranslationWarning
from istiod_lite.model.fields import (
    ObjectRef,
    check_keys,
    mapping,
    port_number,
    sequence,
    string,
    string_list,
    string_map,
)
from meshcore._gen import authorization_pb2

STATIC_STRICT_POLICY_NAME = "istio_converted_static_strict"
CONVERTED_PEER_AUTHENTICATION_PREFIX = "converted_peer_authentication_"
DRY_RUN_ANNOTATION = "istio.io/dry-run"
_SPIFFE_PREFIX = "spiffe://"

Scope = authorization_pb2.Scope
Action = authorization_pb2.Action

# --- AuthorizationPolicy vocabulary ---

_RULE_FIELDS = frozenset({"from", "to", "when"})
_FROM_FIELDS = frozenset({"source"})
_TO_FIELDS = frozenset({"operation"})
_SOURCE_L4_FIELDS = frozenset(
    {
        "principals",
        "notPrincipals",
        "namespaces",
        "notNamespaces",
        "serviceAccounts",
        "notServiceAccounts",
        "ipBlocks",
        "notIpBlocks",
    }
)
_SOURCE_HTTP_FIELDS = frozenset(
    {
        "requestPrincipals",
        "notRequestPrincipals",
        "remoteIpBlocks",
        "notRemoteIpBlocks",
        # A Match has no trust-domain field and folding it into principals would widen it.
        "trustDomains",
        "notTrustDomains",
    }
)
_OPERATION_L4_FIELDS = frozenset({"ports", "notPorts"})
_OPERATION_HTTP_FIELDS = frozenset(
    {"hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"}
)
_CONDITION_FIELDS = frozenset({"key", "values", "notValues"})
_L4_WHEN_KEYS = frozenset(
    {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
)
_ACTIONS: Mapping[str, int] = {"ALLOW": Action.ALLOW, "DENY": Action.DENY}

_HTTP_FOUND = (
    "ztunnel does not support HTTP attributes (found: {found}). "
    "In ambient mode you must use a waypoint proxy to enforce HTTP rules. {consequence}"
)
_ALLOW_CONSEQUENCE = (
    "Within an ALLOW policy, rules matching HTTP attributes are omitted. "
    "This will be more restrictive than requested."
)
_DENY_MIXED_CONSEQUENCE = (
    "DENY policy with HTTP attributes is enforced without the HTTP rules. "
    "This will be more restrictive than requested."
)
_DENY_NO_EFFECT_CONSEQUENCE = (
    "After omitting unsupported HTTP attributes, this DENY policy has no enforceable rules at "
    "ztunnel and will have no effect. Deploy a waypoint proxy and use a targetRef to enforce "
    "this policy."
)


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """A translated AuthorizationPolicy."""

    namespace: str
    name: str
    # matchLabels; None for a namespace-wide (or, in the root namespace, mesh-wide) policy.
    selector: Mapping[str, str] | None
    # What ztunnels enforce; None for targetRef (waypoint) policies.
    authorization: authorization_pb2.Authorization | None
    warnings: tuple[TranslationWarning, ...]

    @property
    def resource_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def attaches_by_selector(self) -> bool:
        """Whether selected Workloads list this policy in `authorization_policies`."""
        return self.authorization is not None and self.selector is not None


def parse_authorization_policy(
    namespace: str, name: str, obj: Mapping[str, Any], *, root_namespace: str
) -> AuthorizationPolicy:
    ref = ObjectRef("AuthorizationPolicy", namespace, name)
    meta = mapping(ref, obj.get("metadata"), "metadata")
    spec = mapping(ref, obj.get("spec"), "spec")
    selector = _selector(ref, spec)
    if spec.get("targetRef") or spec.get("targetRefs"):
        return AuthorizationPolicy(namespace, name, selector, None, ())

    action_name = string(ref, spec.get("action"), "spec.action", default="ALLOW")
    action = _ACTIONS.get(action_name)
    if action is None:
        hint = (
            "ztunnel enforces only ALLOW and DENY; attach the policy to a waypoint with targetRefs"
            if action_name in ("CUSTOM", "AUDIT")
            else "expected ALLOW or DENY"
        )
        raise ref.error("spec.action", f"action {action_name!r} is not supported: {hint}")

    if selector is not None:
        scope = Scope.WORKLOAD_SELECTOR
    elif namespace == root_namespace:
        scope = Scope.GLOBAL
    else:
        scope = Scope.NAMESPACE

    rules: list[authorization_pb2.Rule] = []
    http_found: set[str] = set()
    for i, entry in enumerate(sequence(ref, spec.get("rules"), "spec.rules")):
        path = f"spec.rules[{i}]"
        rule, found = _convert_rule(ref, mapping(ref, entry, path), path, action, namespace)
        if rule is not None:
            rules.append(rule)
        http_found |= found

    authorization = authorization_pb2.Authorization(
        name=name,
        namespace=namespace,
        scope=scope,
        action=action,
        rules=rules,
        dry_run=_dry_run(ref, meta),
    )
    warnings: tuple[TranslationWarning, ...] = ()
    if http_found:
        if action == Action.ALLOW:
            consequence = _ALLOW_CONSEQUENCE
        elif rules:
            consequence = _DENY_MIXED_CONSEQUENCE
        else:
            consequence = _DENY_NO_EFFECT_CONSEQUENCE
        message = _HTTP_FOUND.format(found=", ".join(sorted(http_found)), consequence=consequence)
        warnings = (ref.warning("spec.rules", message),)
    return AuthorizationPolicy(namespace, name, selector, authorization, warnings)


def _selector(ref: ObjectRef, spec: Mapping[str, Any]) -> Mapping[str, str] | None:
    """matchLabels, or None when absent or empty (an empty selector selects the namespace)."""
    selector = mapping(ref, spec.get("selector"), "spec.selector")
    labels = string_map(ref, selector.get("matchLabels"), "spec.selector.matchLabels")
    return labels or None


def _dry_run(ref: ObjectRef, meta: Mapping[str, Any]) -> bool:
    annotations = string_map(ref, meta.get("annotations"), "metadata.annotations")
    value = annotations.get(DRY_RUN_ANNOTATION, "")
    if value.lower() in ("", "false"):
        return False
    if value.lower() == "true":
        return True
    raise ref.error(
        f"metadata.annotations[{DRY_RUN_ANNOTATION}]", f"{value!r} is not true or false"
    )


def _convert_rule(
    ref: ObjectRef, rule: Mapping[str, Any], path: str, action: int, namespace: str
) -> tuple[authorization_pb2.Rule | None, set[str]]:
    """One policy rule as a Rule (None if dropped) and the HTTP attributes it used."""
    check_keys(ref, rule, _RULE_FIELDS, path)
    clauses: list[authorization_pb2.Clause] = []
    http_found: set[str] = set()

    operations = sequence(ref, rule.get("to"), f"{path}.to")
    if operations:
        matches = []
        for i, entry in enumerate(operations):
            entry_path = f"{path}.to[{i}]"
            item = mapping(ref, entry, entry_path)
            check_keys(ref, item, _TO_FIELDS, entry_path)
            operation = _non_empty(ref, item.get("operation"), f"{entry_path}.operation")
            check_keys(
                ref,
                operation,
                _OPERATION_L4_FIELDS | _OPERATION_HTTP_FIELDS,
                f"{entry_path}.operation",
            )
            http_found |= _present(operation, _OPERATION_HTTP_FIELDS)
            matches.append(_operation_match(ref, operation, f"{entry_path}.operation"))
        clause = _clause_without_http(matches)
        if clause is not None:
            clauses.append(clause)

    sources = sequence(ref, rule.get("from"), f"{path}.from")
    if sources:
        matches = []
        for i, entry in enumerate(sources):
            entry_path = f"{path}.from[{i}]"
            item = mapping(ref, entry, entry_path)
            check_keys(ref, item, _FROM_FIELDS, entry_path)
            source = _non_empty(ref, item.get("source"), f"{entry_path}.source")
            check_keys(ref, source, _SOURCE_L4_FIELDS | _SOURCE_HTTP_FIELDS, f"{entry_path}.source")
            http_found |= _present(source, _SOURCE_HTTP_FIELDS)
            matches.append(_source_match(ref, source, f"{entry_path}.source", namespace))
        clause = _clause_without_http(matches)
        if clause is not None:
            clauses.append(clause)

    for i, entry in enumerate(sequence(ref, rule.get("when"), f"{path}.when")):
        entry_path = f"{path}.when[{i}]"
        condition = mapping(ref, entry, entry_path)
        check_keys(ref, condition, _CONDITION_FIELDS, entry_path)
        key = string(ref, condition.get("key"), f"{entry_path}.key")
        if not key:
            raise ref.error(f"{entry_path}.key", "required")
        values = string_list(ref, condition.get("values"), f"{entry_path}.values")
        not_values = string_list(ref, condition.get("notValues"), f"{entry_path}.notValues")
        if not values and not not_values:
            raise ref.error(entry_path, "needs values or notValues")
        if key not in _L4_WHEN_KEYS:
            http_found.add(key)
            continue
        match = _when_match(ref, key, values, not_values, entry_path)
        clauses.append(authorization_pb2.Clause(matches=[match]))

    if http_found and (action == Action.ALLOW or not clauses):
        return None, http_found
    return authorization_pb2.Rule(clauses=clauses), http_found


def _non_empty(ref: ObjectRef, value: Any, path: str) -> Mapping[str, Any]:
    # An empty source/operation is rejected by Istio's validation: it would match nothing
    # at ztunnel (an empty Match is skipped) yet reads as "anything".
    result = mapping(ref, value, path)
    if not any(result.values()):
        raise ref.error(path, "must set at least one field")
    return result


def _present(section: Mapping[str, Any], fields: Iterable[str]) -> set[str]:
    return {f for f in fields if section.get(f)}


def _clause_without_http(
    matches: Sequence[authorization_pb2.Match],
) -> authorization_pb2.Clause | None:
    """The ORed clause; None when a Match was left empty by omitting HTTP attributes.

    Omitting a condition makes that alternative match anything, so the whole OR does too.
    """
    if any(not m.ListFields() for m in matches):
        return None
    return authorization_pb2.Clause(matches=matches)


def _operation_match(
    ref: ObjectRef, operation: Mapping[str, Any], path: str
) -> authorization_pb2.Match:
    return authorization_pb2.Match(
        destination_ports=_ports(ref, operation.get("ports"), f"{path}.ports"),
        not_destination_ports=_ports(ref, operation.get("notPorts"), f"{path}.notPorts"),
    )


def _source_match(
    ref: ObjectRef, source: Mapping[str, Any], path: str, namespace: str
) -> authorization_pb2.Match:
    def strings(field: str) -> list[str]:
        return string_list(ref, source.get(field), f"{path}.{field}")

    return authorization_pb2.Match(
        principals=_string_matches(strings("principals"), principal=True),
        not_principals=_string_matches(strings("notPrincipals"), principal=True),
        namespaces=_string_matches(strings("namespaces")),
        not_namespaces=_string_matches(strings("notNamespaces")),
        service_accounts=_service_accounts(
            ref, strings("serviceAccounts"), f"{path}.serviceAccounts", namespace
        ),
        not_service_accounts=_service_accounts(
            ref, strings("notServiceAccounts"), f"{path}.notServiceAccounts", namespace
        ),
        source_ips=_addresses(ref, strings("ipBlocks"), f"{path}.ipBlocks"),
        not_source_ips=_addresses(ref, strings("notIpBlocks"), f"{path}.notIpBlocks"),
    )


def _when_match(
    ref: ObjectRef, key: str, values: list[str], not_values: list[str], path: str
) -> authorization_pb2.Match:
    match key:
        case "source.ip":
            return authorization_pb2.Match(
                source_ips=_addresses(ref, values, f"{path}.values"),
                not_source_ips=_addresses(ref, not_values, f"{path}.notValues"),
            )
        case "destination.ip":
            return authorization_pb2.Match(
                destination_ips=_addresses(ref, values, f"{path}.values"),
                not_destination_ips=_addresses(ref, not_values, f"{path}.notValues"),
            )
        case "destination.port":
            return authorization_pb2.Match(
                destination_ports=_ports(ref, values, f"{path}.values"),
                not_destination_ports=_ports(ref, not_values, f"{path}.notValues"),
            )
        case "source.namespace":
            return authorization_pb2.Match(
                namespaces=_string_matches(values), not_namespaces=_string_matches(not_values)
            )
        case _:  # source.principal
            return authorization_pb2.Match(
                principals=_string_matches(values, principal=True),
                not_principals=_string_matches(not_values, principal=True),
            )


def string_match(value: str) -> authorization_pb2.StringMatch:
    """Istio's wildcard convention: `*` presence, `*x` suffix, `x*` prefix, else exact."""
    if value == "*":
        return authorization_pb2.StringMatch(presence=empty_pb2.Empty())
    if value.startswith("*"):
        return authorization_pb2.StringMatch(suffix=value[1:])
    if value.endswith("*"):
        return authorization_pb2.StringMatch(prefix=value[:-1])
    return authorization_pb2.StringMatch(exact=value)


def _string_matches(
    values: Iterable[str], *, principal: bool = False
) -> list[authorization_pb2.StringMatch]:
    if principal:
        values = (v.removeprefix(_SPIFFE_PREFIX) for v in values)
    return [string_match(v) for v in values]


def _service_accounts(
    ref: ObjectRef, values: list[str], path: str, namespace: str
) -> list[authorization_pb2.ServiceAccountMatch]:
    matches = []
    for i, value in enumerate(values):
        account_namespace, slash, account = value.partition("/")
        if not slash:
            account_namespace, account = namespace, value
        if not account_namespace or not account or "/" in account:
            raise ref.error(
                f"{path}[{i}]", f"{value!r} is not a service account ('name' or 'namespace/name')"
            )
        matches.append(
            authorization_pb2.ServiceAccountMatch(
                namespace=account_namespace, serviceAccount=account
            )
        )
    return matches


def _addresses(ref: ObjectRef, values: list[str], path: str) -> list[authorization_pb2.Address]:
    addresses = []
    for i, value in enumerate(values):
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ref.error(f"{path}[{i}]", f"{value!r} is not an IP address or CIDR") from None
        addresses.append(
            authorization_pb2.Address(
                address=network.network_address.packed, length=network.prefixlen
            )
        )
    return addresses


def _ports(ref: ObjectRef, value: Any, path: str) -> list[int]:
    return [
        port_number(ref, item, f"{path}[{i}]") for i, item in enumerate(sequence(ref, value, path))
    ]


# --- PeerAuthentication ---


class MtlsMode(enum.Enum):
    UNSET = "UNSET"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    """A PeerAuthentication; `created` (RFC 3339) then name decide which one is oldest."""

    namespace: str
    name: str
    created: str
    # matchLabels; None for a namespace-wide (or, in the root namespace, mesh-wide) policy.
    selector: Mapping[str, str] | None
    mode: MtlsMode
    # (port, mode) sorted by port.
    port_modes: tuple[tuple[int, MtlsMode], ...]

    @property
    def age_key(self) -> tuple[str, str]:
        return (self.created, self.name)

    @property
    def converted_resource_name(self) -> str:
        return converted_peer_authentication_name(self.namespace, self.name)


def converted_peer_authentication_name(namespace: str, name: str) -> str:
    """The resource name of a PeerAuthentication's port-level DENY policy."""
    return f"{namespace}/{CONVERTED_PEER_AUTHENTICATION_PREFIX}{name}"


def parse_peer_authentication(
    namespace: str, name: str, obj: Mapping[str, Any]
) -> PeerAuthentication:
    ref = ObjectRef("PeerAuthentication", namespace, name)
    meta = mapping(ref, obj.get("metadata"), "metadata")
    spec = mapping(ref, obj.get("spec"), "spec")
    selector = _selector(ref, spec)
    mode = _mtls_mode(ref, spec.get("mtls"), "spec.mtls")
    port_modes: dict[int, MtlsMode] = {}
    for key, value in mapping(ref, spec.get("portLevelMtls"), "spec.portLevelMtls").items():
        path = f"spec.portLevelMtls[{key}]"
        port_modes[port_number(ref, key, path)] = _mtls_mode(ref, value, path)
    if port_modes and selector is None:
        raise ref.error("spec.portLevelMtls", "port-level modes need a workload selector")
    return PeerAuthentication(
        namespace=namespace,
        name=name,
        created=string(ref, meta.get("creationTimestamp"), "metadata.creationTimestamp"),
        selector=selector,
        mode=mode,
        port_modes=tuple(sorted(port_modes.items())),
    )


def _mtls_mode(ref: ObjectRef, value: Any, path: str) -> MtlsMode:
    text = string(ref, mapping(ref, value, path).get("mode"), f"{path}.mode", default="UNSET")
    if text == "DISABLE":
        raise ref.error(
            f"{path}.mode",
            "DISABLE is not supported in ambient: traffic between ztunnels is always mTLS; "
            "use PERMISSIVE to accept plaintext",
        )
    try:
        return MtlsMode(text)
    except ValueError:
        raise ref.error(
            f"{path}.mode", f"{text!r} is not one of UNSET, PERMISSIVE, STRICT"
        ) from None


def _deny_without_identity(**match_fields: Any) -> authorization_pb2.Clause:
    presence = authorization_pb2.StringMatch(presence=empty_pb2.Empty())
    return authorization_pb2.Clause(
        matches=[authorization_pb2.Match(not_principals=[presence], **match_fields)]
    )


def static_strict_policy(root_namespace: str) -> authorization_pb2.Authorization:
    """The DENY-plaintext policy STRICT workloads list, sent whenever PeerAuthentications exist."""
    return authorization_pb2.Authorization(
        name=STATIC_STRICT_POLICY_NAME,
        namespace=root_namespace,
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
        rules=[authorization_pb2.Rule(clauses=[_deny_without_identity()])],
    )


def oldest(policies: Iterable[PeerAuthentication]) -> PeerAuthentication | None:
    return min(policies, key=lambda p: p.age_key, default=None)


def _inherited_strict(
    namespace_wide: PeerAuthentication | None, mesh_wide: PeerAuthentication | None
) -> bool:
    """Whether a workload without its own mode is STRICT (namespace overrides mesh unless UNSET)."""
    if namespace_wide is not None and namespace_wide.mode is not MtlsMode.UNSET:
        return namespace_wide.mode is MtlsMode.STRICT
    return mesh_wide is not None and mesh_wide.mode is MtlsMode.STRICT


def workload_peer_authentication_policies(
    root_namespace: str,
    *,
    mesh_wide: PeerAuthentication | None,
    namespace_wide: PeerAuthentication | None,
    workload: PeerAuthentication | None,
) -> list[str]:
    """The policy names a workload lists because of the PeerAuthentications applying to it."""
    strict = _inherited_strict(namespace_wide, mesh_wide)
    converted = False
    if workload is not None:
        if workload.mode is MtlsMode.STRICT:
            strict = True
        elif workload.mode is MtlsMode.PERMISSIVE:
            strict = False
        port_modes = {mode for _, mode in workload.port_modes}
        if workload.port_modes:
            if workload.mode is MtlsMode.STRICT or (workload.mode is MtlsMode.UNSET and strict):
                # Ports exempted from STRICT: the converted policy carries the strictness too.
                if MtlsMode.PERMISSIVE in port_modes:
                    converted, strict = True, False
            else:
                strict = False
                converted = MtlsMode.STRICT in port_modes
    names = []
    if strict:
        names.append(f"{root_namespace}/{STATIC_STRICT_POLICY_NAME}")
    if converted and workload is not None:
        names.append(workload.converted_resource_name)
    return sorted(names)


def convert_peer_authentication(
    root_namespace: str,
    policy: PeerAuthentication,
    *,
    namespace_wide: PeerAuthentication | None,
    mesh_wide: PeerAuthentication | None,
) -> authorization_pb2.Authorization | None:
    """The DENY policy for a selector PeerAuthentication's port-level modes, if one is needed."""
    if policy.namespace == root_namespace or policy.selector is None or not policy.port_modes:
        return None
    inherited_strict = _inherited_strict(namespace_wide, mesh_wide)
    mode = policy.mode
    clauses: list[authorization_pb2.Clause] = []
    rules: list[authorization_pb2.Rule] = []
    if mode is MtlsMode.STRICT:
        clauses.append(_deny_without_identity())
    exempted_port = False
    for port, port_mode in policy.port_modes:
        if port_mode is MtlsMode.STRICT:
            if mode is MtlsMode.STRICT or (mode is MtlsMode.UNSET and inherited_strict):
                continue  # the workload is STRICT anyway
            # Rules are ORed: one per STRICT port.
            rules.append(
                authorization_pb2.Rule(clauses=[_deny_without_identity(destination_ports=[port])])
            )
        elif port_mode is MtlsMode.PERMISSIVE:
            if mode is MtlsMode.PERMISSIVE or (mode is MtlsMode.UNSET and not inherited_strict):
                continue  # the workload is not STRICT anyway
            exempted_port = True
            # ANDed with "no identity": deny plaintext unless it is for this port.
            clauses.append(
                authorization_pb2.Clause(
                    matches=[authorization_pb2.Match(not_destination_ports=[port])]
                )
            )
    if mode is MtlsMode.STRICT and not exempted_port:
        return None  # plain STRICT: the static policy covers it
    if exempted_port and inherited_strict and mode is not MtlsMode.STRICT:
        # Merge the inherited STRICT in: the static policy is not listed alongside an exception.
        clauses.append(_deny_without_identity())
    if clauses:
        rules.append(authorization_pb2.Rule(clauses=clauses))
    if not rules:
        return None
    return authorization_pb2.Authorization(
        name=f"{CONVERTED_PEER_AUTHENTICATION_PREFIX}{policy.name}",
        namespace=policy.namespace,
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
        rules=rules,
    )
