"""AuthorizationPolicy with `targetRefs` -> Envoy RBAC policies for waypoint listeners.

Follows Istio's pilot/pkg/security/authz/model (`New`, `Generate`, the generators and
matchers), so a real Envoy given the same RBAC filter decides the same:

- targets: a Service (core group) in the policy's namespace -> that service's listeners; a
  waypoint (Gateway, or our Waypoint) -> every listener of that waypoint; in the root namespace,
  the GatewayClass `istio-waypoint` -> every waypoint listener. `selector` policies are for
  ztunnels (policies.py) and waypoints ignore them; beside targetRefs a selector is ignored.
- action ALLOW or DENY (default ALLOW); the `istio.io/dry-run` annotation puts the policy in
  the filter's shadow rules (evaluated and counted, never enforced). CUSTOM (external
  authorization) and AUDIT policies are accepted with a warning and have no effect.
- each rule becomes one RBAC policy named `ns[<ns>]-policy[<name>]-rule[<i>]`: its
  permissions are the `to` operations (ORed; none: any), its principals the `from` sources
  (ORed; none: any), and every `when` condition is ANDed into all of them - on the principal
  side for `source.*` and `request.headers[...]`, on the permission side for
  `destination.port`. Within an operation or source, fields are ANDed; each field ORs its
  values and excludes its `not` values.
- matchers: principals `authenticated.principal_name` with the `spiffe://` prefix (a policy may
  write it or not); namespaces the regex `.*/ns/<ns>/.*` on the principal; serviceAccounts
  Istio's SPIFFE regex; methods the `:method` header; hosts `:authority` ignoring case; paths
  `url_path`; ports `destination_port` (the service port the client addressed); string values
  follow Istio's `*` rules (`*` any non-empty, `x*` prefix, `*x` suffix, else exact).
- the client identity at a waypoint is the peer certificate of the HBONE connection (the
  client's ztunnel presents the client workload's identity), so IP blocks, request
  principals (JWT) and other `when` keys cannot be evaluated: they are rejected by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.type.matcher.v3 import path_pb2, regex_pb2, string_pb2

from istiod_lite.model.errors import TranslationWarning
from istiod_lite.model.fields import ObjectRef, mapping, port_number, sequence, string, string_list
from istiod_lite.model.l7 import values
from istiod_lite.model.l7.waypoints import WAYPOINT_GATEWAY_CLASS
from istiod_lite.model.policies import DRY_RUN_ANNOTATION

SPIFFE_PREFIX = "spiffe://"
GATEWAY_GROUP = "gateway.networking.k8s.io"
WAYPOINT_GROUP = "istiodlite.io"
_CORE_GROUPS = frozenset({"", "core"})
_ACTIONS = frozenset({"ALLOW", "DENY"})
_WITHOUT_EFFECT = frozenset({"CUSTOM", "AUDIT"})
_REQUEST_HEADER = re.compile(r"request\.headers\[([^\[\]]+)\]")

_SPEC = frozenset({"targetRef", "targetRefs", "selector", "action", "rules", "provider"})
_TARGET = frozenset({"group", "kind", "name", "namespace"})
_RULE = frozenset({"from", "to", "when"})
_FROM = frozenset({"source"})
_TO = frozenset({"operation"})
_SOURCE = frozenset(
    {
        "principals",
        "notPrincipals",
        "namespaces",
        "notNamespaces",
        "serviceAccounts",
        "notServiceAccounts",
    }
)
_SOURCE_UNSUPPORTED = frozenset(
    {
        "requestPrincipals",
        "notRequestPrincipals",
        "ipBlocks",
        "notIpBlocks",
        "remoteIpBlocks",
        "notRemoteIpBlocks",
        "trustDomains",
        "notTrustDomains",
    }
)
_OPERATION = frozenset(
    {"hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"}
)
_CONDITION = frozenset({"key", "values", "notValues"})


@dataclass(frozen=True, slots=True)
class PolicyTarget:
    """What a policy attaches to."""

    kind: str  # "Service", "Waypoint" or "GatewayClass"
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class WaypointPolicy:
    """A translated targetRef AuthorizationPolicy; `rules` are (RBAC policy name, policy)."""

    namespace: str
    name: str
    action: str  # "ALLOW" or "DENY" (enforced); "CUSTOM" or "AUDIT" (no effect, warned)
    dry_run: bool
    targets: tuple[PolicyTarget, ...]
    rules: tuple[tuple[str, rbac_pb2.Policy], ...]
    warnings: tuple[TranslationWarning, ...] = ()


def has_target_refs(obj: Mapping[str, Any]) -> bool:
    spec = obj.get("spec")
    return isinstance(spec, Mapping) and bool(spec.get("targetRef") or spec.get("targetRefs"))


def parse_waypoint_policy(
    namespace: str, name: str, obj: Mapping[str, Any], *, root_namespace: str
) -> WaypointPolicy:
    """A policy with `targetRef(s)` (see `has_target_refs`)."""
    ref = ObjectRef("AuthorizationPolicy", namespace, name)
    meta = mapping(ref, obj.get("metadata"), "metadata")
    spec = values.section(ref, obj.get("spec"), "spec", _SPEC)
    action = string(ref, spec.get("action"), "spec.action", default="ALLOW")
    if action not in _ACTIONS | _WITHOUT_EFFECT:
        raise ref.error("spec.action", f"{action!r} is not one of ALLOW, DENY, CUSTOM, AUDIT")
    entries = [("spec.targetRef", spec["targetRef"])] if spec.get("targetRef") else []
    entries += [
        (f"spec.targetRefs[{i}]", entry)
        for i, entry in enumerate(sequence(ref, spec.get("targetRefs"), "spec.targetRefs"))
    ]
    targets = tuple(_target(ref, entry, path, namespace, root_namespace) for path, entry in entries)
    if action in _WITHOUT_EFFECT:
        warning = ref.warning(
            "spec.action",
            f"{action} policies have no effect on waypoints (no external authorization or "
            "audit logging); requests are neither allowed nor denied by this policy",
        )
        return WaypointPolicy(namespace, name, action, False, targets, (), (warning,))
    rules = tuple(
        (
            f"ns[{namespace}]-policy[{name}]-rule[{i}]",
            _rule(ref, mapping(ref, entry, f"spec.rules[{i}]"), f"spec.rules[{i}]", namespace),
        )
        for i, entry in enumerate(sequence(ref, spec.get("rules"), "spec.rules"))
    )
    annotations = mapping(ref, meta.get("annotations"), "metadata.annotations")
    dry_run = string(
        ref, annotations.get(DRY_RUN_ANNOTATION), f"metadata.annotations[{DRY_RUN_ANNOTATION}]"
    ).lower()
    if dry_run not in ("", "true", "false"):
        raise ref.error(
            f"metadata.annotations[{DRY_RUN_ANNOTATION}]", f"{dry_run!r} is not true or false"
        )
    return WaypointPolicy(
        namespace=namespace,
        name=name,
        action=action,
        dry_run=dry_run == "true",
        targets=targets,
        rules=rules,
    )


def _target(
    ref: ObjectRef, value: Any, path: str, namespace: str, root_namespace: str
) -> PolicyTarget:
    target = values.section(ref, value, path, _TARGET)
    group = string(ref, target.get("group"), f"{path}.group")
    kind = string(ref, target.get("kind"), f"{path}.kind")
    name = string(ref, target.get("name"), f"{path}.name")
    if not name:
        raise ref.error(f"{path}.name", "required")
    target_namespace = string(ref, target.get("namespace"), f"{path}.namespace")
    if target_namespace and target_namespace != namespace:
        raise ref.error(
            f"{path}.namespace", "a policy can only target objects of its own namespace"
        )
    # The group may be left out: the kind alone says what is meant.
    if group in _CORE_GROUPS and kind == "Service":
        return PolicyTarget("Service", namespace, name)
    if (group or GATEWAY_GROUP, kind) == (GATEWAY_GROUP, "Gateway") or (
        group or WAYPOINT_GROUP,
        kind,
    ) == (WAYPOINT_GROUP, "Waypoint"):
        return PolicyTarget("Waypoint", namespace, name)
    if (group or GATEWAY_GROUP, kind) == (GATEWAY_GROUP, "GatewayClass"):
        if namespace != root_namespace or name != WAYPOINT_GATEWAY_CLASS:
            raise ref.error(
                path,
                f"only the GatewayClass {WAYPOINT_GATEWAY_CLASS!r}, from the root namespace "
                f"{root_namespace!r}, can be targeted",
            )
        return PolicyTarget("GatewayClass", "", name)
    raise ref.error(
        f"{path}.kind",
        f"{group or 'core'}/{kind} cannot be targeted; "
        "use a Service, a waypoint Gateway or a Waypoint",
    )


# --- Rules ---


def _rule(ref: ObjectRef, rule: Mapping[str, Any], path: str, namespace: str) -> rbac_pb2.Policy:
    values.section(ref, rule, path, _RULE)
    when_permissions: list[rbac_pb2.Permission] = []
    when_principals: list[rbac_pb2.Principal] = []
    for i, entry in enumerate(sequence(ref, rule.get("when"), f"{path}.when")):
        _condition(ref, entry, f"{path}.when[{i}]", when_permissions, when_principals)

    principals = []
    for i, entry in enumerate(sequence(ref, rule.get("from"), f"{path}.from")):
        entry_path = f"{path}.from[{i}]"
        source = values.section(
            ref,
            values.section(ref, entry, entry_path, _FROM).get("source"),
            f"{entry_path}.source",
            _SOURCE,
            _SOURCE_UNSUPPORTED,
        )
        principals.append(
            _principal_and(
                _source(ref, source, f"{entry_path}.source", namespace) + when_principals
            )
        )
    if not principals:
        principals.append(_principal_and(when_principals))

    permissions = []
    for i, entry in enumerate(sequence(ref, rule.get("to"), f"{path}.to")):
        entry_path = f"{path}.to[{i}]"
        operation = values.section(
            ref,
            values.section(ref, entry, entry_path, _TO).get("operation"),
            f"{entry_path}.operation",
            _OPERATION,
        )
        permissions.append(
            _permission_and(
                _operation(ref, operation, f"{entry_path}.operation") + when_permissions
            )
        )
    if not permissions:
        permissions.append(_permission_and(when_permissions))
    return rbac_pb2.Policy(permissions=permissions, principals=principals)


def _source(
    ref: ObjectRef, source: Mapping[str, Any], path: str, namespace: str
) -> list[rbac_pb2.Principal]:
    if not any(source.values()):
        raise ref.error(path, "must set at least one field")
    result: list[rbac_pb2.Principal] = []
    for field, matcher in (
        ("principals", _principal_name),
        ("namespaces", _namespace),
        ("serviceAccounts", lambda v: _service_account(v, namespace)),
    ):
        positive = string_list(ref, source.get(field), f"{path}.{field}")
        negative_field = f"not{field[0].upper()}{field[1:]}"
        negative = string_list(ref, source.get(negative_field), f"{path}.{negative_field}")
        for i, value in enumerate(positive + negative):
            if not value:
                where = field if i < len(positive) else negative_field
                raise ref.error(f"{path}.{where}", "empty value")
        result += _principal_values([matcher(v) for v in positive], [matcher(v) for v in negative])
    return result


def _operation(
    ref: ObjectRef, operation: Mapping[str, Any], path: str
) -> list[rbac_pb2.Permission]:
    if not any(operation.values()):
        raise ref.error(path, "must set at least one field")

    def strings(field: str) -> list[str]:
        found = string_list(ref, operation.get(field), f"{path}.{field}")
        for i, value in enumerate(found):
            if not value:
                raise ref.error(f"{path}.{field}[{i}]", "empty value")
            if field.lower().endswith("paths") and "{" in value:
                raise ref.error(
                    f"{path}.{field}[{i}]", "path templates ({*}, {**}) are not supported"
                )
        return found

    def ports(field: str) -> list[int]:
        return [
            port_number(ref, value, f"{path}.{field}[{i}]")
            for i, value in enumerate(sequence(ref, operation.get(field), f"{path}.{field}"))
        ]

    result: list[rbac_pb2.Permission] = []
    result += _permission_values(
        [_header_permission(":authority", v, ignore_case=True) for v in strings("hosts")],
        [_header_permission(":authority", v, ignore_case=True) for v in strings("notHosts")],
    )
    result += _permission_values(
        [_header_permission(":method", v) for v in strings("methods")],
        [_header_permission(":method", v) for v in strings("notMethods")],
    )
    result += _permission_values(
        [_path_permission(v) for v in strings("paths")],
        [_path_permission(v) for v in strings("notPaths")],
    )
    result += _permission_values(
        [rbac_pb2.Permission(destination_port=p) for p in ports("ports")],
        [rbac_pb2.Permission(destination_port=p) for p in ports("notPorts")],
    )
    return result


def _condition(
    ref: ObjectRef,
    value: Any,
    path: str,
    permissions: list[rbac_pb2.Permission],
    principals: list[rbac_pb2.Principal],
) -> None:
    condition = values.section(ref, value, path, _CONDITION)
    key = string(ref, condition.get("key"), f"{path}.key")
    positive = string_list(ref, condition.get("values"), f"{path}.values")
    negative = string_list(ref, condition.get("notValues"), f"{path}.notValues")
    if not positive and not negative:
        raise ref.error(path, "needs values or notValues")
    header = _REQUEST_HEADER.fullmatch(key)
    if header is not None:
        name = header.group(1)
        principals += _principal_values(
            [rbac_pb2.Principal(header=_header_matcher(name, v)) for v in positive],
            [rbac_pb2.Principal(header=_header_matcher(name, v)) for v in negative],
        )
    elif key == "source.principal":
        principals += _principal_values(
            [_principal_name(v) for v in positive], [_principal_name(v) for v in negative]
        )
    elif key == "source.namespace":
        principals += _principal_values(
            [_namespace(v) for v in positive], [_namespace(v) for v in negative]
        )
    elif key == "destination.port":
        permissions += _permission_values(
            [
                rbac_pb2.Permission(destination_port=port_number(ref, v, f"{path}.values[{i}]"))
                for i, v in enumerate(positive)
            ],
            [
                rbac_pb2.Permission(destination_port=port_number(ref, v, f"{path}.notValues[{i}]"))
                for i, v in enumerate(negative)
            ],
        )
    else:
        raise ref.error(
            f"{path}.key",
            f"{key!r} is not supported by waypoints; supported: request.headers[<name>], "
            "source.principal, source.namespace, destination.port",
        )


# --- Matchers (Istio's pilot/pkg/security/authz/matcher) ---


def string_matcher(
    value: str, prefix: str = "", *, ignore_case: bool = False
) -> string_pb2.StringMatcher:
    """Istio's `StringMatcherWithPrefix`: `*` any non-empty, `*x` suffix, `x*` prefix, or exact."""
    if value == "*":
        return _regex(".+")
    if value.startswith("*"):
        if prefix:
            return _regex(re.escape(prefix) + ".*" + re.escape(value[1:]))
        return string_pb2.StringMatcher(suffix=value[1:], ignore_case=ignore_case)
    if value.endswith("*"):
        return string_pb2.StringMatcher(prefix=prefix + value[:-1], ignore_case=ignore_case)
    return string_pb2.StringMatcher(exact=prefix + value, ignore_case=ignore_case)


