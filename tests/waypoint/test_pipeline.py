"""The request pipeline driven directly: a config snapshot built from the model, a scripted
upstream instead of sockets, and a virtual clock where time matters."""

from __future__ import annotations

import random
from types import MappingProxyType

import pytest
import trio
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2

from meshcore.identity.spiffe import Identity
from meshcore.metrics import new_registry
from waypoint.config.model import (
    AnyRequest,
    AuthenticatedCondition,
    AuthzPolicy,
    ClusterConfig,
    ClusterEndpoints,
    Endpoint,
    HeaderToAdd,
    Limits,
    OutlierConfig,
    Rbac,
    RbacAction,
    RbacPolicy,
    RetryPolicy,
    Route,
    RouteAction,
    RouteMatch,
    RouteTable,
    ServiceRef,
    ServiceRoutes,
    StringMatch,
    StringMatchKind,
    Tunnel,
    WeightedBackend,
)
from waypoint.feeds import ServiceInfo, ServicePort, StaticFeed, WaypointSnapshot, WaypointStore
from waypoint.messages import BufferedBody, Request, Response
from waypoint.metrics import WaypointMetrics
from waypoint.pipeline import Downstream, Pipeline
from waypoint.settings import HttpLimits
from waypoint.upstream import UpstreamConnectFailed

HOST = "ratings.shop.svc.cluster.local"
LISTENER = f"{HOST}:9080"
CLIENT = Identity("cluster.local", "shop", "frontend")
DOWNSTREAM = Downstream(
    listener=LISTENER,
    service=ServiceInfo("ratings", "shop", HOST, ("198.18.0.20",), (ServicePort(9080, 9080, None),)),
    port=9080,
    client_identity=CLIENT,
    client_address=("198.18.1.7", 40000),
)
A = Endpoint("10.0.0.1", 9080, "spiffe://cluster.local/ns/shop/sa/ratings", Tunnel.HBONE, workload="shop/ratings-a")
B = Endpoint("10.0.0.2", 9080, "spiffe://cluster.local/ns/shop/sa/ratings", Tunnel.HBONE, workload="shop/ratings-b")


class ScriptedUpstreams:
    """Answers per endpoint address from a script: a status, an exception, or ("slow", s)."""

    def __init__(self, script: dict[str, list] | None = None) -> None:
        self.script = script or {}
        self.calls: list[tuple[str, Request, bytes]] = []

    async def send(self, cluster, limits, endpoint, request, *, http2, tunnel_headers=()):
        body = b""
        while chunk := await request.body.read():
            body += chunk
        self.calls.append((endpoint.address, request, body))
        steps = self.script.get(endpoint.address, [])
        step = steps.pop(0) if steps else 200
        if isinstance(step, Exception):
            raise step
        if isinstance(step, tuple):
            await trio.sleep(step[1])
            step = 200
        return Response(step, (("x-from", endpoint.address), ("server", "app")), BufferedBody(b"answer from " + endpoint.address.encode()))


def make_pipeline(action: RouteAction, *, upstreams=None, cluster: ClusterConfig | None = None, authz=AuthzPolicy(), endpoints=(A, B), limits=HttpLimits()):
    cluster = cluster or ClusterConfig("c", service=ServiceRef(HOST, "ratings", "shop"))
    route = Route(RouteMatch(path=StringMatch(StringMatchKind.PREFIX, "/")), action)
    store = WaypointStore()
    store.publish(
        WaypointSnapshot(
            version=1,
            routes=RouteTable(MappingProxyType({LISTENER: ServiceRoutes(HOST, 9080, (route,), authz)})),
            clusters=MappingProxyType({cluster.name: cluster}),
            endpoints=MappingProxyType({cluster.name: ClusterEndpoints(cluster.name, tuple(endpoints))}),
        )
    )
    registry = new_registry()
    upstreams = upstreams or ScriptedUpstreams()
    pipeline = Pipeline(store, upstreams, WaypointMetrics(registry), limits, rng=random.Random(1))
    return pipeline, upstreams, registry


async def call(pipeline: Pipeline, *, method="GET", target="/ratings/1", headers=(), body=b"") -> tuple[Response, bytes]:
    answers: list[tuple[Response, bytes]] = []

    async def respond(response: Response) -> None:
        data = b""
        while chunk := await response.body.read():
            data += chunk
        answers.append((response, data))

    request = Request(method, f"{HOST}:9080", target, tuple(headers), BufferedBody(body), "HTTP/1.1")
    await pipeline.handle(DOWNSTREAM, request, respond)
    assert len(answers) == 1
    return answers[0]


