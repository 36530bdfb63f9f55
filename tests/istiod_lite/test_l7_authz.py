"""AuthorizationPolicy with targetRefs -> RBAC filters on waypoint listeners: where policies
attach, the filter order, the matcher for each field, and invalid input."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format

from istiod_lite.model import Translator
from istiod_lite.sources.base import ObjectEvent
from meshcore.xds.types import AUTHORIZATION_TYPE_URL, LISTENER_TYPE_URL

NS = "shop"
WEB = "web.shop.svc.cluster.local:80"
API = "api.shop.svc.cluster.local:8080"
TO_WEB = {"group": "", "kind": "Service", "name": "web"}
TO_WAYPOINT = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}


def upsert(kind: str, namespace: str, name: str, obj: Any) -> ObjectEvent:
    return ObjectEvent(kind, "upsert", namespace, name, obj)


def mesh(*objects: tuple[str, str, str, Any]) -> Translator:
    t = Translator()
    for event in (
        upsert(
            "Namespace", "", NS, {"metadata": {"labels": {"istio.io/use-waypoint": "waypoint"}}}
        ),
        upsert("Gateway", NS, "waypoint", {"spec": {"gatewayClassName": "istio-waypoint"}}),
        upsert("Service", NS, "web", {"spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}),
        upsert(
            "Service", NS, "api", {"spec": {"clusterIP": "10.96.0.2", "ports": [{"port": 8080}]}}
        ),
        *(upsert(*o) for o in objects),
    ):
        t.apply(event)
    return t


def policy(
    name: str, spec: dict[str, Any], *, namespace: str = NS, **annotations: str
) -> tuple[str, str, str, Any]:
    return (
        "AuthorizationPolicy",
        namespace,
        name,
        {"metadata": {"annotations": annotations}, "spec": spec},
    )


def http_filters(t: Translator, listener: str = WEB) -> list[tuple[str, Any]]:
    """(filter name, decoded RBAC config or None) in order."""
    (chain,) = t.resources()[LISTENER_TYPE_URL][listener].filter_chains
    (network_filter,) = chain.filters
    manager = hcm_pb2.HttpConnectionManager()
    assert network_filter.typed_config.Unpack(manager)
    result = []
    for http_filter in manager.http_filters:
        config = None
        if http_filter.name == "envoy.filters.http.rbac":
            config = rbac_pb2.RBAC()
            assert http_filter.typed_config.Unpack(config)
        result.append((http_filter.name, config))
    return result


def rbac_policies(t: Translator, listener: str = WEB) -> dict[str, tuple[str, dict[str, Any]]]:
    """RBAC policy name -> (action, policy as a dict), across the listener's RBAC filters."""
    return {
        name: (
            rbac_config_pb2.RBAC.Action.Name(config.rules.action),
            json_format.MessageToDict(rule),
        )
        for _, config in http_filters(t, listener)
        if config is not None
        for name, rule in config.rules.policies.items()
    }


def test_without_policies_a_listener_has_fault_then_router() -> None:
    assert [name for name, _ in http_filters(mesh())] == [
        "envoy.filters.http.fault",
        "envoy.filters.http.router",
    ]


