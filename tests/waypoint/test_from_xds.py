"""Envoy xDS resources -> the waypoint's model: the shapes istiod_lite emits for the seed's
VirtualService / DestinationRule / AuthorizationPolicy examples, Envoy's defaults, and
rejection (with resource and field named) of what the waypoint cannot honour."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2  # noqa: F401 - registers Cors for parsing
from google.protobuf import any_pb2, json_format

from waypoint.config.from_xds import (
    XdsConversionError,
    cluster_from_xds,
    endpoints_from_xds,
    listener_from_xds,
    route_config_from_xds,
)
from waypoint.config.model import (
    Endpoint,
    Fault,
    FaultAbort,
    FaultDelay,
    HeaderAppendAction,
    HeaderToAdd,
    LbPolicy,
    Limits,
    OutlierConfig,
    RbacAction,
    RetryBudget,
    RetryPolicy,
    RouteConfig,
    RouteTable,
    ServiceRef,
    Tunnel,
    UpstreamProtocol,
)
from waypoint.policy.authz import RequestAttributes, evaluate
from waypoint.routing.match import RequestHead, find_route
from waypoint.routing.split import choose_backend

TYPE = "type.googleapis.com/"
REVIEWS = "reviews.bookinfo.svc.cluster.local"
NAME = f"{REVIEWS}:9080"
V1 = f"outbound|9080|v1|{REVIEWS}"
V2 = f"outbound|9080|v2|{REVIEWS}"
FRONTEND = "spiffe://cluster.local/ns/bookinfo/sa/productpage"


def parse(message: Any, data: dict[str, Any]) -> Any:
    return json_format.ParseDict(data, message)


def packed(message: Any) -> any_pb2.Any:
    resource = any_pb2.Any()
    resource.Pack(message)
    return resource


# --- RouteConfiguration ---


def route_config(*routes: dict[str, Any], **extra: Any) -> route_pb2.RouteConfiguration:
    return parse(
        route_pb2.RouteConfiguration(),
        {
            "name": NAME,
            "virtual_hosts": [{"name": NAME, "domains": ["*"], "routes": list(routes)}],
            **extra,
        },
    )


# The seed's "reviews" VirtualService: end-user jason -> v2, everyone else -> v1.
JASON_TO_V2 = {
    "name": "reviews.0",
    "match": {"prefix": "/", "headers": [{"name": "end-user", "string_match": {"exact": "jason"}}]},
    "route": {"cluster": V2, "timeout": "0s"},
}
DEFAULT_TO_V1 = {
    "name": "reviews.1",
    "match": {"prefix": "/"},
    "route": {"cluster": V1, "timeout": "0s"},
}


def request(target: str = "/", *headers: tuple[str, str], method: str = "GET") -> RequestHead:
    return RequestHead.from_target(method, target, tuple(headers))


def test_the_reviews_virtual_service_routes_jason_to_v2() -> None:
    config = route_config_from_xds(packed(route_config(JASON_TO_V2, DEFAULT_TO_V1)))
    assert config.name == NAME
    jason = find_route(config.routes, request("/reviews/0", ("end-user", "jason")))
    other = find_route(config.routes, request("/reviews/0", ("end-user", "bob")))
    assert jason is not None and jason.action.backends[0].cluster == V2
    assert other is not None and other.action.backends[0].cluster == V1
    assert jason.action.timeout is None  # Istio's "0s": no route timeout


def test_the_canary_virtual_service_splits_90_10() -> None:
    api = "api.default.svc.cluster.local"
    config = route_config_from_xds(
        route_config(
            {
                "match": {"prefix": "/"},
                "route": {
                    "weighted_clusters": {
                        "clusters": [
                            {"name": f"outbound|80|stable|{api}", "weight": 90},
                            {"name": f"outbound|80|canary|{api}", "weight": 10},
                        ]
                    }
                },
            }
        )
    )
    backends = config.routes[0].action.backends
    assert [(b.cluster, b.weight) for b in backends] == [
        (f"outbound|80|stable|{api}", 90),
        (f"outbound|80|canary|{api}", 10),
    ]
    rng = random.Random(5)
    stable = sum(choose_backend(backends, rng).weight == 90 for _ in range(2000))
    assert 0.87 <= stable / 2000 <= 0.93


def test_matches_of_every_kind_convert() -> None:
    config = route_config_from_xds(
        route_config(
            {
                "match": {
                    "safe_regex": {"regex": "/api/v[0-9]+/.*"},
                    "headers": [
                        {"name": ":method", "string_match": {"exact": "POST"}},
                        {"name": "X-Canary", "present_match": True},
                        {"name": "x-env", "string_match": {"prefix": "prod"}, "invert_match": True},
                    ],
                    "query_parameters": [
                        {"name": "debug", "present_match": True},
                        {"name": "user", "string_match": {"safe_regex": {"regex": "j.*"}}},
                    ],
                },
                "route": {"cluster": V1},
            },
            {"match": {"path": "/Exact", "case_sensitive": False}, "route": {"cluster": V2}},
        )
    )
    regex_route, exact_route = config.routes
    assert regex_route.match.method == "POST"  # the exact :method matcher
    hit = request("/api/v2/x?debug&user=jo", ("x-canary", ""), ("x-env", "dev"), method="POST")
    assert find_route(config.routes, hit) is regex_route
    for miss in (
        request("/api/v2/x?debug&user=jo", ("x-canary", ""), ("x-env", "dev"), method="GET"),
        request("/api/v2/x?debug&user=jo", ("x-env", "dev"), method="POST"),
        request("/api/v2/x?debug&user=jo", ("x-canary", ""), ("x-env", "prod1"), method="POST"),
        request("/api/v2/x?user=jo", ("x-canary", ""), ("x-env", "dev"), method="POST"),
        request("/api/vx/x?debug&user=jo", ("x-canary", ""), ("x-env", "dev"), method="POST"),
    ):
        assert find_route(config.routes, miss) is not regex_route
    assert find_route(config.routes, request("/exact")) is exact_route


def test_route_actions_convert_with_envoys_defaults() -> None:
    config = route_config_from_xds(
        route_config(
            {
                "match": {"prefix": "/v1/"},
                "route": {
                    "cluster": V1,
                    "timeout": "2.5s",
                    "prefix_rewrite": "/",
                    "retry_policy": {
                        "retry_on": "5xx, connect-failure,retriable-status-codes",
                        "num_retries": 3,
                        "per_try_timeout": "0.5s",
                        "retriable_status_codes": [409],
                        "retry_host_predicate": [
                            {"name": "envoy.retry_host_predicates.previous_hosts"}
                        ],
                        "host_selection_retry_max_attempts": "5",
                    },
                    "max_stream_duration": {"max_stream_duration": "0s"},
                },
                "request_headers_to_add": [
                    {
                        "header": {"key": "X-Set", "value": "1"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    },
                    {"header": {"key": "x-add", "value": "2"}, "append": True},
                    {"header": {"key": "x-old", "value": "3"}, "append": False},
                ],
                "request_headers_to_remove": ["X-Remove"],
                "response_headers_to_add": [
                    {"header": {"key": "x-served-by", "value": "waypoint"}}
                ],
                "response_headers_to_remove": ["server"],
            },
            {
                "match": {"prefix": "/"},
                "route": {"cluster": V1, "retry_policy": {"retry_on": "gateway-error"}},
            },
        )
    )
    first, second = (route.action for route in config.routes)
    assert first.timeout == 2.5
    assert first.prefix_rewrite == "/"
    assert first.retry == RetryPolicy(
        num_retries=3,
        per_try_timeout=0.5,
        retry_on=frozenset({"5xx", "connect-failure", "retriable-status-codes"}),
        retriable_status_codes=frozenset({409}),
    )
    assert first.request_headers_to_add == (
        HeaderToAdd("x-set", "1", HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD),
        HeaderToAdd("x-add", "2", HeaderAppendAction.APPEND_IF_EXISTS_OR_ADD),
        HeaderToAdd("x-old", "3", HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD),
    )
    assert first.request_headers_to_remove == ("x-remove",)
    assert first.response_headers_to_add == (HeaderToAdd("x-served-by", "waypoint"),)
    assert first.response_headers_to_remove == ("server",)
    assert second.timeout == 15.0  # Envoy's default route timeout
    assert second.retry == RetryPolicy(num_retries=1, retry_on=frozenset({"gateway-error"}))


def test_per_route_faults_convert_fractional_percentages() -> None:
    config = route_config_from_xds(
        route_config(
            {
                "match": {"prefix": "/"},
                "route": {"cluster": V1},
                "typed_per_filter_config": {
                    "envoy.filters.http.fault": {
                        "@type": TYPE + "envoy.extensions.filters.http.fault.v3.HTTPFault",
                        "delay": {"fixed_delay": "2s", "percentage": {"numerator": 50}},
                        "abort": {
                            "http_status": 503,
                            "percentage": {"numerator": 1000, "denominator": "TEN_THOUSAND"},
                        },
                    }
                },
            }
        )
    )
    assert config.routes[0].action.fault == Fault(
        delay=FaultDelay(2.0, 50.0), abort=FaultAbort(10.0, http_status=503)
    )


def test_authority_rewrite_and_per_destination_headers_convert() -> None:
    config = route_config_from_xds(
        route_config(
            {
                "match": {"prefix": "/"},
                "route": {
                    "host_rewrite_literal": "reviews.internal",
                    "weighted_clusters": {
                        "clusters": [
                            {
                                "name": V1,
                                "weight": 50,
                                "request_headers_to_add": [
                                    {
                                        "header": {"key": "x-version", "value": "v1"},
                                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                    }
                                ],
                                "response_headers_to_remove": ["X-Debug"],
                            },
                            {"name": V2, "weight": 50},
                        ]
                    },
                },
            }
        )
    )
    action = config.routes[0].action
    assert action.host_rewrite == "reviews.internal"
    v1, v2 = action.backends
    assert v1.request_headers_to_add == (
        HeaderToAdd("x-version", "v1", HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD),
    )
    assert v1.response_headers_to_remove == ("x-debug",)
    assert v2.request_headers_to_add == () and v2.response_headers_to_remove == ()


@pytest.mark.parametrize(
    ("route", "field", "message"),
    [
        (
            {"match": {"safe_regex": {"regex": "/api/(unclosed"}}, "route": {"cluster": V1}},
            "virtual_hosts[0].routes[0].match.safe_regex.regex",
            "invalid regex",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {
                    "weighted_clusters": {"clusters": [{"name": V1, "weight": 0}, {"name": V2}]}
                },
            },
            "virtual_hosts[0].routes[0].route.weighted_clusters.clusters",
            "add up to 0",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {
                    "weighted_clusters": {
                        "clusters": [{"name": V1, "weight": 90}, {"name": V2, "weight": 20}],
                        "total_weight": 100,
                    }
                },
            },
            "virtual_hosts[0].routes[0].route.weighted_clusters.total_weight",
            "differs from the clusters' sum 110",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {"cluster": V1, "retry_policy": {"retry_on": "5xx,envoy-ratelimited"}},
            },
            "virtual_hosts[0].routes[0].route.retry_policy",
            "unsupported retry_on value(s) envoy-ratelimited",
        ),
        (
            {"match": {"prefix": "/"}, "redirect": {"path_redirect": "/x"}},
            "virtual_hosts[0].routes[0].redirect",
            "not supported",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {"cluster": V1, "request_mirror_policies": [{"cluster": V2}]},
            },
            "virtual_hosts[0].routes[0].route.request_mirror_policies",
            "not supported",
        ),
        (
            {
                "match": {"prefix": "/", "headers": [{"name": "x", "exact_match": "y"}]},
                "route": {"cluster": V1},
            },
            "virtual_hosts[0].routes[0].match.headers[0].exact_match",
            "not supported",
        ),
        (
            {"match": {"prefix": "/", "grpc": {}}, "route": {"cluster": V1}},
            "virtual_hosts[0].routes[0].match.grpc",
            "not supported",
        ),
        (
            {"match": {}, "route": {"cluster": V1}},
            "virtual_hosts[0].routes[0].match",
            "one of prefix, path, safe_regex is required",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {"cluster": V1},
                "typed_per_filter_config": {
                    "envoy.filters.http.rbac": {
                        "@type": TYPE + "envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
                    }
                },
            },
            "virtual_hosts[0].routes[0].typed_per_filter_config['envoy.filters.http.rbac']",
            "only envoy.filters.http.fault",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {"cluster": V1},
                "request_headers_to_add": [{"header": {"key": ":path", "value": "/x"}}],
            },
            "virtual_hosts[0].routes[0].request_headers_to_add[0].header.key",
            "cannot be added or removed",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {"cluster": V1},
                "response_headers_to_add": [{"header": {"key": "x served", "value": "1"}}],
            },
            "virtual_hosts[0].routes[0].response_headers_to_add[0].header.key",
            "not an HTTP token",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {"cluster": V1},
                "request_headers_to_add": [{"header": {"key": "x-user", "value": "a\r\nx-admin: 1"}}],
            },
            "virtual_hosts[0].routes[0].request_headers_to_add[0].header.key",
            "holds NUL, CR or LF",
        ),
    ],
)
def test_invalid_routes_are_rejected_naming_the_field(
    route: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(XdsConversionError) as raised:
        route_config_from_xds(route_config(route))
    error = raised.value
    assert (error.resource, error.field) == (f"RouteConfiguration {NAME}", field)
    assert message in error.message
    assert str(error).startswith(f"RouteConfiguration {NAME}: {field}: ")


def test_a_route_configuration_serves_one_virtual_host_for_any_domain() -> None:
    two_hosts = route_config(DEFAULT_TO_V1)
    two_hosts.virtual_hosts.add(name="second", domains=["*"])
    with pytest.raises(XdsConversionError, match="exactly one virtual host"):
        route_config_from_xds(two_hosts)
    named_only = route_config(DEFAULT_TO_V1)
    named_only.virtual_hosts[0].domains[:] = ["reviews"]
    with pytest.raises(XdsConversionError, match=r'virtual_hosts\[0\].domains: must contain "\*"'):
        route_config_from_xds(named_only)


def test_a_resource_of_the_wrong_type_is_rejected() -> None:
    with pytest.raises(
        XdsConversionError, match=r"type_url: expected 'type\.googleapis\.com/envoy\.config\.route"
    ):
        route_config_from_xds(packed(cluster_pb2.Cluster(name="x")))
    garbage = any_pb2.Any(
        type_url=TYPE + "envoy.config.route.v3.RouteConfiguration", value=b"\xff\xff"
    )
    with pytest.raises(XdsConversionError, match="not a valid"):
        route_config_from_xds(garbage)


# --- Listener ---


def http_filter(name: str, type_name: str, **config: Any) -> dict[str, Any]:
    return {"name": name, "typed_config": {"@type": TYPE + type_name, **config}}


HCM_TYPE = (
    TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER = http_filter("envoy.filters.http.router", "envoy.extensions.filters.http.router.v3.Router")
FAULT = http_filter("envoy.filters.http.fault", "envoy.extensions.filters.http.fault.v3.HTTPFault")


def rbac_filter(action: str, policies: dict[str, Any]) -> dict[str, Any]:
    return http_filter(
        "envoy.filters.http.rbac",
        "envoy.extensions.filters.http.rbac.v3.RBAC",
        rules={"action": action, "policies": policies},
    )


def listener(*http_filters: dict[str, Any], name: str = NAME, **hcm: Any) -> listener_pb2.Listener:
    manager = {
        "stat_prefix": name,
        "rds": {"route_config_name": name},
        "http_filters": list(http_filters),
        **hcm,
    }
    return parse(
        listener_pb2.Listener(),
        {
            "name": name,
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": HCM_TYPE,
                                **manager,
                            },
                        }
                    ]
                }
            ],
        },
    )


# What istiod_lite emits for an AuthorizationPolicy with targetRefs allowing GET /api/* from
# the productpage service account, and a DENY policy for a blocked namespace.
ALLOW_GET_API = {
    "ns[bookinfo]-policy[api-readers]-rule[0]": {
        "permissions": [
            {
                "and_rules": {
                    "rules": [
                        {
                            "or_rules": {
                                "rules": [
                                    {
                                        "header": {
                                            "name": ":method",
                                            "string_match": {"exact": "GET"},
                                        }
                                    }
                                ]
                            }
                        },
                        {"or_rules": {"rules": [{"url_path": {"path": {"prefix": "/api/"}}}]}},
                        {"or_rules": {"rules": [{"destination_port": 9080}]}},
                    ]
                }
            }
        ],
        "principals": [
            {
                "and_ids": {
                    "ids": [
                        {
                            "or_ids": {
                                "ids": [{"authenticated": {"principal_name": {"exact": FRONTEND}}}]
                            }
                        },
                    ]
                }
            }
        ],
    }
}
DENY_BLOCKED_NAMESPACE = {
    "ns[bookinfo]-policy[deny-blocked]-rule[0]": {
        "permissions": [{"any": True}],
        "principals": [
            {"authenticated": {"principal_name": {"safe_regex": {"regex": ".*/ns/blocked/.*"}}}}
        ],
    }
}


def test_a_listener_carries_its_route_name_and_rbac_filters_in_istios_order() -> None:
    config = listener_from_xds(
        packed(
            listener(
                rbac_filter("DENY", DENY_BLOCKED_NAMESPACE),
                rbac_filter("ALLOW", ALLOW_GET_API),
                FAULT,
                ROUTER,
            )
        )
    )
    assert (config.name, config.hostname, config.port) == (NAME, REVIEWS, 9080)
    assert config.route_config_name == NAME
    assert config.fault_filter and config.default_fault is None
    deny, allow = config.authz.deny, config.authz.allow
    assert deny is not None and deny.action is RbacAction.DENY
    assert allow is not None and allow.action is RbacAction.ALLOW

    def decide(
        principal: str, method: str = "GET", target: str = "/api/ratings", port: int = 9080
    ) -> bool:
        head = RequestHead.from_target(method, target, ())
        return evaluate(deny, allow, RequestAttributes(head, principal, port)).allowed

    assert decide(FRONTEND)
    assert not decide("spiffe://cluster.local/ns/bookinfo/sa/other")
    assert not decide(FRONTEND, method="POST")
    assert not decide(FRONTEND, target="/admin")
    assert not decide(FRONTEND, port=9090)
    blocked = "spiffe://cluster.local/ns/blocked/sa/productpage"
    decision = evaluate(deny, allow, RequestAttributes(request("/api/x"), blocked, 9080))
    assert decision.policy_name == "ns[bookinfo]-policy[deny-blocked]-rule[0]"


def test_a_listener_without_policies_has_no_rbac() -> None:
    config = listener_from_xds(listener(ROUTER))
    assert config.authz.deny is None and config.authz.allow is None
    assert not config.fault_filter
    # An RBAC filter without rules enforces nothing (Envoy).
    empty = http_filter("envoy.filters.http.rbac", "envoy.extensions.filters.http.rbac.v3.RBAC")
    assert listener_from_xds(listener(empty, ROUTER)).authz.allow is None


def test_an_unknown_http_filter_is_rejected_unless_optional() -> None:
    cors = http_filter("envoy.filters.http.cors", "envoy.extensions.filters.http.cors.v3.Cors")
    with pytest.raises(
        XdsConversionError,
        match=r"http_filters\[0\].typed_config: HTTP filter .*Cors is not supported",
    ):
        listener_from_xds(listener(cors, ROUTER))
    assert listener_from_xds(listener({**cors, "is_optional": True}, ROUTER)).name == NAME


@pytest.mark.parametrize(
    ("built", "field", "message"),
    [
        (listener(ROUTER, name="reviews"), "name", "is not '<service hostname>:<port>'"),
        (listener(FAULT), "filter_chains[0].filters[0].typed_config.http_filters", "router"),
        (
            listener(ROUTER, FAULT),
            "filter_chains[0].filters[0].typed_config.http_filters[1]",
            "last",
        ),
        (
            listener(ROUTER, rds=None, route_config={"name": "inline"}),
            "filter_chains[0].filters[0].typed_config.rds",
            "RDS",
        ),
        (
            listener(rbac_filter("LOG", {}), ROUTER),
            "filter_chains[0].filters[0].typed_config.http_filters[0].typed_config.rules.action",
            "only ALLOW and DENY",
        ),
        (
            listener(rbac_filter("ALLOW", {}), rbac_filter("ALLOW", {}), ROUTER),
            "filter_chains[0].filters[0].typed_config.http_filters[1]",
            "a second ALLOW",
        ),
        (
            listener(
                rbac_filter(
                    "ALLOW",
                    {
                        "p": {
                            "permissions": [{"any": True}],
                            "principals": [
                                {"remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}
                            ],
                        }
                    },
                ),
                ROUTER,
            ),
            "filter_chains[0].filters[0].typed_config.http_filters[0].typed_config.rules.policies['p'].principals[0].remote_ip",
            "not supported",
        ),
        (
            listener(rbac_filter("ALLOW", {"p": {"permissions": [{"any": True}]}}), ROUTER),
            "filter_chains[0].filters[0].typed_config.http_filters[0].typed_config.rules.policies['p'].principals",
            "at least one principal",
        ),
    ],
)
def test_invalid_listeners_are_rejected_naming_the_field(
    built: listener_pb2.Listener, field: str, message: str
) -> None:
    with pytest.raises(XdsConversionError) as raised:
        listener_from_xds(built)
    assert raised.value.field == field
    assert message in raised.value.message


def test_the_route_table_pairs_listeners_with_their_routes_and_applies_fault_defaults() -> None:
    abort_all = {
        "abort": {"http_status": 418, "percentage": {"numerator": 100}},
    }
    with_faults = listener_from_xds(
        listener(
            http_filter(
                "envoy.filters.http.fault",
                "envoy.extensions.filters.http.fault.v3.HTTPFault",
                **abort_all,
            ),
            ROUTER,
        )
    )
    without_faults = listener_from_xds(
        listener(ROUTER, name="ratings.bookinfo.svc.cluster.local:9080")
    )
    waiting = listener_from_xds(listener(ROUTER, name="details.bookinfo.svc.cluster.local:9080"))
    route_with_fault = copy.deepcopy(DEFAULT_TO_V1)
    route_with_fault["typed_per_filter_config"] = {
        "envoy.filters.http.fault": {
            "@type": TYPE + "envoy.extensions.filters.http.fault.v3.HTTPFault",
            "delay": {"fixed_delay": "1s", "percentage": {"numerator": 100}},
        }
    }
    reviews_routes = route_config_from_xds(route_config(route_with_fault, DEFAULT_TO_V1))
    ratings_routes = RouteConfig(
        "ratings.bookinfo.svc.cluster.local:9080",
        route_config_from_xds(route_config(route_with_fault)).routes,
    )
    table = RouteTable.build(
        [with_faults, without_faults, waiting],
        {reviews_routes.name: reviews_routes, ratings_routes.name: ratings_routes},
    )

    reviews = table.get(REVIEWS, 9080)
    assert reviews is not None
    # A route's own fault replaces the filter's; the others get the filter's.
    assert reviews.routes[0].action.fault == Fault(delay=FaultDelay(1.0, 100.0))
    assert reviews.routes[1].action.fault == Fault(abort=FaultAbort(100.0, http_status=418))
    # Without the fault filter, route faults are inert.
    ratings = table.get("ratings.bookinfo.svc.cluster.local", 9080)
    assert ratings is not None and ratings.routes[0].action.fault is None
    # Routes not delivered yet: no route (404 NR) rather than a wrong one.
    details = table.get("details.bookinfo.svc.cluster.local", 9080)
    assert details is not None and details.routes == ()
    assert table.get(REVIEWS, 9090) is None


# --- Cluster ---


def cluster(**fields: Any) -> cluster_pb2.Cluster:
    return parse(
        cluster_pb2.Cluster(),
        {
            "name": V1,
            "type": "EDS",
            "eds_cluster_config": {"service_name": V1, "eds_config": {"ads": {}}},
            **fields,
        },
    )


def test_the_seed_destination_rule_converts() -> None:
    """DestinationRule reviews: LEAST_REQUEST, maxConnections 100, http1MaxPendingRequests
    100, http2MaxRequests 1000, outlier 5 consecutive 5xx / 30 s / 30 s."""
    config = cluster_from_xds(
        packed(
            cluster(
                lb_policy="LEAST_REQUEST",
                connect_timeout="2s",
                circuit_breakers={
                    "thresholds": [
                        {"max_connections": 100, "max_pending_requests": 100, "max_requests": 1000}
                    ]
                },
                typed_extension_protocol_options={
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "common_http_protocol_options": {"max_requests_per_connection": 10},
                        "explicit_http_config": {"http2_protocol_options": {}},
                    }
                },
                outlier_detection={
                    "consecutive_5xx": 5,
                    "interval": "30s",
                    "base_ejection_time": "30s",
                },
                metadata={
                    "filter_metadata": {
                        "istio": {
                            "services": [
                                {"host": REVIEWS, "name": "reviews", "namespace": "bookinfo"}
                            ]
                        }
                    }
                },
            )
        )
    )
    assert config.name == V1 and config.endpoints_name == V1
    assert config.lb is LbPolicy.LEAST_REQUEST
    assert config.connect_timeout == 2.0
    assert config.limits == Limits(
        max_connections=100, max_pending=100, max_requests=1000, max_requests_per_connection=10
    )
    assert config.outlier == OutlierConfig(
        consecutive_5xx=5, interval=30.0, base_ejection_time=30.0
    )
    assert config.service == ServiceRef(REVIEWS, "reviews", "bookinfo")
    assert config.upstream_protocol is UpstreamProtocol.HTTP2


def test_a_bare_cluster_gets_envoys_defaults() -> None:
    config = cluster_from_xds(cluster())
    assert config.lb is LbPolicy.ROUND_ROBIN
    assert config.connect_timeout == 5.0
    assert config.limits == Limits()
    assert config.limits.retry_budget == RetryBudget(0.0, 3)  # max_retries 3
    assert config.outlier is None
    assert config.service is None
    assert config.upstream_protocol is None
    assert config.healthy_panic_threshold == 50.0


def test_circuit_breaker_retry_settings() -> None:
    budget = cluster(circuit_breakers={"thresholds": [{"max_retries": 7, "retry_budget": {}}]})
    assert cluster_from_xds(budget).limits.retry_budget == RetryBudget(20.0, 3)
    fixed = cluster(
        circuit_breakers={
            "thresholds": [{"priority": "HIGH", "max_requests": 1}, {"max_retries": 7}]
        }
    )
    limits = cluster_from_xds(fixed).limits
    assert limits.retry_budget == RetryBudget(0.0, 7)
    assert limits.max_requests == 1024  # the HIGH priority thresholds do not apply


def test_the_circuit_breaker_destination_rule_keeps_max_ejection_percent() -> None:
    config = cluster_from_xds(
        cluster(
            outlier_detection={
                "consecutive_5xx": 5,
                "interval": "10s",
                "base_ejection_time": "30s",
                "max_ejection_percent": 50,
            }
        )
    )
    assert config.outlier == OutlierConfig(5, 10.0, 30.0, 50, 300.0)
    long_base = cluster_from_xds(cluster(outlier_detection={"base_ejection_time": "600s"}))
    assert long_base.outlier is not None and long_base.outlier.max_ejection_time == 600.0


def test_outlier_detectors_follow_their_enforcement_switches() -> None:
    """Istio's shape: enforcing_consecutive_5xx 100 (0 when consecutive5xxErrors is 0),
    success rate off, gateway failures enforced only with consecutiveGatewayErrors."""
    istio = cluster(
        outlier_detection={
            "consecutive_5xx": 0,
            "enforcing_consecutive_5xx": 0,
            "enforcing_success_rate": 0,
            "consecutive_gateway_failure": 3,
            "enforcing_consecutive_gateway_failure": 100,
        },
        common_lb_config={"healthy_panic_threshold": {"value": 0}},
    )
    converted = cluster_from_xds(istio)
    assert converted.healthy_panic_threshold == 0.0
    outlier = converted.outlier
    assert outlier is not None
    assert (outlier.consecutive_5xx, outlier.consecutive_gateway_failure) == (0, 3)
    # Envoy's defaults: 5xx enforced, gateway failures counted but never enforced.
    defaults = cluster_from_xds(cluster(outlier_detection={"consecutive_5xx": 7})).outlier
    assert defaults is not None
    assert (defaults.consecutive_5xx, defaults.consecutive_gateway_failure) == (7, 0)
    not_enforced = cluster_from_xds(cluster(outlier_detection={"enforcing_consecutive_5xx": 0}))
    assert not_enforced.outlier is not None and not_enforced.outlier.consecutive_5xx == 0


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"type": "STATIC"}, "type", "only EDS"),
        ({"lb_policy": "RING_HASH"}, "lb_policy", "ROUND_ROBIN, LEAST_REQUEST and RANDOM"),
        (
            {"outlier_detection": {"interval": "0s"}},
            "outlier_detection",
            "interval must be positive",
        ),
        (
            {"outlier_detection": {"split_external_local_origin_errors": True}},
            "outlier_detection.split_external_local_origin_errors",
            "not supported",
        ),
        (
            {"metadata": {"filter_metadata": {"istio": {"services": []}}}},
            "metadata.filter_metadata['istio'].services",
            "non-empty list",
        ),
        (
            {"outlier_detection": {"enforcing_consecutive_5xx": 50}},
            "outlier_detection.enforcing_consecutive_5xx",
            "only 0 or 100",
        ),
        (
            {"common_lb_config": {"healthy_panic_threshold": {"value": 150}}},
            "common_lb_config.healthy_panic_threshold",
            "must be in [0, 100]",
        ),
    ],
)
def test_invalid_clusters_are_rejected_naming_the_field(
    fields: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(XdsConversionError) as raised:
        cluster_from_xds(cluster(**fields))
    assert (raised.value.resource, raised.value.field) == (f"Cluster {V1}", field)
    assert message in raised.value.message


# --- ClusterLoadAssignment ---


def lb_endpoint(ip: str, port: int = 9080, **fields: Any) -> dict[str, Any]:
    return {
        "endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}},
        **fields,
    }


def istio(**values: str) -> dict[str, Any]:
    return {"filter_metadata": {"istio": values}}


def assignment(*endpoints: dict[str, Any]) -> endpoint_pb2.ClusterLoadAssignment:
    return parse(
        endpoint_pb2.ClusterLoadAssignment(),
        {"cluster_name": V1, "endpoints": [{"lb_endpoints": list(endpoints)}]},
    )


def test_endpoints_carry_address_health_weight_and_the_identity_to_expect() -> None:
    identity = "spiffe://cluster.local/ns/bookinfo/sa/reviews"
    converted = endpoints_from_xds(
        packed(
            assignment(
                lb_endpoint(
                    "10.1.0.5",
                    health_status="HEALTHY",
                    load_balancing_weight=1,
                    metadata=istio(
                        workload="bookinfo/reviews-v1-abc", identity=identity, tunnel="hbone"
                    ),
                ),
                lb_endpoint("10.1.0.6", 8080, health_status="UNHEALTHY"),
                lb_endpoint("fd00::7", health_status="DRAINING"),
            )
        )
    )
    assert converted.cluster_name == V1
    assert converted.endpoints == (
        Endpoint("10.1.0.5", 9080, identity, Tunnel.HBONE, True, 1, "bookinfo/reviews-v1-abc"),
        Endpoint("10.1.0.6", 8080, None, Tunnel.TCP, False, 1, None),
        Endpoint("fd00::7", 9080, None, Tunnel.TCP, False, 1, None),
    )
    assert str(converted.endpoints[2]) == "[fd00::7]:9080"


@pytest.mark.parametrize(
    ("endpoint", "field", "message"),
    [
        (
            lb_endpoint("reviews-v1"),
            "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address",
            "not an IP",
        ),
        (
            lb_endpoint("10.1.0.5", 0),
            "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value",
            "0",
        ),
        (
            lb_endpoint(
                "10.1.0.5",
                metadata=istio(identity="spiffe://cluster.local/reviews", tunnel="hbone"),
            ),
            "endpoints[0].lb_endpoints[0].metadata.filter_metadata['istio'].identity",
            "not a SPIFFE workload identity",
        ),
        (
            lb_endpoint("10.1.0.5", metadata=istio(tunnel="hbone")),
            "endpoints[0].lb_endpoints[0].metadata",
            "needs the identity",
        ),
        (
            lb_endpoint("10.1.0.5", metadata=istio(tunnel="quic")),
            "endpoints[0].lb_endpoints[0].metadata.filter_metadata['istio'].tunnel",
            "'quic'",
        ),
        (
            lb_endpoint("10.1.0.5", load_balancing_weight=0),
            "endpoints[0].lb_endpoints[0].load_balancing_weight",
            "at least 1",
        ),
    ],
)
def test_invalid_endpoints_are_rejected_naming_the_field(
    endpoint: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(XdsConversionError) as raised:
        endpoints_from_xds(assignment(endpoint))
    assert (raised.value.resource, raised.value.field) == (f"ClusterLoadAssignment {V1}", field)
    assert message in raised.value.message