def _regex(pattern: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=pattern))


def _authenticated(matcher: string_pb2.StringMatcher) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(
        authenticated=rbac_pb2.Principal.Authenticated(principal_name=matcher)
    )


def _principal_name(value: str) -> rbac_pb2.Principal:
    return _authenticated(string_matcher(value.removeprefix(SPIFFE_PREFIX), SPIFFE_PREFIX))


def _namespace(value: str) -> rbac_pb2.Principal:
    pattern = ".*".join(re.escape(part) for part in value.split("*"))
    return _authenticated(_regex(f".*/ns/{pattern}/.*"))


def _service_account(value: str, namespace: str) -> rbac_pb2.Principal:
    account_namespace, slash, account = value.partition("/")
    if not slash:
        account_namespace, account = namespace, value
    pattern = f"spiffe://.+/ns/{re.escape(account_namespace)}/(.+/|)sa/{re.escape(account)}(/.+)?"
    return _authenticated(_regex(pattern))


def _header_matcher(
    name: str, value: str, *, ignore_case: bool = False
) -> route_components_pb2.HeaderMatcher:
    if value == "*":
        return route_components_pb2.HeaderMatcher(name=name, present_match=True)
    return route_components_pb2.HeaderMatcher(
        name=name, string_match=string_matcher(value, ignore_case=ignore_case)
    )