def sample(registry, **labels) -> float:
    return sum(
        s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == "istio_requests_total" and all(s.labels.get(k) == v for k, v in labels.items())
    )


def action(**kwargs) -> RouteAction:
    return RouteAction(backends=(WeightedBackend("c"),), **{"timeout": None, **kwargs})


async def test_without_span_export_the_clients_trace_context_goes_upstream_unchanged():
    # Tracing with export is tested in test_tracing.py and test_tracing_otlp.py.
    pipeline, upstreams, _ = make_pipeline(action())
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    await call(pipeline, headers=[("traceparent", incoming), ("tracestate", "vendor=abc")])
    sent = dict(upstreams.calls[0][1].headers)
    assert (sent["traceparent"], sent["tracestate"]) == (incoming, "vendor=abc")
    await call(pipeline, headers=[("traceparent", "garbage")])
    assert len(dict(upstreams.calls[1][1].headers)["traceparent"]) == 55


async def test_retry_moves_on_after_a_connect_failure_and_resends_the_body():
    retry = RetryPolicy(num_retries=2, retry_on=frozenset({"connect-failure"}))
    upstreams = ScriptedUpstreams({"10.0.0.1": [UpstreamConnectFailed("refused")]})
    pipeline, upstreams, registry = make_pipeline(action(retry=retry), upstreams=upstreams)
    response, body = await call(pipeline, method="POST", body=b"stars=5")
    assert (response.status, body) == (200, b"answer from 10.0.0.2")
    assert [(address, sent) for address, _, sent in upstreams.calls] == [("10.0.0.1", b"stars=5"), ("10.0.0.2", b"stars=5")]
    assert sample(registry, response_code="200", response_flags="-") == 1


async def test_connect_failure_without_retries_is_503_uf():
    upstreams = ScriptedUpstreams({"10.0.0.1": [UpstreamConnectFailed("refused")]})
    pipeline, _, registry = make_pipeline(action(), upstreams=upstreams, endpoints=(A,))
    response, body = await call(pipeline)
    assert response.status == 503
    assert body.endswith(b"reset reason: connection failure")
    assert sample(registry, response_code="503", response_flags="UF") == 1


async def test_connect_failures_beyond_the_retries_are_503_uf_urx():
    retry = RetryPolicy(num_retries=1, retry_on=frozenset({"connect-failure"}))
    upstreams = ScriptedUpstreams({"10.0.0.1": [UpstreamConnectFailed("refused")] * 2})
    pipeline, upstreams, registry = make_pipeline(action(retry=retry), upstreams=upstreams, endpoints=(A,))
    response, _ = await call(pipeline)
    assert response.status == 503
    assert len(upstreams.calls) == 2
    assert sample(registry, response_code="503", response_flags="UF,URX") == 1


async def test_body_larger_than_the_retry_buffer_is_not_replayed():
    retry = RetryPolicy(num_retries=2, retry_on=frozenset({"5xx"}))
    upstreams = ScriptedUpstreams({"10.0.0.1": [503]})
    pipeline, upstreams, _ = make_pipeline(action(retry=retry), upstreams=upstreams, endpoints=(A,), limits=HttpLimits(retry_buffer_bytes=4))
    response, _ = await call(pipeline, method="POST", body=b"more than four bytes")
    assert response.status == 503
    assert len(upstreams.calls) == 1


async def test_outlier_ejects_an_endpoint_after_five_5xx_and_takes_it_back(autojump_clock):
    outlier = OutlierConfig(consecutive_5xx=5, interval=1.0, base_ejection_time=10.0, max_ejection_percent=50)
    cluster = ClusterConfig("c", outlier=outlier)
    upstreams = ScriptedUpstreams({"10.0.0.1": [500] * 5})
    pipeline, upstreams, _ = make_pipeline(action(), upstreams=upstreams, cluster=cluster)
    for _ in range(10):  # round robin: five to each, A fails all five
        await call(pipeline)
    upstreams.calls.clear()
    for _ in range(6):
        assert (await call(pipeline))[0].status == 200
    assert {address for address, _, _ in upstreams.calls} == {"10.0.0.2"}
    await trio.sleep(11.0)
    upstreams.calls.clear()
    for _ in range(4):
        await call(pipeline)
    assert {address for address, _, _ in upstreams.calls} == {"10.0.0.1", "10.0.0.2"}


