"""DestinationRule -> the Clusters a waypoint load-balances over, and pods -> their
ClusterLoadAssignments: tables of traffic policies, endpoints and invalid input."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from google.protobuf import json_format

from istiod_lite.model import Translator
from istiod_lite.sources.base import ObjectEvent
from meshcore.xds.types import CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, ROUTE_TYPE_URL

NS = "shop"
HOST = "web.shop.svc.cluster.local"
CLUSTER = f"outbound|80||{HOST}"
UNLIMITED = 4294967295
PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
PROTOCOL_OPTIONS_TYPE = f"type.googleapis.com/{PROTOCOL_OPTIONS}"


def upsert(kind: str, namespace: str, name: str, obj: Any) -> ObjectEvent:
    return ObjectEvent(kind, "upsert", namespace, name, obj)


def pod(
    ip: str, version: str, *, ready: bool = True, ambient: bool = True, account: str = "web"
) -> dict[str, Any]:
    labels = {"app": "web", "version": version}
    if not ambient:
        labels["istio.io/dataplane-mode"] = "none"
    return {
        "metadata": {"labels": labels},
        "spec": {
            "nodeName": "node-a",
            "serviceAccountName": account,
            "containers": [
                {"ports": [{"name": "http", "containerPort": 8080 if version == "v1" else 8081}]}
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def mesh(*objects: tuple[str, str, str, Any], app_protocol: str = "http") -> Translator:
    t = Translator()
    for event in (
        upsert(
            "Namespace",
            "",
            NS,
            {
                "metadata": {
                    "labels": {
                        "istio.io/use-waypoint": "waypoint",
                        "istio.io/dataplane-mode": "ambient",
                    }
                }
            },
        ),
        upsert("Waypoint", NS, "waypoint", {"spec": {}}),
        upsert(
            "Service",
            NS,
            "web",
            {
                "spec": {
                    "selector": {"app": "web"},
                    "clusterIP": "10.96.0.1",
                    "ports": [{"port": 80, "targetPort": "http", "appProtocol": app_protocol}],
                }
            },
        ),
        upsert("Pod", NS, "web-1", pod("10.1.0.1", "v1")),
        upsert("Pod", NS, "web-2", pod("10.1.0.2", "v2", ready=False, ambient=False)),
        *(upsert(*o) for o in objects),
    ):
        t.apply(event)
    return t


def cluster(t: Translator, name: str = CLUSTER) -> dict[str, Any]:
    message = t.resources()[CLUSTER_TYPE_URL][name]
    # lb_policy is an enum whose default (ROUND_ROBIN) MessageToDict would leave out.
    return {
        **json_format.MessageToDict(message),
        "lbPolicy": Cluster.LbPolicy.Name(message.lb_policy),
    }


def endpoints(t: Translator, name: str = CLUSTER) -> list[dict[str, Any]]:
    assignment = t.resources()[ENDPOINT_TYPE_URL][name]
    assert assignment.cluster_name == name
    return [
        json_format.MessageToDict(e) for group in assignment.endpoints for e in group.lb_endpoints
    ]


def destination_rule(
    traffic_policy: dict[str, Any], subsets: list[dict[str, Any]] | None = None
) -> tuple[str, str, str, Any]:
    spec: dict[str, Any] = {"host": "web", "trafficPolicy": traffic_policy}
    if subsets is not None:
        spec["subsets"] = subsets
    return ("DestinationRule", NS, "web", {"spec": spec})


# --- Defaults ---


def test_the_default_cluster_mirrors_istio_defaults() -> None:
    assert cluster(mesh()) == {
        "name": CLUSTER,
        "type": "EDS",
        "edsClusterConfig": {
            "edsConfig": {"ads": {}, "resourceApiVersion": "V3"},
            "serviceName": CLUSTER,
        },
        "connectTimeout": "10s",
        "lbPolicy": "LEAST_REQUEST",
        "circuitBreakers": {
            "thresholds": [
                {
                    "maxConnections": UNLIMITED,
                    "maxPendingRequests": UNLIMITED,
                    "maxRequests": UNLIMITED,
                    "maxRetries": UNLIMITED,
                }
            ]
        },
        "typedExtensionProtocolOptions": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": PROTOCOL_OPTIONS_TYPE,
                "explicitHttpConfig": {"httpProtocolOptions": {}},
            }
        },
        "metadata": {
            "filterMetadata": {
                "istio": {"services": [{"host": HOST, "name": "web", "namespace": NS}]}
            }
        },
    }


@pytest.mark.parametrize(
    ("app_protocol", "pool", "expected"),
    [
        ("grpc", None, {"explicitHttpConfig": {"http2ProtocolOptions": {}}}),
        ("http2", None, {"explicitHttpConfig": {"http2ProtocolOptions": {}}}),
        (
            "http",
            {"http": {"h2UpgradePolicy": "UPGRADE"}},
            {"explicitHttpConfig": {"http2ProtocolOptions": {}}},
        ),
        (
            "tcp",
            None,
            {
                "useDownstreamProtocolConfig": {
                    "httpProtocolOptions": {},
                    "http2ProtocolOptions": {},
                }
            },
        ),
        (
            "http",
            {"http": {"useClientProtocol": True}},
            {
                "useDownstreamProtocolConfig": {
                    "httpProtocolOptions": {},
                    "http2ProtocolOptions": {},
                }
            },
        ),
    ],
)
def test_the_upstream_protocol_follows_the_service_port(
    app_protocol: str, pool: Any, expected: dict[str, Any]
) -> None:
    objects = [destination_rule({"connectionPool": pool})] if pool else []
    options = cluster(mesh(*objects, app_protocol=app_protocol))["typedExtensionProtocolOptions"]
    found = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert {
        k: v for k, v in found.items() if k not in ("@type", "commonHttpProtocolOptions")
    } == expected


# --- Traffic policy table ---

POLICY_CASES = [
    pytest.param(
        {"loadBalancer": {"simple": "ROUND_ROBIN"}}, {"lbPolicy": "ROUND_ROBIN"}, id="round-robin"
    ),
    pytest.param({"loadBalancer": {"simple": "RANDOM"}}, {"lbPolicy": "RANDOM"}, id="random"),
    pytest.param(
        {"loadBalancer": {"simple": "LEAST_CONN"}},
        {"lbPolicy": "LEAST_REQUEST"},
        id="least-conn-alias",
    ),
    pytest.param(
        {
            "connectionPool": {
                "tcp": {"maxConnections": 100, "connectTimeout": "250ms"},
                "http": {"http1MaxPendingRequests": 10, "http2MaxRequests": 1000, "maxRetries": 3},
            }
        },
        {
            "connectTimeout": "0.250s",
            "circuitBreakers": {
                "thresholds": [
                    {
                        "maxConnections": 100,
                        "maxPendingRequests": 10,
                        "maxRequests": 1000,
                        "maxRetries": 3,
                    }
                ]
            },
        },
        id="connection-pool-limits",
    ),
    pytest.param(
        {"connectionPool": {"http": {"http1MaxPendingRequests": 0}}},
        {
            "circuitBreakers": {
                "thresholds": [
                    {
                        "maxConnections": UNLIMITED,
                        "maxPendingRequests": UNLIMITED,
                        "maxRequests": UNLIMITED,
                        "maxRetries": UNLIMITED,
                    }
                ]
            }
        },
        id="zero-means-unset",
    ),
    pytest.param(
        {"connectionPool": {"http": {"maxRequestsPerConnection": 1, "idleTimeout": "30s"}}},
        {
            "typedExtensionProtocolOptions": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": PROTOCOL_OPTIONS_TYPE,
                    "commonHttpProtocolOptions": {
                        "maxRequestsPerConnection": 1,
                        "idleTimeout": "30s",
                    },
                    "explicitHttpConfig": {"httpProtocolOptions": {}},
                }
            }
        },
        id="requests-per-connection",
    ),
    pytest.param(
        {
            "outlierDetection": {
                "consecutive5xxErrors": 3,
                "interval": "1s",
                "baseEjectionTime": "15s",
                "maxEjectionPercent": 50,
            }
        },
        {
            "outlierDetection": {
                "consecutive5xx": 3,
                "enforcingConsecutive5xx": 100,
                "enforcingSuccessRate": 0,
                "interval": "1s",
                "baseEjectionTime": "15s",
                "maxEjectionPercent": 50,
            },
            "commonLbConfig": {"healthyPanicThreshold": {}},
        },
        id="outlier-detection",
    ),
    pytest.param(
        {"outlierDetection": {"consecutiveGatewayErrors": 2, "minHealthPercent": 0}},
        {
            "outlierDetection": {
                "consecutive5xx": 5,
                "enforcingConsecutive5xx": 100,
                "enforcingSuccessRate": 0,
                "interval": "10s",
                "baseEjectionTime": "30s",
                "maxEjectionPercent": 10,
                "consecutiveGatewayFailure": 2,
                "enforcingConsecutiveGatewayFailure": 100,
            },
            "commonLbConfig": {"healthyPanicThreshold": {}},
        },
        id="outlier-detection-defaults",
    ),
]


@pytest.mark.parametrize(("policy", "expected"), POLICY_CASES)
def test_traffic_policy(policy: dict[str, Any], expected: dict[str, Any]) -> None:
    t = mesh(destination_rule(policy))
    assert t.errors() == []
    found = cluster(t)
    assert {key: found.get(key) for key in expected} == expected


def test_subset_and_port_level_policies_override_section_by_section() -> None:
    t = mesh(
        destination_rule(
            {
                "loadBalancer": {"simple": "ROUND_ROBIN"},
                "connectionPool": {"tcp": {"maxConnections": 10}},
                "portLevelSettings": [
                    {"port": {"number": 80}, "connectionPool": {"tcp": {"maxConnections": 20}}}
                ],
            },
            [
                {
                    "name": "v2",
                    "labels": {"version": "v2"},
                    "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}},
                }
            ],
        )
    )
    default, v2 = cluster(t), cluster(t, f"outbound|80|v2|{HOST}")
    assert (default["lbPolicy"], default["circuitBreakers"]["thresholds"][0]["maxConnections"]) == (
        "ROUND_ROBIN",
        20,
    )
    assert (v2["lbPolicy"], v2["circuitBreakers"]["thresholds"][0]["maxConnections"]) == (
        "RANDOM",
        20,
    )


# --- Endpoints ---


def test_endpoints_are_the_pods_with_their_target_port_health_identity_and_tunnel() -> None:
    assert endpoints(mesh()) == [
        {
            "endpoint": {"address": {"socketAddress": {"address": "10.1.0.1", "portValue": 8080}}},
            "healthStatus": "HEALTHY",
            "loadBalancingWeight": 1,
            "metadata": {
                "filterMetadata": {
                    "istio": {
                        "workload": "shop/web-1",
                        "identity": "spiffe://cluster.local/ns/shop/sa/web",
                        "tunnel": "hbone",
                    }
                }
            },
        },
        {
            # Named target port resolved per pod; not ready; not in the mesh: dialled directly.
            "endpoint": {"address": {"socketAddress": {"address": "10.1.0.2", "portValue": 8081}}},
            "healthStatus": "UNHEALTHY",
            "loadBalancingWeight": 1,
            "metadata": {
                "filterMetadata": {
                    "istio": {
                        "workload": "shop/web-2",
                        "identity": "spiffe://cluster.local/ns/shop/sa/web",
                        "tunnel": "tcp",
                    }
                }
            },
        },
    ]


def test_subset_clusters_hold_only_the_pods_with_the_subset_labels_and_follow_pod_changes() -> None:
    t = mesh(
        destination_rule(
            {},
            [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
        )
    )
    v1 = f"outbound|80|v1|{HOST}"
    assert [e["metadata"]["filterMetadata"]["istio"]["workload"] for e in endpoints(t, v1)] == [
        "shop/web-1"
    ]
    # web-2 is relabelled v1: it leaves v2 and joins v1, in one delta.
    delta = t.apply(upsert("Pod", NS, "web-2", pod("10.1.0.2", "v1")))
    assert set(delta[ENDPOINT_TYPE_URL].upserts) >= {v1, f"outbound|80|v2|{HOST}"}
    assert [e["metadata"]["filterMetadata"]["istio"]["workload"] for e in endpoints(t, v1)] == [
        "shop/web-1",
        "shop/web-2",
    ]
    assert endpoints(t, f"outbound|80|v2|{HOST}") == []
    t.apply(ObjectEvent("Pod", "delete", NS, "web-1", None))
    assert [e["metadata"]["filterMetadata"]["istio"]["workload"] for e in endpoints(t, v1)] == [
        "shop/web-2"
    ]


def test_clusters_of_other_services_named_by_routes_are_sent_to_the_routing_waypoint() -> None:
    t = mesh(
        (
            "Service",
            "other",
            "api",
            {
                "spec": {
                    "selector": {"app": "api"},
                    "clusterIP": "10.96.0.9",
                    "ports": [{"port": 7070}],
                }
            },
        ),
        (
            "VirtualService",
            NS,
            "web",
            {
                "spec": {
                    "hosts": ["web"],
                    "http": [{"route": [{"destination": {"host": "api.other.svc.cluster.local"}}]}],
                }
            },
        ),
    )
    name = "outbound|7070||api.other.svc.cluster.local"
    assert cluster(t, name)["metadata"]["filterMetadata"]["istio"]["services"] == [
        {"host": "api.other.svc.cluster.local", "name": "api", "namespace": "other"}
    ]
    assert endpoints(t, name) == []
    # The route goes away: so does the cluster nobody uses any more.
    delta = t.apply(ObjectEvent("VirtualService", "delete", NS, "web", None))
    assert delta[CLUSTER_TYPE_URL].removals == {name}
    assert name not in t.resources()[CLUSTER_TYPE_URL]


# --- Invalid input ---

INVALID_POLICIES = [
    pytest.param(
        {"trafficPolicy": {"loadBalancer": {"simple": "PASSTHROUGH"}}},
        "spec.trafficPolicy.loadBalancer.simple",
        "not supported",
        id="lb",
    ),
    pytest.param(
        {"trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "x"}}}},
        "spec.trafficPolicy.loadBalancer.consistentHash",
        "not supported by waypoints",
        id="consistent-hash",
    ),
    pytest.param(
        {"trafficPolicy": {"outlierDetection": {"interval": "0s"}}},
        "spec.trafficPolicy.outlierDetection.interval",
        "zero",
        id="zero-interval",
    ),
    pytest.param(
        {"trafficPolicy": {"outlierDetection": {"baseEjectionTime": "-30s"}}},
        "spec.trafficPolicy.outlierDetection.baseEjectionTime",
        "negative",
        id="negative-ejection",
    ),
    pytest.param(
        {"trafficPolicy": {"outlierDetection": {"maxEjectionPercent": 150}}},
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
        "out of range",
        id="percent",
    ),
    pytest.param(
        {"trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": -1}}}},
        "spec.trafficPolicy.connectionPool.tcp.maxConnections",
        "out of range",
        id="negative-limit",
    ),
    pytest.param(
        {"trafficPolicy": {"tls": {"mode": "SIMPLE"}}},
        "spec.trafficPolicy.tls.mode",
        "do not originate TLS",
        id="tls-origination",
    ),
    pytest.param(
        {"trafficPolicy": {"outlierDetection": {"minHealthPercent": 50}}},
        "spec.trafficPolicy.outlierDetection.minHealthPercent",
        "not supported by waypoints",
        id="panic-routing",
    ),
    pytest.param(
        {"subsets": [{"name": "v1"}, {"name": "v1"}]},
        "spec.subsets[1].name",
        "defined twice",
        id="duplicate-subset",
    ),
    pytest.param({"host": "*.shop.svc.cluster.local"}, "spec.host", "wildcard", id="wildcard-host"),
]


@pytest.mark.parametrize(("spec", "field", "message"), INVALID_POLICIES)
def test_invalid_destination_rules_are_rejected_and_the_last_good_one_serves(
    spec: dict[str, Any], field: str, message: str
) -> None:
    t = mesh(destination_rule({"loadBalancer": {"simple": "RANDOM"}}))
    t.apply(upsert("DestinationRule", NS, "web", {"spec": {"host": "web", **spec}}))
    (error,) = t.errors()
    assert (error.kind, error.name, error.field) == ("DestinationRule", "web", field)
    assert message in error.message
    assert cluster(t)["lbPolicy"] == "RANDOM"


def test_a_route_to_an_unknown_subset_keeps_the_last_good_routes_until_the_subset_exists() -> None:
    t = mesh(
        destination_rule({}, [{"name": "v1", "labels": {"version": "v1"}}]),
        (
            "VirtualService",
            NS,
            "web",
            {
                "spec": {
                    "hosts": ["web"],
                    "http": [{"route": [{"destination": {"host": "web", "subset": "v1"}}]}],
                }
            },
        ),
    )
    good = t.resources()[ROUTE_TYPE_URL][f"{HOST}:80"]
    canary = {
        "spec": {
            "hosts": ["web"],
            "http": [
                {
                    "route": [
                        {"destination": {"host": "web", "subset": "v1"}, "weight": 90},
                        {"destination": {"host": "web", "subset": "canary"}, "weight": 10},
                    ]
                }
            ],
        }
    }
    assert ROUTE_TYPE_URL not in t.apply(upsert("VirtualService", NS, "web", canary))
    (error,) = t.errors()
    assert (error.kind, error.name, error.field) == (
        "VirtualService",
        "web",
        "spec.http[0].route[1].destination.subset",
    )
    assert (
        "unknown subset 'canary'" in error.message
        and "shop/web has no such subset" in error.message
    )
    assert t.resources()[ROUTE_TYPE_URL][f"{HOST}:80"] == good
    # The DestinationRule gains the subset: the pending routes go out without touching the route.
    delta = t.apply(
        upsert(
            *destination_rule(
                {},
                [
                    {"name": "v1", "labels": {"version": "v1"}},
                    {"name": "canary", "labels": {"version": "v2"}},
                ],
            )
        )
    )
    assert t.errors() == []
    assert f"{HOST}:80" in delta[ROUTE_TYPE_URL].upserts
    assert f"outbound|80|canary|{HOST}" in delta[CLUSTER_TYPE_URL].upserts