def _header_permission(name: str, value: str, *, ignore_case: bool = False) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(header=_header_matcher(name, value, ignore_case=ignore_case))


def _path_permission(value: str) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=string_matcher(value)))


# --- Combinators (Istio's model.go: a field ORs its values, ANDed with NOT(OR(not values))) ---


def _permission_values(
    positive: list[rbac_pb2.Permission], negative: list[rbac_pb2.Permission]
) -> list[rbac_pb2.Permission]:
    result = []
    if positive:
        result.append(rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=positive)))
    if negative:
        either = rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=negative))
        result.append(rbac_pb2.Permission(not_rule=either))
    return result


def _principal_values(
    positive: list[rbac_pb2.Principal], negative: list[rbac_pb2.Principal]
) -> list[rbac_pb2.Principal]:
    result = []
    if positive:
        result.append(rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=positive)))
    if negative:
        either = rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=negative))
        result.append(rbac_pb2.Principal(not_id=either))
    return result


def _permission_and(rules: list[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(
        and_rules=rbac_pb2.Permission.Set(rules=rules or [rbac_pb2.Permission(any=True)])
    )


def _principal_and(ids: list[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(
        and_ids=rbac_pb2.Principal.Set(ids=ids or [rbac_pb2.Principal(any=True)])
    )
