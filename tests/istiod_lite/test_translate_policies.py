"""AuthorizationPolicy and PeerAuthentication -> Authorization resources (ambient-facts §7)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import empty_pb2

from istiod_lite.model import Translator
from istiod_lite.sources.base import ObjectEvent
from meshcore._gen import authorization_pb2
from meshcore.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL

A = authorization_pb2
PRESENCE = A.StringMatch(presence=empty_pb2.Empty())
STATIC = "istio-system/istio_converted_static_strict"

# --- Helpers ---


def pod_obj(labels: dict[str, str], ip: str) -> dict[str, Any]:
    return {
        "metadata": {"labels": labels},
        "spec": {"nodeName": "node-a"},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def policy_obj(spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": metadata,
        "spec": spec,
    }


def peer_obj(
    mode: str | None = None,
    *,
    selector: dict[str, str] | None = None,
    ports: dict[Any, str] | None = None,
    created: str = "2026-01-01T00:00:00Z",
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if ports is not None:
        spec["portLevelMtls"] = {port: {"mode": m} for port, m in ports.items()}
    return {"metadata": {"creationTimestamp": created}, "spec": spec}


def translator_with(*objects: tuple[str, str, str, dict[str, Any]]) -> Translator:
    t = Translator()
    for kind, namespace, name, obj in objects:
        t.apply(ObjectEvent(kind, "upsert", namespace, name, obj))
    return t


def authorization(t: Translator, name: str) -> A.Authorization | None:
    return t.resources()[AUTHORIZATION_TYPE_URL].get(name)  # type: ignore[return-value]


def convert(spec: dict[str, Any], namespace: str = "shop", **metadata: Any) -> A.Authorization:
    t = translator_with(("AuthorizationPolicy", namespace, "p", policy_obj(spec, **metadata)))
    assert t.errors() == []
    result = authorization(t, f"{namespace}/p")
    assert result is not None
    return result


def listed(t: Translator, namespace: str, pod: str) -> list[str]:
    address = t.resources()[ADDRESS_TYPE_URL][f"Kubernetes//Pod/{namespace}/{pod}"]
    return list(address.workload.authorization_policies)  # type: ignore[attr-defined]


def only_match(policy: A.Authorization) -> A.Match:
    [rule] = policy.rules
    [clause] = rule.clauses
    [match] = clause.matches
    return match


PODS = (
    ("Pod", "shop", "web-0", pod_obj({"app": "web"}, "10.1.0.1")),
    ("Pod", "shop", "api-0", pod_obj({"app": "api"}, "10.1.0.2")),
    ("Pod", "bank", "web-0", pod_obj({"app": "web"}, "10.1.0.3")),
    ("Pod", "istio-system", "web-0", pod_obj({"app": "web"}, "10.1.0.4")),
)

# --- AuthorizationPolicy: attachment and scope ---


@pytest.mark.parametrize(
    ("namespace", "spec", "scope"),
    [
        ("shop", {}, A.Scope.NAMESPACE),
        ("istio-system", {}, A.Scope.GLOBAL),
        ("shop", {"selector": {"matchLabels": {"app": "web"}}}, A.Scope.WORKLOAD_SELECTOR),
        ("istio-system", {"selector": {"matchLabels": {"app": "web"}}}, A.Scope.WORKLOAD_SELECTOR),
        ("shop", {"selector": {"matchLabels": {}}}, A.Scope.NAMESPACE),
    ],
    ids=["namespace", "root-is-global", "selector", "root-selector", "empty-selector"],
)
def test_scope(namespace: str, spec: dict[str, Any], scope: int) -> None:
    policy = convert(spec, namespace)
    assert (policy.name, policy.namespace, policy.scope) == ("p", namespace, scope)


def test_selector_policy_is_listed_by_the_pods_it_selects_in_its_namespace() -> None:
    t = translator_with(
        *PODS,
        (
            "AuthorizationPolicy",
            "shop",
            "web-only",
            policy_obj({"selector": {"matchLabels": {"app": "web"}}}),
        ),
    )
    assert listed(t, "shop", "web-0") == ["shop/web-only"]
    assert listed(t, "shop", "api-0") == []
    assert listed(t, "bank", "web-0") == []


def test_root_namespace_selector_policy_is_listed_in_every_namespace() -> None:
    t = translator_with(
        *PODS,
        (
            "AuthorizationPolicy",
            "istio-system",
            "web-everywhere",
            policy_obj({"selector": {"matchLabels": {"app": "web"}}}),
        ),
    )
    for namespace in ("shop", "bank", "istio-system"):
        assert listed(t, namespace, "web-0") == ["istio-system/web-everywhere"]
    assert listed(t, "shop", "api-0") == []


def test_namespace_policies_are_not_listed_by_workloads() -> None:
    t = translator_with(
        *PODS, ("AuthorizationPolicy", "shop", "ns-wide", policy_obj({"action": "DENY"}))
    )
    assert listed(t, "shop", "web-0") == []
    assert authorization(t, "shop/ns-wide") is not None


@pytest.mark.parametrize(
    "target",
    [
        {"targetRef": {"kind": "Gateway", "name": "waypoint"}},
        {"targetRefs": [{"kind": "Service", "name": "web"}]},
    ],
)
def test_target_ref_policies_are_for_waypoints_only(target: dict[str, Any]) -> None:
    spec = {"selector": {"matchLabels": {"app": "web"}}, "action": "CUSTOM", **target}
    t = translator_with(*PODS, ("AuthorizationPolicy", "shop", "p", policy_obj(spec)))
    assert t.errors() == []
    assert authorization(t, "shop/p") is None
    assert listed(t, "shop", "web-0") == []


@pytest.mark.parametrize(
    ("action", "expected"),
    [(None, A.Action.ALLOW), ("ALLOW", A.Action.ALLOW), ("DENY", A.Action.DENY)],
)
def test_actions(action: str | None, expected: int) -> None:
    spec = {"action": action} if action else {}
    assert convert(spec).action == expected


@pytest.mark.parametrize("action", ["CUSTOM", "AUDIT", "allow"])
def test_unsupported_actions_are_rejected(action: str) -> None:
    t = translator_with(("AuthorizationPolicy", "shop", "p", policy_obj({"action": action})))
    [error] = t.errors()
    assert (error.field, error.kind, error.name) == ("spec.action", "AuthorizationPolicy", "p")
    assert repr(action) in error.message
    assert authorization(t, "shop/p") is None


def test_dry_run_annotation() -> None:
    assert convert({}, annotations={"istio.io/dry-run": "true"}).dry_run is True
    assert convert({}).dry_run is False


# --- AuthorizationPolicy: rule structure and field mapping ---


def test_rule_structure_to_from_when_are_anded_clauses() -> None:
    policy = convert(
        {
            "rules": [
                {
                    "to": [{"operation": {"ports": ["80"]}}, {"operation": {"ports": ["443"]}}],
                    "from": [{"source": {"namespaces": ["a"]}}],
                    "when": [{"key": "source.ip", "values": ["10.0.0.0/8"]}],
                }
            ]
        }
    )
    [rule] = policy.rules
    assert [len(c.matches) for c in rule.clauses] == [2, 1, 1]
    assert [list(m.destination_ports) for m in rule.clauses[0].matches] == [[80], [443]]


def test_empty_rule_matches_everything_and_no_rules_match_nothing() -> None:
    assert list(convert({"rules": [{}]}).rules) == [A.Rule()]
    assert list(convert({}).rules) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            {"principals": ["spiffe://cluster.local/ns/a/sa/b", "cluster.local/ns/c/sa/*"]},
            A.Match(
                principals=[
                    A.StringMatch(exact="cluster.local/ns/a/sa/b"),
                    A.StringMatch(prefix="cluster.local/ns/c/sa/"),
                ]
            ),
        ),
        ({"notPrincipals": ["*"]}, A.Match(not_principals=[PRESENCE])),
        (
            {"namespaces": ["*-prod", "team-*", "exact"]},
            A.Match(
                namespaces=[
                    A.StringMatch(suffix="-prod"),
                    A.StringMatch(prefix="team-"),
                    A.StringMatch(exact="exact"),
                ]
            ),
        ),
        (
            {"notNamespaces": ["kube-system"]},
            A.Match(not_namespaces=[A.StringMatch(exact="kube-system")]),
        ),
        (
            {"serviceAccounts": ["web", "bank/teller"]},
            A.Match(
                service_accounts=[
                    A.ServiceAccountMatch(namespace="shop", serviceAccount="web"),
                    A.ServiceAccountMatch(namespace="bank", serviceAccount="teller"),
                ]
            ),
        ),
        (
            {"notServiceAccounts": ["web"]},
            A.Match(
                not_service_accounts=[A.ServiceAccountMatch(namespace="shop", serviceAccount="web")]
            ),
        ),
        (
            {"ipBlocks": ["10.0.0.0/8", "192.168.1.7", "fd00::/64"]},
            A.Match(
                source_ips=[
                    A.Address(address=bytes([10, 0, 0, 0]), length=8),
                    A.Address(address=bytes([192, 168, 1, 7]), length=32),
                    A.Address(address=bytes.fromhex("fd00" + "00" * 14), length=64),
                ]
            ),
        ),
        (
            {"notIpBlocks": ["10.1.2.3/16"]},
            A.Match(not_source_ips=[A.Address(address=bytes([10, 1, 0, 0]), length=16)]),
        ),
    ],
    ids=[
        "principals",
        "not-principals",
        "namespaces",
        "not-namespaces",
        "service-accounts",
        "not-service-accounts",
        "ip-blocks",
        "not-ip-blocks",
    ],
)
def test_source_fields(source: dict[str, Any], expected: A.Match) -> None:
    assert only_match(convert({"rules": [{"from": [{"source": source}]}]})) == expected


@pytest.mark.parametrize(
    ("operation", "expected"),
    [
        ({"ports": ["80", 8080]}, A.Match(destination_ports=[80, 8080])),
        ({"notPorts": ["22"]}, A.Match(not_destination_ports=[22])),
    ],
)
def test_operation_ports(operation: dict[str, Any], expected: A.Match) -> None:
    assert only_match(convert({"rules": [{"to": [{"operation": operation}]}]})) == expected


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        (
            {"key": "source.ip", "values": ["10.0.0.1"], "notValues": ["10.0.0.2"]},
            A.Match(
                source_ips=[A.Address(address=bytes([10, 0, 0, 1]), length=32)],
                not_source_ips=[A.Address(address=bytes([10, 0, 0, 2]), length=32)],
            ),
        ),
        (
            {"key": "destination.ip", "values": ["10.0.0.0/24"]},
            A.Match(destination_ips=[A.Address(address=bytes([10, 0, 0, 0]), length=24)]),
        ),
        (
            {"key": "destination.port", "values": ["80"], "notValues": ["81"]},
            A.Match(destination_ports=[80], not_destination_ports=[81]),
        ),
        (
            {"key": "source.namespace", "values": ["a"], "notValues": ["b*"]},
            A.Match(
                namespaces=[A.StringMatch(exact="a")], not_namespaces=[A.StringMatch(prefix="b")]
            ),
        ),
        (
            {"key": "source.principal", "values": ["spiffe://td/ns/a/sa/b"]},
            A.Match(principals=[A.StringMatch(exact="td/ns/a/sa/b")]),
        ),
    ],
    ids=["source.ip", "destination.ip", "destination.port", "source.namespace", "source.principal"],
)
def test_when_conditions(condition: dict[str, Any], expected: A.Match) -> None:
    assert only_match(convert({"rules": [{"when": [condition]}]})) == expected


# --- AuthorizationPolicy: HTTP attributes ---


def test_allow_rule_with_http_attributes_is_dropped_with_a_warning() -> None:
    t = translator_with(
        (
            "AuthorizationPolicy",
            "shop",
            "p",
            policy_obj(
                {
                    "rules": [
                        {"to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}]},
                        {"from": [{"source": {"namespaces": ["a"]}}]},
                        {"when": [{"key": "request.headers[x-user]", "values": ["me"]}]},
                    ]
                }
            ),
        )
    )
    policy = authorization(t, "shop/p")
    assert policy is not None and len(policy.rules) == 1  # only the L4 rule remains
    [warning] = t.warnings()
    assert (warning.name, warning.field) == ("p", "spec.rules")
    assert (
        "methods, request.headers[x-user]" in warning.message
        and "more restrictive" in warning.message
    )


def test_deny_rule_keeps_its_l4_part_without_the_http_part() -> None:
    t = translator_with(
        (
            "AuthorizationPolicy",
            "shop",
            "p",
            policy_obj(
                {
                    "action": "DENY",
                    "rules": [
                        {
                            "from": [{"source": {"namespaces": ["a"], "requestPrincipals": ["*"]}}],
                            "to": [{"operation": {"paths": ["/admin"]}}],
                        },
                    ],
                }
            ),
        )
    )
    policy = authorization(t, "shop/p")
    assert policy is not None
    # Denies everything from namespace "a": the path condition is invisible at L4.
    assert list(policy.rules) == [
        A.Rule(clauses=[A.Clause(matches=[A.Match(namespaces=[A.StringMatch(exact="a")])])])
    ]
    [warning] = t.warnings()
    assert (
        "paths, requestPrincipals" in warning.message
        and "enforced without the HTTP rules" in warning.message
    )


def test_deny_operation_left_without_l4_condition_matches_any_operation() -> None:
    policy = convert(
        {
            "action": "DENY",
            "rules": [
                {
                    "from": [{"source": {"namespaces": ["a"]}}],
                    "to": [
                        {"operation": {"ports": ["80"]}},
                        {"operation": {"methods": ["DELETE"]}},
                    ],
                },
            ],
        }
    )
    [rule] = policy.rules
    assert [list(c.matches) for c in rule.clauses] == [
        [A.Match(namespaces=[A.StringMatch(exact="a")])]
    ]


def test_deny_rule_with_only_http_attributes_is_dropped_not_deny_all() -> None:
    t = translator_with(
        (
            "AuthorizationPolicy",
            "shop",
            "p",
            policy_obj(
                {
                    "action": "DENY",
                    "rules": [
                        {"to": [{"operation": {"methods": ["DELETE"]}}]},
                    ],
                }
            ),
        )
    )
    policy = authorization(t, "shop/p")
    assert policy is not None and list(policy.rules) == []
    [warning] = t.warnings()
    assert "will have no effect" in warning.message


# --- AuthorizationPolicy: rejected ---


@pytest.mark.parametrize(
    ("rules", "field"),
    [
        (
            [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}],
            "spec.rules[0].from[0].source.ipBlocks[0]",
        ),
        (
            [{}, {"from": [{"source": {"notIpBlocks": ["1.2.3.4", "nope"]}}]}],
            "spec.rules[1].from[0].source.notIpBlocks[1]",
        ),
        (
            [{"when": [{"key": "destination.ip", "values": ["300.0.0.1"]}]}],
            "spec.rules[0].when[0].values[0]",
        ),
        ([{"to": [{"operation": {"ports": ["http"]}}]}], "spec.rules[0].to[0].operation.ports[0]"),
        ([{"to": [{"operation": {"port": ["80"]}}]}], "spec.rules[0].to[0].operation.port"),
        ([{"from": [{"source": {}}]}], "spec.rules[0].from[0].source"),
        (
            [{"from": [{"source": {"serviceAccounts": ["ns/"]}}]}],
            "spec.rules[0].from[0].source.serviceAccounts[0]",
        ),
        ([{"when": [{"key": "source.ip"}]}], "spec.rules[0].when[0]"),
    ],
    ids=[
        "bad-cidr",
        "bad-ip",
        "bad-when-ip",
        "named-port",
        "unknown-field",
        "empty-source",
        "bad-sa",
        "when-no-values",
    ],
)
def test_invalid_policy_fields_are_rejected_naming_the_path(rules: list[Any], field: str) -> None:
    t = translator_with(("AuthorizationPolicy", "shop", "p", policy_obj({"rules": rules})))
    [error] = t.errors()
    assert error.field == field
    assert authorization(t, "shop/p") is None


def test_unknown_field_error_suggests_the_right_name() -> None:
    t = translator_with(
        (
            "AuthorizationPolicy",
            "shop",
            "p",
            policy_obj({"rules": [{"from": [{"source": {"principal": ["x"]}}]}]}),
        )
    )
    [error] = t.errors()
    assert "did you mean 'principals'" in error.message


# --- PeerAuthentication ---


def test_mesh_wide_strict_lists_the_static_policy_on_every_workload() -> None:
    t = translator_with(
        *PODS, ("PeerAuthentication", "istio-system", "default", peer_obj("STRICT"))
    )
    static = authorization(t, STATIC)
    assert static is not None
    assert (static.scope, static.action) == (A.Scope.WORKLOAD_SELECTOR, A.Action.DENY)
    assert only_match(static) == A.Match(not_principals=[PRESENCE])
    for namespace, pod in (
        ("shop", "web-0"),
        ("shop", "api-0"),
        ("bank", "web-0"),
        ("istio-system", "web-0"),
    ):
        assert listed(t, namespace, pod) == [STATIC]


@pytest.mark.parametrize(
    ("peer_authentications", "expected"),
    [
        (
            [("istio-system", "mesh", peer_obj("STRICT")), ("shop", "ns", peer_obj("PERMISSIVE"))],
            {("shop", "web-0"): [], ("shop", "api-0"): [], ("bank", "web-0"): [STATIC]},
        ),
        (
            [("istio-system", "mesh", peer_obj("STRICT")), ("shop", "ns", peer_obj("UNSET"))],
            {("shop", "web-0"): [STATIC], ("shop", "api-0"): [STATIC], ("bank", "web-0"): [STATIC]},
        ),
        (
            [
                ("shop", "ns", peer_obj("PERMISSIVE")),
                ("shop", "web", peer_obj("STRICT", selector={"app": "web"})),
            ],
            {("shop", "web-0"): [STATIC], ("shop", "api-0"): [], ("bank", "web-0"): []},
        ),
        (
            [
                ("istio-system", "mesh", peer_obj("STRICT")),
                ("shop", "web", peer_obj("PERMISSIVE", selector={"app": "web"})),
            ],
            {("shop", "web-0"): [], ("shop", "api-0"): [STATIC], ("bank", "web-0"): [STATIC]},
        ),
        (
            [("istio-system", "mesh", peer_obj("PERMISSIVE"))],
            {("shop", "web-0"): [], ("shop", "api-0"): [], ("bank", "web-0"): []},
        ),
        (
            [
                ("istio-system", "older", peer_obj("STRICT", created="2026-01-01T00:00:00Z")),
                ("istio-system", "newer", peer_obj("PERMISSIVE", created="2026-02-01T00:00:00Z")),
            ],
            {("shop", "web-0"): [STATIC], ("shop", "api-0"): [STATIC], ("bank", "web-0"): [STATIC]},
        ),
        (
            [("istio-system", "web", peer_obj("STRICT", selector={"app": "web"}))],
            {("shop", "web-0"): [], ("shop", "api-0"): [], ("bank", "web-0"): []},
        ),
    ],
    ids=[
        "namespace-overrides-mesh",
        "unset-inherits",
        "workload-overrides-namespace",
        "workload-permissive",
        "permissive-only",
        "oldest-wins",
        "root-selector-ignored",
    ],
)
def test_effective_mode_decides_who_lists_the_static_policy(
    peer_authentications: list[tuple[str, str, dict[str, Any]]],
    expected: dict[tuple[str, str], list[str]],
) -> None:
    t = translator_with(
        *PODS, *(("PeerAuthentication", ns, name, obj) for ns, name, obj in peer_authentications)
    )
    assert authorization(t, STATIC) is not None  # sent whenever any PeerAuthentication exists
    assert {key: listed(t, *key) for key in expected} == expected


def test_static_policy_goes_with_the_last_peer_authentication() -> None:
    t = translator_with(("PeerAuthentication", "shop", "ns", peer_obj("PERMISSIVE")))
    delta = t.apply(ObjectEvent("PeerAuthentication", "delete", "shop", "ns", None))
    assert delta[AUTHORIZATION_TYPE_URL].removals == {STATIC}


@pytest.mark.parametrize(("mode", "ports"), [("DISABLE", None), ("STRICT", {8080: "DISABLE"})])
def test_disable_is_rejected(mode: str, ports: dict[int, str] | None) -> None:
    t = translator_with(
        ("PeerAuthentication", "shop", "pa", peer_obj(mode, selector={"app": "web"}, ports=ports))
    )
    [error] = t.errors()
    assert "not supported in ambient" in error.message
    assert error.field in ("spec.mtls.mode", "spec.portLevelMtls[8080].mode")


def test_port_level_modes_need_a_selector() -> None:
    t = translator_with(
        ("PeerAuthentication", "shop", "pa", peer_obj("STRICT", ports={8080: "PERMISSIVE"}))
    )
    [error] = t.errors()
    assert error.field == "spec.portLevelMtls"


CONVERTED = "shop/converted_peer_authentication_web"


def no_identity(**fields: Any) -> A.Clause:
    return A.Clause(matches=[A.Match(not_principals=[PRESENCE], **fields)])


@pytest.mark.parametrize(
    ("mesh_mode", "mode", "ports", "rules", "web_lists"),
    [
        # STRICT workload exempting 8080: deny plaintext unless it is for port 8080.
        (
            None,
            "STRICT",
            {8080: "PERMISSIVE"},
            [
                A.Rule(
                    clauses=[
                        no_identity(),
                        A.Clause(matches=[A.Match(not_destination_ports=[8080])]),
                    ]
                )
            ],
            [CONVERTED],
        ),
        # PERMISSIVE workload with a STRICT port: deny plaintext to that port only.
        (
            None,
            "PERMISSIVE",
            {"9090": "STRICT"},
            [A.Rule(clauses=[no_identity(destination_ports=[9090])])],
            [CONVERTED],
        ),
        # UNSET under a STRICT mesh, exempting a port: the inherited STRICT is merged in.
        (
            "STRICT",
            None,
            {8080: "PERMISSIVE"},
            [
                A.Rule(
                    clauses=[
                        A.Clause(matches=[A.Match(not_destination_ports=[8080])]),
                        no_identity(),
                    ]
                )
            ],
            [CONVERTED],
        ),
        # UNSET without STRICT above it: only the STRICT port is enforced.
        (
            None,
            None,
            {9090: "STRICT", 8080: "PERMISSIVE"},
            [A.Rule(clauses=[no_identity(destination_ports=[9090])])],
            [CONVERTED],
        ),
        # STRICT everywhere: the static policy is enough.
        (None, "STRICT", {9090: "STRICT"}, None, [STATIC]),
    ],
    ids=[
        "strict-exempt-port",
        "permissive-strict-port",
        "inherited-strict-exempt-port",
        "unset-strict-port",
        "all-strict",
    ],
)
def test_port_level_mtls_becomes_a_converted_policy(
    mesh_mode: str | None,
    mode: str | None,
    ports: dict[Any, str],
    rules: list[A.Rule] | None,
    web_lists: list[str],
) -> None:
    objects = [
        *PODS,
        ("PeerAuthentication", "shop", "web", peer_obj(mode, selector={"app": "web"}, ports=ports)),
    ]
    if mesh_mode is not None:
        objects.append(("PeerAuthentication", "istio-system", "mesh", peer_obj(mesh_mode)))
    t = translator_with(*objects)
    assert t.errors() == []
    converted = authorization(t, CONVERTED)
    if rules is None:
        assert converted is None
    else:
        assert converted is not None
        assert (converted.scope, converted.action) == (A.Scope.WORKLOAD_SELECTOR, A.Action.DENY)
        assert list(converted.rules) == rules
    assert listed(t, "shop", "web-0") == web_lists
