"""VirtualService and HTTPRoute -> the RouteConfiguration a waypoint serves for a service port:
tables of mappings, precedence, defaults, and invalid input rejected by object and field."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format

from istiod_lite.model import Translator
from istiod_lite.sources.base import ObjectEvent
from meshcore.xds.types import ROUTE_TYPE_URL

NS = "shop"
HOST = "web.shop.svc.cluster.local"
SUBSETS = {
    "spec": {
        "host": "web",
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    }
}


def upsert(kind: str, namespace: str, name: str, obj: Any) -> ObjectEvent:
    return ObjectEvent(kind, "upsert", namespace, name, obj)


def service(ports: list[int], **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"labels": labels},
        "spec": {
            "selector": {"app": "web"},
            "clusterIP": "10.96.0.1",
            "ports": [{"name": f"http-{p}", "port": p} for p in ports],
        },
    }


def mesh(*objects: tuple[str, str, str, Any], ports: tuple[int, ...] = (80,)) -> Translator:
    """A namespace using waypoint `shop/waypoint`, services web (ports) and api, then objects."""
    t = Translator()
    for event in (
        upsert(
            "Namespace", "", NS, {"metadata": {"labels": {"istio.io/use-waypoint": "waypoint"}}}
        ),
        upsert("Waypoint", NS, "waypoint", {"spec": {}}),
        upsert("Service", NS, "web", service(list(ports))),
        upsert(
            "Service", NS, "api", {"spec": {"clusterIP": "10.96.0.2", "ports": [{"port": 8080}]}}
        ),
        upsert("DestinationRule", NS, "web", SUBSETS),
        *(upsert(*o) for o in objects),
    ):
        t.apply(event)
    return t


def routes(t: Translator, port: int = 80, host: str = HOST) -> list[dict[str, Any]]:
    config = t.resources()[ROUTE_TYPE_URL][f"{host}:{port}"]
    (virtual_host,) = config.virtual_hosts
    assert list(virtual_host.domains) == ["*"]
    return [json_format.MessageToDict(r) for r in virtual_host.routes]


def virtual_service(
    *http: dict[str, Any], hosts: list[str] | None = None
) -> tuple[str, str, str, Any]:
    return ("VirtualService", NS, "vs", {"spec": {"hosts": hosts or ["web"], "http": list(http)}})


def to(subset: str = "", **extra: Any) -> dict[str, Any]:
    destination: dict[str, Any] = {"host": "web"}
    if subset:
        destination["subset"] = subset
    return {"destination": destination, **extra}


CLUSTER = f"outbound|80||{HOST}"
V1 = f"outbound|80|v1|{HOST}"
V2 = f"outbound|80|v2|{HOST}"


def action(cluster: str = CLUSTER, **extra: Any) -> dict[str, Any]:
    return {"cluster": cluster, "timeout": "0s", **extra}


# --- Defaults ---


def test_a_service_without_routes_gets_one_default_route_to_its_own_cluster() -> None:
    assert routes(mesh()) == [{"name": "default", "match": {"prefix": "/"}, "route": action()}]


def test_every_service_port_gets_its_own_route_configuration() -> None:
    t = mesh(ports=(80, 9090))
    assert routes(t, 9090)[0]["route"]["cluster"] == f"outbound|9090||{HOST}"


# --- VirtualService mapping table ---

VIRTUAL_SERVICE_CASES = [
    pytest.param(
        {"match": [{"uri": {"exact": "/a"}}, {"uri": {"prefix": "/b"}}], "route": [to()]},
        [
            {"match": {"path": "/a"}, "route": action()},
            {"match": {"prefix": "/b"}, "route": action()},
        ],
        id="each-match-alternative-is-a-route",
    ),
    pytest.param(
        {"match": [{"uri": {"regex": "/v[0-9]+/.*"}, "ignoreUriCase": True}], "route": [to()]},
        [
            {
                "match": {"safeRegex": {"regex": "/v[0-9]+/.*"}, "caseSensitive": False},
                "route": action(),
            }
        ],
        id="uri-regex-ignore-case",
    ),
    pytest.param(
        {
            "match": [
                {
                    "headers": {"End-User": {"exact": "jason"}, "x-canary": {}},
                    "withoutHeaders": {"x-debug": {"prefix": "1"}},
                    "method": {"exact": "GET"},
                    "queryParams": {"q": {"regex": "a.*"}, "flag": {}},
                }
            ],
            "route": [to("v2")],
        },
        [
            {
                "match": {
                    "prefix": "/",
                    "headers": [
                        {"name": ":method", "stringMatch": {"exact": "GET"}},
                        {"name": "end-user", "stringMatch": {"exact": "jason"}},
                        {"name": "x-canary", "presentMatch": True},
                        {"name": "x-debug", "stringMatch": {"prefix": "1"}, "invertMatch": True},
                    ],
                    "queryParameters": [
                        {"name": "q", "stringMatch": {"safeRegex": {"regex": "a.*"}}},
                        {"name": "flag", "presentMatch": True},
                    ],
                },
                "route": action(V2),
            }
        ],
        id="headers-method-query",
    ),
    pytest.param(
        {"route": [to("v1", weight=90), to("v2", weight=10)]},
        [
            {
                "match": {"prefix": "/"},
                "route": {
                    "weightedClusters": {
                        "clusters": [{"name": V1, "weight": 90}, {"name": V2, "weight": 10}]
                    },
                    "timeout": "0s",
                },
            }
        ],
        id="weighted-split",
    ),
    pytest.param(
        {
            "route": [to()],
            "timeout": "2.5s",
            "retries": {"attempts": 3, "perTryTimeout": "500ms", "retryOn": "5xx,503,reset"},
        },
        [
            {
                "match": {"prefix": "/"},
                "route": action(
                    timeout="2.500s",
                    retryPolicy={
                        "retryOn": "5xx,reset,retriable-status-codes",
                        "numRetries": 3,
                        "perTryTimeout": "0.500s",
                        "retriableStatusCodes": [503],
                    },
                ),
            }
        ],
        id="timeout-and-retries",
    ),
    pytest.param(
        {"route": [to()], "retries": {"attempts": 2}},
        [
            {
                "match": {"prefix": "/"},
                "route": action(
                    retryPolicy={
                        "retryOn": (
                            "connect-failure,refused-stream,unavailable,cancelled,"
                            "retriable-status-codes"
                        ),
                        "numRetries": 2,
                        "retriableStatusCodes": [503],
                    }
                ),
            }
        ],
        id="retries-default-conditions",
    ),
    pytest.param(
        {"route": [to()], "retries": {"attempts": 0}},
        [{"match": {"prefix": "/"}, "route": action()}],
        id="zero-attempts-disable-retries",
    ),
    pytest.param(
        {
            "match": [{"uri": {"prefix": "/old"}}],
            "route": [to()],
            "rewrite": {"uri": "/new", "authority": "web.internal"},
        },
        [
            {
                "match": {"prefix": "/old"},
                "route": action(prefixRewrite="/new", hostRewriteLiteral="web.internal"),
            }
        ],
        id="rewrite-prefix-and-authority",
    ),
    pytest.param(
        {
            "route": [to()],
            "rewrite": {"uriRegexRewrite": {"match": "^/v1/(.*)$", "rewrite": "/\\1"}},
        },
        [
            {
                "match": {"prefix": "/"},
                "route": action(
                    regexRewrite={"pattern": {"regex": "^/v1/(.*)$"}, "substitution": "/\\1"}
                ),
            }
        ],
        id="rewrite-regex",
    ),
    pytest.param(
        {
            "route": [to(headers={"request": {"set": {"x-backend": "web"}}})],
            "headers": {
                "request": {"set": {"x-a": "1"}, "add": {"x-b": "2"}, "remove": ["x-c"]},
                "response": {"set": {"x-d": "4"}, "remove": ["server"]},
            },
        },
        [
            {
                "match": {"prefix": "/"},
                "route": {
                    "weightedClusters": {
                        "clusters": [
                            {
                                "name": CLUSTER,
                                "weight": 100,
                                "requestHeadersToAdd": [
                                    {
                                        "header": {"key": "x-backend", "value": "web"},
                                        "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD",
                                    }
                                ],
                            }
                        ]
                    },
                    "timeout": "0s",
                },
                "requestHeadersToAdd": [
                    {
                        "header": {"key": "x-a", "value": "1"},
                        "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD",
                    },
                    {"header": {"key": "x-b", "value": "2"}},
                ],
                "requestHeadersToRemove": ["x-c"],
                "responseHeadersToAdd": [
                    {
                        "header": {"key": "x-d", "value": "4"},
                        "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
                "responseHeadersToRemove": ["server"],
            }
        ],
        id="header-manipulation",
    ),
    pytest.param(
        {"name": "checkout", "match": [{"port": 9090}], "route": [to()]},
        [{"name": "default", "match": {"prefix": "/"}, "route": action()}],
        id="match-on-another-port-leaves-the-default",
    ),
    pytest.param(
        {"match": [{"gateways": ["ingress"]}], "route": [to("v2")]},
        [{"name": "default", "match": {"prefix": "/"}, "route": action()}],
        id="gateway-only-match-does-not-apply-to-waypoints",
    ),
    pytest.param(
        {"route": [{"destination": {"host": "api", "port": {"number": 8080}}}]},
        [{"match": {"prefix": "/"}, "route": action("outbound|8080||api.shop.svc.cluster.local")}],
        id="other-service-destination",
    ),
    pytest.param(
        {"route": [{"destination": {"host": "api"}}]},
        [{"match": {"prefix": "/"}, "route": action("outbound|8080||api.shop.svc.cluster.local")}],
        id="destination-port-from-its-single-port",
    ),
]


@pytest.mark.parametrize(("http", "expected"), VIRTUAL_SERVICE_CASES)
def test_virtual_service_routes(http: dict[str, Any], expected: list[dict[str, Any]]) -> None:
    t = mesh(virtual_service(http))
    assert t.errors() == []
    for route in (found := routes(t)):
        if route.get("name") != "default":
            assert route.pop("name") == http.get("name", "shop/vs.http[0]")
    assert found == expected


def test_fault_injection_is_configured_per_route() -> None:
    t = mesh(
        virtual_service(
            {
                "route": [to()],
                "fault": {
                    "delay": {"fixedDelay": "5s", "percentage": {"value": 12.5}},
                    "abort": {"httpStatus": 503},
                },
            }
        )
    )
    (route,) = routes(t)
    assert route["typedPerFilterConfig"] == {
        "envoy.filters.http.fault": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
            "delay": {
                "fixedDelay": "5s",
                "percentage": {"numerator": 125000, "denominator": "MILLION"},
            },
            "abort": {
                "httpStatus": 503,
                "percentage": {"numerator": 1000000, "denominator": "MILLION"},
            },
        }
    }


def test_rules_keep_their_order_and_the_oldest_virtual_service_wins_a_host() -> None:
    older = (
        "VirtualService",
        NS,
        "older",
        {
            "metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {
                "hosts": ["web.shop.svc.cluster.local"],
                "http": [
                    {"match": [{"uri": {"prefix": "/b"}}], "route": [to("v2")]},
                    {"route": [to("v1")]},
                ],
            },
        },
    )
    newer = (
        "VirtualService",
        NS,
        "newer",
        {
            "metadata": {"creationTimestamp": "2026-02-01T00:00:00Z"},
            "spec": {"hosts": ["web"], "http": [{"route": [to("v2")]}]},
        },
    )
    wildcard = (
        "VirtualService",
        NS,
        "wildcard",
        {
            "metadata": {"creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": {"hosts": ["*.shop.svc.cluster.local"], "http": [{"route": [to("v2")]}]},
        },
    )
    t = mesh(newer, wildcard, older)
    assert [(r["match"], r["route"]["cluster"]) for r in routes(t)] == [
        ({"prefix": "/b"}, V2),
        ({"prefix": "/"}, V1),
    ]
    # The wildcard still covers services no exact VirtualService names.
    assert routes(t, 8080, "api.shop.svc.cluster.local")[0]["route"]["cluster"] == V2


def test_a_virtual_service_for_ingress_gateways_only_is_ignored() -> None:
    ingress = (
        "VirtualService",
        NS,
        "ingress",
        {"spec": {"hosts": ["web"], "gateways": ["ingress"], "http": [{"route": [to("v2")]}]}},
    )
    assert routes(mesh(ingress))[0]["name"] == "default"


# --- HTTPRoute ---


def http_route(
    rules: list[dict[str, Any]],
    *,
    name: str = "r",
    created: str = "",
    parent: dict[str, Any] | None = None,
) -> tuple[str, str, str, Any]:
    parent_ref = parent or {"group": "", "kind": "Service", "name": "web"}
    return (
        "HTTPRoute",
        NS,
        name,
        {
            "metadata": {"creationTimestamp": created},
            "spec": {"parentRefs": [parent_ref], "rules": rules},
        },
    )


BACKEND = {"name": "web", "port": 80}


def test_http_route_matches_filters_and_weighted_backends() -> None:
    rule = {
        "matches": [
            {
                "path": {"type": "PathPrefix", "value": "/api/"},
                "headers": [{"name": "X-Version", "value": "2"}],
                "queryParams": [{"type": "RegularExpression", "name": "id", "value": "[0-9]+"}],
                "method": "POST",
            }
        ],
        "filters": [
            {
                "type": "RequestHeaderModifier",
                "requestHeaderModifier": {
                    "set": [{"name": "X-A", "value": "1"}],
                    "remove": ["x-b"],
                },
            },
            {
                "type": "URLRewrite",
                "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}},
            },
        ],
        "backendRefs": [BACKEND, {"name": "api", "port": 8080, "weight": 3}],
        "timeouts": {"request": "10s"},
    }
    t = mesh(http_route([rule]))
    assert t.errors() == []
    expected_match = {
        "headers": [
            {"name": ":method", "stringMatch": {"exact": "POST"}},
            {"name": "x-version", "stringMatch": {"exact": "2"}},
        ],
        "queryParameters": [{"name": "id", "stringMatch": {"safeRegex": {"regex": "[0-9]+"}}}],
    }
    common = {
        "name": "shop/r.rules[0]",
        "requestHeadersToAdd": [
            {"header": {"key": "x-a", "value": "1"}, "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD"}
        ],
        "requestHeadersToRemove": ["x-b"],
    }
    clusters = {
        "clusters": [
            {"name": CLUSTER, "weight": 1},
            {"name": "outbound|8080||api.shop.svc.cluster.local", "weight": 3},
        ]
    }
    # A PathPrefix matches whole segments: /api and /api/..., never /apix.
    assert routes(t) == [
        {
            **common,
            "match": {"path": "/api", **expected_match},
            "route": {"weightedClusters": clusters, "timeout": "10s", "prefixRewrite": "/v2"},
        },
        {
            **common,
            "match": {"prefix": "/api/", **expected_match},
            "route": {"weightedClusters": clusters, "timeout": "10s", "prefixRewrite": "/v2/"},
        },
    ]


def test_http_route_rules_are_ordered_by_gateway_api_precedence() -> None:
    catch_all = {"backendRefs": [BACKEND]}
    short_prefix = {
        "matches": [{"path": {"type": "PathPrefix", "value": "/a"}}],
        "backendRefs": [BACKEND],
    }
    long_prefix = {
        "matches": [{"path": {"type": "PathPrefix", "value": "/a/b"}}],
        "backendRefs": [BACKEND],
    }
    exact = {"matches": [{"path": {"type": "Exact", "value": "/z"}}], "backendRefs": [BACKEND]}
    with_header = {
        "matches": [
            {
                "path": {"type": "PathPrefix", "value": "/a"},
                "headers": [{"name": "h", "value": "1"}],
            }
        ],
        "backendRefs": [BACKEND],
    }
    newer = http_route([catch_all, short_prefix], name="newer", created="2026-02-01T00:00:00Z")
    older = http_route(
        [exact, long_prefix, with_header], name="older", created="2026-01-01T00:00:00Z"
    )
    t = mesh(newer, older)
    order = [(r["name"], r["match"].get("path") or r["match"].get("prefix")) for r in routes(t)]
    assert order == [
        ("shop/older.rules[0]", "/z"),
        ("shop/older.rules[1]", "/a/b"),
        ("shop/older.rules[1]", "/a/b/"),
        ("shop/older.rules[2]", "/a"),  # same prefix, but a header match ranks first
        ("shop/older.rules[2]", "/a/"),
        ("shop/newer.rules[1]", "/a"),
        ("shop/newer.rules[1]", "/a/"),
        ("shop/newer.rules[0]", "/"),
    ]


def test_an_http_route_takes_precedence_over_a_virtual_service_and_a_port_parent_narrows_it() -> (
    None
):
    route = http_route(
        [{"backendRefs": [{"name": "api", "port": 8080}]}],
        parent={"group": "", "kind": "Service", "name": "web", "port": 9090},
    )
    t = mesh(virtual_service({"route": [to("v1")]}), route, ports=(80, 9090))
    assert t.errors() == []
    assert routes(t, 9090)[0]["route"]["cluster"] == "outbound|8080||api.shop.svc.cluster.local"
    assert routes(t, 80)[0]["route"]["cluster"] == f"outbound|80|v1|{HOST}"


def test_an_http_route_on_the_waypoint_gateway_covers_its_services_by_hostname() -> None:
    route = (
        "HTTPRoute",
        NS,
        "all",
        {
            "spec": {
                "parentRefs": [{"kind": "Gateway", "name": "waypoint"}],
                "hostnames": ["api.shop.svc.cluster.local"],
                "rules": [
                    {
                        "filters": [
                            {
                                "type": "ResponseHeaderModifier",
                                "responseHeaderModifier": {
                                    "add": [{"name": "x-via", "value": "waypoint"}]
                                },
                            }
                        ],
                        "backendRefs": [{"name": "api", "port": 8080}],
                    }
                ],
            }
        },
    )
    t = mesh(route)
    assert routes(t, 8080, "api.shop.svc.cluster.local")[0]["responseHeadersToAdd"] == [
        {"header": {"key": "x-via", "value": "waypoint"}}  # appendAction: APPEND_IF_EXISTS_OR_ADD
    ]
    assert routes(t)[0]["name"] == "default"  # web is not in the route's hostnames


# --- Invalid input: rejected by object and field, the last good version keeps serving ---

INVALID_VIRTUAL_SERVICES = [
    pytest.param(
        {"hosts": ["web"], "http": [{"route": [to("v1", weight=60), to("v2", weight=30)]}]},
        "spec.http[0].route",
        "weights add up to 90",
        id="weights-not-100",
    ),
    pytest.param(
        {"hosts": ["web"], "http": [{"match": [{"uri": {"regex": "(a)\\1"}}], "route": [to()]}]},
        "spec.http[0].match[0].uri.regex",
        "backreference",
        id="regex-re2-lacks",
    ),
    pytest.param(
        {"hosts": ["web"], "http": [{"match": [{"uri": {"regex": "(unclosed"}}], "route": [to()]}]},
        "spec.http[0].match[0].uri.regex",
        "not a valid regular expression",
        id="regex-invalid",
    ),
    pytest.param(
        {"hosts": ["web"], "http": [{"route": [to()], "timeout": "0s"}]},
        "spec.http[0].timeout",
        "zero",
        id="zero-timeout",
    ),
    pytest.param(
        {
            "hosts": ["web"],
            "http": [{"route": [to()], "retries": {"attempts": 2, "perTryTimeout": "-1s"}}],
        },
        "spec.http[0].retries.perTryTimeout",
        "negative",
        id="negative-duration",
    ),
    pytest.param(
        {"hosts": ["web"], "http": [{"route": [to()], "timeout": "ten seconds"}]},
        "spec.http[0].timeout",
        "not a duration",
        id="bad-duration",
    ),
    pytest.param(
        {
            "hosts": ["web"],
            "http": [{"route": [to()], "retries": {"attempts": 2, "retryOn": "5xx,sometimes"}}],
        },
        "spec.http[0].retries.retryOn",
        "unknown retry condition 'sometimes'",
        id="retry-condition",
    ),
    pytest.param(
        {"hosts": ["web"], "http": [{"route": [to()], "fault": {"abort": {"httpStatus": 700}}}]},
        "spec.http[0].fault.abort.httpStatus",
        "out of range",
        id="abort-status",
    ),
    pytest.param(
        {
            "hosts": ["web"],
            "http": [
                {
                    "route": [to()],
                    "fault": {"delay": {"fixedDelay": "1s", "percentage": {"value": 120}}},
                }
            ],
        },
        "spec.http[0].fault.delay.percentage.value",
        "not a percentage",
        id="percentage",
    ),
    pytest.param(
        {"hosts": ["web"], "http": [{"route": [to()], "mirror": {"host": "web"}}]},
        "spec.http[0].mirror",
        "not supported by waypoints",
        id="unsupported-field",
    ),
    pytest.param(
        {"hosts": ["web"], "http": [{"route": [to()], "timout": "1s"}]},
        "spec.http[0].timout",
        "did you mean 'timeout'",
        id="misspelt-field",
    ),
    pytest.param(
        {
            "hosts": ["web"],
            "http": [{"match": [{"uri": {"exact": "/a", "prefix": "/b"}}], "route": [to()]}],
        },
        "spec.http[0].match[0].uri",
        "only one of",
        id="two-match-kinds",
    ),
    pytest.param({"http": [{"route": [to()]}]}, "spec.hosts", "required", id="no-hosts"),
]


@pytest.mark.parametrize(("spec", "field", "message"), INVALID_VIRTUAL_SERVICES)
def test_invalid_virtual_services_are_rejected_and_the_last_good_one_serves(
    spec: dict[str, Any], field: str, message: str
) -> None:
    t = mesh(virtual_service({"route": [to("v1")]}))
    good = routes(t)
    t.apply(upsert("VirtualService", NS, "vs", {"spec": spec}))
    (error,) = t.errors()
    assert (error.kind, error.namespace, error.name, error.field) == (
        "VirtualService",
        NS,
        "vs",
        field,
    )
    assert message in error.message
    assert routes(t) == good


INVALID_HTTP_ROUTES = [
    pytest.param(
        {
            "parentRefs": [{"kind": "Service", "name": "web"}],
            "rules": [{"backendRefs": [{"name": "web"}]}],
        },
        "spec.rules[0].backendRefs[0].port",
        "required",
        id="backend-port",
    ),
    pytest.param(
        {
            "parentRefs": [{"kind": "Service", "name": "web"}],
            "rules": [
                {
                    "matches": [{"path": {"type": "RegularExpression", "value": "(?=x)"}}],
                    "backendRefs": [BACKEND],
                }
            ],
        },
        "spec.rules[0].matches[0].path.value",
        "lookaround",
        id="regex-re2-lacks",
    ),
    pytest.param(
        {
            "parentRefs": [{"kind": "Service", "name": "web"}],
            "rules": [
                {
                    "filters": [
                        {"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}
                    ],
                    "backendRefs": [BACKEND],
                }
            ],
        },
        "spec.rules[0].filters[0].requestRedirect",
        "not supported",
        id="redirect",
    ),
    pytest.param(
        {
            "parentRefs": [{"kind": "Service", "name": "web"}],
            "rules": [{"backendRefs": [{**BACKEND, "weight": 0}]}],
        },
        "spec.rules[0].backendRefs",
        "weight above 0",
        id="all-weights-zero",
    ),
    pytest.param(
        {
            "parentRefs": [{"kind": "Service", "name": "web", "namespace": "other"}],
            "rules": [{"backendRefs": [BACKEND]}],
        },
        "spec.parentRefs[0].namespace",
        "consumer route",
        id="consumer-route",
    ),
    pytest.param(
        {
            "parentRefs": [{"kind": "Service", "name": "web"}],
            "rules": [{"backendRefs": [BACKEND], "timeouts": {"request": "-5s"}}],
        },
        "spec.rules[0].timeouts.request",
        "negative",
        id="negative-timeout",
    ),
]


@pytest.mark.parametrize(("spec", "field", "message"), INVALID_HTTP_ROUTES)
def test_invalid_http_routes_are_rejected(spec: dict[str, Any], field: str, message: str) -> None:
    t = mesh()
    t.apply(upsert("HTTPRoute", NS, "r", {"spec": spec}))
    (error,) = t.errors()
    assert (error.kind, error.name, error.field) == ("HTTPRoute", "r", field)
    assert message in error.message
    assert routes(t)[0]["name"] == "default"