def test_deny_filter_comes_before_allow_and_each_holds_its_policies() -> None:
    t = mesh(
        policy(
            "allow-get",
            {"targetRefs": [TO_WEB], "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]},
        ),
        policy(
            "deny-admin",
            {
                "targetRefs": [TO_WAYPOINT],
                "action": "DENY",
                "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
            },
        ),
    )
    filters = http_filters(t)
    assert [name for name, _ in filters] == [
        "envoy.filters.http.rbac",
        "envoy.filters.http.rbac",
        "envoy.filters.http.fault",
        "envoy.filters.http.router",
    ]
    deny, allow = filters[0][1], filters[1][1]
    assert deny.rules.action == 1 and list(deny.rules.policies) == [
        "ns[shop]-policy[deny-admin]-rule[0]"
    ]
    assert allow.rules.action == 0 and list(allow.rules.policies) == [
        "ns[shop]-policy[allow-get]-rule[0]"
    ]
    # The Gateway target covers every service of the waypoint; the Service target only web.
    assert list(rbac_policies(t, API)) == ["ns[shop]-policy[deny-admin]-rule[0]"]
    # Waypoint policies are not sent to ztunnels.
    assert t.resources()[AUTHORIZATION_TYPE_URL] == {}


def test_a_root_namespace_policy_on_the_waypoint_gateway_class_covers_every_waypoint() -> None:
    target = {
        "group": "gateway.networking.k8s.io",
        "kind": "GatewayClass",
        "name": "istio-waypoint",
    }
    t = mesh(
        policy(
            "mesh-deny",
            {"targetRefs": [target], "action": "DENY", "rules": [{}]},
            namespace="istio-system",
        )
    )
    assert "ns[istio-system]-policy[mesh-deny]-rule[0]" in rbac_policies(t, API)


def test_an_allow_policy_without_rules_allows_nothing() -> None:
    (rbac_filter, *_) = http_filters(mesh(policy("nothing", {"targetRefs": [TO_WEB]})))
    assert rbac_filter[1].HasField("rules") and not rbac_filter[1].rules.policies


def test_dry_run_policies_are_shadow_rules_only() -> None:
    t = mesh(policy("try", {"targetRefs": [TO_WEB], "rules": [{}]}, **{"istio.io/dry-run": "true"}))
    (_, config) = http_filters(t)[0]
    assert not config.HasField("rules")
    assert list(config.shadow_rules.policies) == ["ns[shop]-policy[try]-rule[0]"]
    assert config.shadow_rules_stat_prefix == "istio_dry_run_allow_"


def test_custom_and_audit_policies_are_accepted_with_a_warning_and_no_effect() -> None:
    t = mesh(
        policy(
            "ext",
            {
                "targetRefs": [TO_WEB],
                "action": "CUSTOM",
                "provider": {"name": "oauth"},
                "rules": [{}],
            },
        )
    )
    assert t.errors() == []
    (warning,) = t.warnings()
    assert warning.field == "spec.action" and "no effect" in warning.message
    assert [name for name, _ in http_filters(t)] == [
        "envoy.filters.http.fault",
        "envoy.filters.http.router",
    ]


# --- Field mapping table (Istio's authz model) ---

ANY_PRINCIPAL = {"andIds": {"ids": [{"any": True}]}}
ANY_PERMISSION = {"andRules": {"rules": [{"any": True}]}}


def authenticated(matcher: dict[str, Any]) -> dict[str, Any]:
    return {"authenticated": {"principalName": matcher}}


def either(*ids: dict[str, Any]) -> dict[str, Any]:
    return {"orIds": {"ids": list(ids)}}


def any_rule(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"orRules": {"rules": list(rules)}}


RULE_CASES = [
    pytest.param(
        {},
        {"permissions": [ANY_PERMISSION], "principals": [ANY_PRINCIPAL]},
        id="empty-rule-matches-everything",
    ),
    pytest.param(
        {
            "from": [
                {
                    "source": {
                        "principals": [
                            "cluster.local/ns/shop/sa/front",
                            "spiffe://cluster.local/ns/x/*",
                            "*/sa/admin",
                            "*",
                        ]
                    }
                }
            ]
        },
        {
            "permissions": [ANY_PERMISSION],
            "principals": [
                {
                    "andIds": {
                        "ids": [
                            either(
                                authenticated({"exact": "spiffe://cluster.local/ns/shop/sa/front"}),
                                authenticated({"prefix": "spiffe://cluster.local/ns/x/"}),
                                authenticated({"safeRegex": {"regex": "spiffe://.*/sa/admin"}}),
                                authenticated({"safeRegex": {"regex": ".+"}}),
                            )
                        ]
                    }
                }
            ],
        },
        id="principals",
    ),
    pytest.param(
        {
            "from": [
                {"source": {"namespaces": ["shop"], "notNamespaces": ["test-*"]}},
                {"source": {"serviceAccounts": ["front", "ops/admin"]}},
            ]
        },
        {
            "permissions": [ANY_PERMISSION],
            "principals": [
                {
                    "andIds": {
                        "ids": [
                            either(authenticated({"safeRegex": {"regex": ".*/ns/shop/.*"}})),
                            {
                                "notId": either(
                                    authenticated({"safeRegex": {"regex": ".*/ns/test\\-.*/.*"}})
                                )
                            },
                        ]
                    }
                },
                {
                    "andIds": {
                        "ids": [
                            either(
                                authenticated(
                                    {
                                        "safeRegex": {
                                            "regex": "spiffe://.+/ns/shop/(.+/|)sa/front(/.+)?"
                                        }
                                    }
                                ),
                                authenticated(
                                    {
                                        "safeRegex": {
                                            "regex": "spiffe://.+/ns/ops/(.+/|)sa/admin(/.+)?"
                                        }
                                    }
                                ),
                            )
                        ]
                    }
                },
            ],
        },
        id="namespaces-and-service-accounts-sources-are-ored",
    ),
    pytest.param(
        {
            "to": [
                {
                    "operation": {
                        "hosts": ["web.shop.svc.cluster.local", "*.example.com"],
                        "methods": ["GET", "HEAD"],
                        "notPaths": ["/private*"],
                        "ports": ["80"],
                    }
                }
            ]
        },
        {
            "permissions": [
                {
                    "andRules": {
                        "rules": [
                            any_rule(
                                {
                                    "header": {
                                        "name": ":authority",
                                        "stringMatch": {
                                            "exact": "web.shop.svc.cluster.local",
                                            "ignoreCase": True,
                                        },
                                    }
                                },
                                {
                                    "header": {
                                        "name": ":authority",
                                        "stringMatch": {
                                            "suffix": ".example.com",
                                            "ignoreCase": True,
                                        },
                                    }
                                },
                            ),
                            any_rule(
                                {"header": {"name": ":method", "stringMatch": {"exact": "GET"}}},
                                {"header": {"name": ":method", "stringMatch": {"exact": "HEAD"}}},
                            ),
                            {"notRule": any_rule({"urlPath": {"path": {"prefix": "/private"}}})},
                            any_rule({"destinationPort": 80}),
                        ]
                    }
                }
            ],
            "principals": [ANY_PRINCIPAL],
        },
        id="operation-fields-are-anded",
    ),
    pytest.param(
        {
            "to": [{"operation": {"paths": ["/api/*"]}}],
            "when": [
                {"key": "request.headers[x-tenant]", "values": ["a", "*"]},
                {"key": "source.namespace", "notValues": ["blocked"]},
                {"key": "destination.port", "values": ["80"]},
            ],
        },
        {
            "permissions": [
                {
                    "andRules": {
                        "rules": [
                            any_rule({"urlPath": {"path": {"prefix": "/api/"}}}),
                            any_rule({"destinationPort": 80}),
                        ]
                    }
                }
            ],
            "principals": [
                {
                    "andIds": {
                        "ids": [
                            either(
                                {"header": {"name": "x-tenant", "stringMatch": {"exact": "a"}}},
                                {"header": {"name": "x-tenant", "presentMatch": True}},
                            ),
                            {
                                "notId": either(
                                    authenticated({"safeRegex": {"regex": ".*/ns/blocked/.*"}})
                                )
                            },
                        ]
                    }
                }
            ],
        },
        id="when-conditions-join-both-sides",
    ),
]


@pytest.mark.parametrize(("rule", "expected"), RULE_CASES)
def test_rule_mapping(rule: dict[str, Any], expected: dict[str, Any]) -> None:
    t = mesh(policy("p", {"targetRefs": [TO_WEB], "rules": [rule]}))
    assert t.errors() == []
    assert rbac_policies(t) == {"ns[shop]-policy[p]-rule[0]": ("ALLOW", expected)}


def test_a_policy_change_updates_only_the_listeners_it_targets() -> None:
    t = mesh(policy("p", {"targetRefs": [TO_WEB], "rules": [{}]}))
    delta = t.apply(upsert(*policy("p", {"targetRefs": [TO_WEB], "action": "DENY", "rules": [{}]})))
    assert set(delta) == {LISTENER_TYPE_URL}
    assert set(delta[LISTENER_TYPE_URL].upserts) == {WEB}
    assert rbac_policies(t)["ns[shop]-policy[p]-rule[0]"][0] == "DENY"


INVALID_POLICIES = [
    pytest.param(
        {"targetRefs": [{"kind": "ServiceEntry", "group": "networking.istio.io", "name": "x"}]},
        "spec.targetRefs[0].kind",
        "cannot be targeted",
        id="target-kind",
    ),
    pytest.param(
        {"targetRefs": [{**TO_WEB, "namespace": "other"}]},
        "spec.targetRefs[0].namespace",
        "own namespace",
        id="target-namespace",
    ),
    pytest.param(
        {"targetRefs": [TO_WEB], "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8"]}}]}]},
        "spec.rules[0].from[0].source.ipBlocks",
        "not supported by waypoints",
        id="ip-blocks",
    ),
    pytest.param(
        {
            "targetRefs": [TO_WEB],
            "rules": [{"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}],
        },
        "spec.rules[0].when[0].key",
        "not supported by waypoints",
        id="when-key",
    ),
    pytest.param(
        {"targetRefs": [TO_WEB], "rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
        "spec.rules[0].to[0].operation.ports[0]",
        "not a port number",
        id="port",
    ),
    pytest.param(
        {"targetRefs": [TO_WEB], "rules": [{"to": [{"operation": {"paths": ["/users/{*}"]}}]}]},
        "spec.rules[0].to[0].operation.paths[0]",
        "path templates",
        id="path-template",
    ),
    pytest.param(
        {"targetRefs": [TO_WEB], "action": "allow"}, "spec.action", "not one of", id="action"
    ),
]


@pytest.mark.parametrize(("spec", "field", "message"), INVALID_POLICIES)
def test_invalid_waypoint_policies_are_rejected(
    spec: dict[str, Any], field: str, message: str
) -> None:
    t = mesh(policy("p", {"targetRefs": [TO_WEB], "action": "DENY", "rules": [{}]}))
    t.apply(upsert(*policy("p", spec)))
    (error,) = t.errors()
    assert (error.kind, error.name, error.field) == ("AuthorizationPolicy", "p", field)
    assert message in error.message
    assert rbac_policies(t)["ns[shop]-policy[p]-rule[0]"][0] == "DENY"  # the last good version