async def test_per_try_timeout_retries_then_route_timeout_answers_504(autojump_clock):
    retry = RetryPolicy(num_retries=5, per_try_timeout=1.0, retry_on=frozenset({"5xx"}))
    upstreams = ScriptedUpstreams({"10.0.0.1": [("slow", 30)] * 10})
    pipeline, upstreams, registry = make_pipeline(action(retry=retry, timeout=2.5), upstreams=upstreams, endpoints=(A,))
    start = trio.current_time()
    response, body = await call(pipeline)
    assert (response.status, body) == (504, b"upstream request timeout")
    assert trio.current_time() - start == pytest.approx(2.5, abs=0.01)
    assert len(upstreams.calls) == 3  # two per-try timeouts, the third cut by the route timeout
    assert sample(registry, response_code="504", response_flags="UT") == 1


async def test_grpc_request_denied_gets_permission_denied_as_grpc_status():
    deny_all = Rbac(RbacAction.ALLOW, (RbacPolicy("only-admin", (AnyRequest(),), (AuthenticatedCondition(StringMatch(StringMatchKind.EXACT, "spiffe://cluster.local/ns/shop/sa/admin")),)),))
    pipeline, upstreams, registry = make_pipeline(action(), authz=AuthzPolicy(allow=deny_all))
    response, _ = await call(pipeline, method="POST", headers=[("content-type", "application/grpc")])
    assert response.status == 200
    assert dict(response.body.trailers)["grpc-status"] == "7"
    assert upstreams.calls == []
    assert sample(registry, response_code="200", request_protocol="grpc", grpc_response_status="7") == 1


async def test_header_changes_and_prefix_rewrite_apply_on_the_way():
    pipeline, upstreams, _ = make_pipeline(
        action(
            prefix_rewrite="/v2/",
            host_rewrite="ratings-v2.shop",
            request_headers_to_add=(HeaderToAdd("x-canary", "yes"),),
            request_headers_to_remove=("x-internal",),
            response_headers_to_remove=("server",),
        )
    )
    response, _ = await call(pipeline, target="/ratings/1?x=1", headers=[("x-internal", "secret")])
    sent = upstreams.calls[0][1]
    assert sent.target == "/v2/ratings/1?x=1"
    assert sent.authority == "ratings-v2.shop"
    assert dict(sent.headers).get("x-canary") == "yes" and "x-internal" not in dict(sent.headers)
    assert "server" not in dict(response.headers)


async def test_no_endpoints_is_503_uh():
    pipeline, _, registry = make_pipeline(action(), endpoints=())
    response, body = await call(pipeline)
    assert (response.status, body) == (503, b"no healthy upstream")
    assert sample(registry, response_code="503", response_flags="UH") == 1


async def test_requests_over_max_requests_overflow_with_503_uo():
    cluster = ClusterConfig("c", limits=Limits(max_requests=1))
    upstreams = ScriptedUpstreams({"10.0.0.1": [("slow", 0.2)]})
    pipeline, _, registry = make_pipeline(action(), upstreams=upstreams, cluster=cluster, endpoints=(A,))
    statuses = []

    async def one() -> None:
        statuses.append((await call(pipeline))[0].status)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        await trio.sleep(0.05)
        nursery.start_soon(one)
    assert sorted(statuses) == [200, 503]
    assert sample(registry, response_flags="UO") == 1


async def test_a_rejected_route_config_keeps_the_last_good_one_serving():
    store = WaypointStore()
    feed = StaticFeed(store)

    def config(regex: str) -> route_pb2.RouteConfiguration:
        route = route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(safe_regex={"regex": regex}),
            route=route_components_pb2.RouteAction(cluster="c"),
        )
        return route_pb2.RouteConfiguration(name=LISTENER, virtual_hosts=[route_components_pb2.VirtualHost(name="vh", domains=["*"], routes=[route])])

    hcm = hcm_pb2.HttpConnectionManager(
        rds=hcm_pb2.Rds(route_config_name=LISTENER),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_any(router_pb2.Router()))],
    )
    listener = listener_pb2.Listener(
        name=LISTENER, filter_chains=[listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(name="hcm", typed_config=_any(hcm))])]
    )
    assert feed.apply([listener, config("/ratings/.*")]) == {}
    errors = feed.apply([config("/ratings/(")])
    assert list(errors) == [LISTENER] and "regex" in errors[LISTENER]
    (route,) = store.current.routes.services[LISTENER].routes
    assert route.match.path.value == "/ratings/.*"


def _any(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
