"""Spans across two chained waypoints, exported over OTLP/HTTP to a collector in the test.

    client --HBONE--> waypoint A --HBONE--> waypoint B --TCP--> backend app
                          \\__________________\\__ OTLP/HTTP --> collector (decodes
                                                               ExportTraceServiceRequest)

In process on loopback with real TLS and sockets, each waypoint configured through its
static feed with the Envoy protos istiod_lite would send. A's cluster has one endpoint:
B's address, whose HBONE listener is on :15008 like a pod's ztunnel, and B serves a service
whose address is its own.
"""

from __future__ import annotations

import random
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import trio
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2
from meshcore._gen.otlp_trace_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from meshcore._gen.otlp_trace_pb2 import Span as SpanProto

from meshcore import netio
from meshcore._gen import workload_pb2
from meshcore.hbone.handshake import client_connection
from meshcore.identity.manager import LocalCaProvider
from meshcore.identity.spiffe import Identity
from meshcore.metrics import new_registry
from meshcore.testing.pki import make_mesh_pki
from meshcore.tls.context import client_context
from waypoint.app import Waypoint
from waypoint.http1 import Http1ClientConnection, serve_http1
from waypoint.messages import BufferedBody, Request, Response
from waypoint.metrics import PeerLabels, RequestRecord
from waypoint.otlp import OtlpExporter
from waypoint.settings import HttpLimits, OtlpEndpoint, Ports, TracingSettings, WaypointSettings
from waypoint.tracing import Span, Tracer

NAMESPACE = "bookinfo"
FRONTEND = "frontend.bookinfo.svc.cluster.local"
REVIEWS = "reviews.bookinfo.svc.cluster.local"
FRONTEND_VIP = "198.18.100.20"
PORT = 9080
APP_PORT = 8080
CLIENT = Identity("cluster.local", "default", "productpage")
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"

_PKI = make_mesh_pki()


# --- the collector and the backend app ---


@dataclass
class Collector:
    """An OTLP/HTTP receiver: answers `statuses` in turn (then 200), keeps what it accepted."""

    statuses: list[int] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    exports: list[ExportTraceServiceRequest] = field(default_factory=list)
    port: int = 0
    _arrived: trio.Event = field(default_factory=trio.Event)

    async def handle(self, request: Request, respond) -> None:
        body = b""
        while chunk := await request.body.read():
            body += chunk
        assert (request.method, request.target, request.header("content-type")) == ("POST", "/v1/traces", "application/x-protobuf")
        status = self.statuses.pop(0) if self.statuses else 200
        self.answered.append(status)
        answer = b""
        if status == 200:
            self.exports.append(ExportTraceServiceRequest.FromString(body))
            answer = ExportTraceServiceResponse().SerializeToString()
            self._arrived.set()
            self._arrived = trio.Event()
        await respond(Response(status, (("content-type", "application/x-protobuf"),), BufferedBody(answer)))

    def spans(self) -> dict[str, list[SpanProto]]:
        """Spans received, by the exporting waypoint's service.name."""
        found: dict[str, list[SpanProto]] = {}
        for export in self.exports:
            for resource_spans in export.resource_spans:
                service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
                for scope_spans in resource_spans.scope_spans:
                    found.setdefault(service, []).extend(scope_spans.spans)
        return found

    async def wait_for_spans(self, count: int) -> dict[str, list[SpanProto]]:
        with trio.fail_after(10):
            while sum(map(len, self.spans().values())) < count:
                await self._arrived.wait()
        return self.spans()

    @property
    def endpoint(self) -> OtlpEndpoint:
        return OtlpEndpoint("127.0.0.1", self.port, "/v1/traces")


async def serve_collector(collector: Collector, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async def connection(stream: trio.SocketStream) -> None:
        await serve_http1(stream, collector.handle, HttpLimits())

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, connection, 0, host="127.0.0.1"))
        collector.port = listeners[0].socket.getsockname()[1]
        task_status.started()


@dataclass
class Backend:
    ip: str
    seen: list[dict[str, str]] = field(default_factory=list)

    async def handle(self, request: Request, respond) -> None:
        while await request.body.read():
            pass
        self.seen.append(dict(request.headers))
        await respond(Response(200, (("content-type", "text/plain"),), BufferedBody(b"reviews")))


async def serve_backend(backend: Backend, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async def connection(stream: trio.SocketStream) -> None:
        await serve_http1(stream, backend.handle, HttpLimits())

    await trio.serve_tcp(connection, APP_PORT, host=backend.ip, task_status=task_status)


def loopback_ips(count: int) -> list[str]:
    """Loopback addresses whose :15008 and :8080 are free (other tests may run alongside)."""
    rng = random.Random()
    while True:
        base = f"127.{rng.randrange(64, 250)}.{rng.randrange(1, 250)}"
        ips = [f"{base}.{n + 1}" for n in range(count)]
        try:
            for ip in ips:
                for port in (15008, APP_PORT):
                    netio.listen((ip, port)).close()
        except OSError:
            continue
        return ips


# --- each waypoint's config: one service, one route, one cluster with one endpoint ---


def _any(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def service_config(host: str, vip: str, upstream: str, endpoint: tuple[str, int], *, identity: str | None) -> list:
    listener_name = f"{host}:{PORT}"
    cluster_name = f"outbound|{PORT}||{upstream}"
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=listener_name,
        rds=hcm_pb2.Rds(route_config_name=listener_name, config_source=config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource())),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_any(router_pb2.Router()))],
    )
    cluster = cluster_pb2.Cluster(name=cluster_name, type=cluster_pb2.Cluster.EDS)
    cluster.eds_cluster_config.service_name = cluster_name
    cluster.metadata.filter_metadata["istio"].update({"services": [{"host": upstream, "name": upstream.split(".")[0], "namespace": NAMESPACE}]})
    metadata = base_pb2.Metadata()
    metadata.filter_metadata["istio"].update({"tunnel": "hbone", "identity": identity} if identity else {"tunnel": "tcp"})
    return [
        workload_pb2.Address(
            service=workload_pb2.Service(
                name=host.split(".")[0],
                namespace=NAMESPACE,
                hostname=host,
                addresses=[workload_pb2.NetworkAddress(address=bytes(map(int, vip.split("."))))],
                ports=[workload_pb2.Port(service_port=PORT, target_port=PORT)],
            )
        ),
        listener_pb2.Listener(
            name=listener_name,
            filter_chains=[
                listener_components_pb2.FilterChain(
                    filters=[listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager", typed_config=_any(hcm))]
                )
            ],
        ),
        route_pb2.RouteConfiguration(
            name=listener_name,
            virtual_hosts=[
                route_components_pb2.VirtualHost(
                    name=listener_name,
                    domains=["*"],
                    routes=[
                        route_components_pb2.Route(
                            match=route_components_pb2.RouteMatch(prefix="/"), route=route_components_pb2.RouteAction(cluster=cluster_name)
                        )
                    ],
                )
            ],
        ),
        cluster,
        endpoint_pb2.ClusterLoadAssignment(
            cluster_name=cluster_name,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(
                                address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=endpoint[0], port_value=endpoint[1]))
                            ),
                            metadata=metadata,
                        )
                    ]
                )
            ],
        ),
    ]


# --- the chain ---


@dataclass
class Chain:
    a: Waypoint
    b: Waypoint
    backend: Backend
    nursery: trio.Nursery

    async def get(self, target: str = "/reviews/1", headers=()) -> tuple[int, bytes]:
        cert = _PKI.ca.issue(CLIENT)
        sock = await netio.connect(self.a.hbone_address)
        conn = await client_connection(sock, client_context(cert), local_identity=CLIENT, expected=[self.a.settings.identity])
        await self.nursery.start(conn.run)
        http = Http1ClientConnection(await conn.open_tunnel(f"{FRONTEND_VIP}:{PORT}"))
        response = await http.send(Request("GET", f"{FRONTEND}:{PORT}", target, tuple(headers), BufferedBody(), "HTTP/1.1"))
        body = b""
        while chunk := await response.body.read():
            body += chunk
        return response.status, body


@asynccontextmanager
async def chain(endpoint: OtlpEndpoint):
    a_ip, b_ip, backend_ip = loopback_ips(3)
    backend = Backend(backend_ip)

    def waypoint(name: str, ip: str, hbone_port: int) -> Waypoint:
        settings = WaypointSettings(
            name=name,
            namespace=NAMESPACE,
            address=ip,
            control_plane=None,
            ports=Ports(hbone=hbone_port, metrics=0, readiness=0, admin=0),
            tracing=TracingSettings(otlp_endpoint=endpoint),
        )
        return Waypoint(settings, certificate_provider=LocalCaProvider(_PKI.ca))

    a = waypoint("waypoint-a", a_ip, 0)
    b = waypoint("waypoint-b", b_ip, 15008)  # where A's upstream dials an endpoint's HBONE
    assert a.feed.apply(service_config(FRONTEND, FRONTEND_VIP, REVIEWS, (b_ip, PORT), identity=b.settings.identity.uri)) == {}
    assert b.feed.apply(service_config(REVIEWS, b_ip, "backend.bookinfo.svc.cluster.local", (backend_ip, APP_PORT), identity=None)) == {}
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_backend, backend)
        await nursery.start(b.run)
        await nursery.start(a.run)
        yield Chain(a, b, backend, nursery)
        nursery.cancel_scope.cancel()


def counter(waypoint: Waypoint, name: str) -> float:
    return waypoint.registry.get_sample_value(name) or 0.0


async def until(condition, *, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


def attributes(span: SpanProto) -> dict[str, str]:
    return {a.key: a.value.string_value for a in span.attributes}


# --- tests ---


async def test_two_hops_make_a_parent_child_chain_under_the_clients_trace():
    async with trio.open_nursery() as outer:
        collector = Collector()
        await outer.start(serve_collector, collector)
        async with chain(collector.endpoint) as mesh:
            status, body = await mesh.get(headers=[("traceparent", f"00-{TRACE}-{CLIENT_SPAN}-01"), ("tracestate", "vendor=1")])
            assert (status, body) == (200, b"reviews")
            spans = await collector.wait_for_spans(2)
            [a], [b] = spans["waypoint-a.bookinfo"], spans["waypoint-b.bookinfo"]
            assert a.trace_id.hex() == b.trace_id.hex() == TRACE
            assert a.parent_span_id.hex() == CLIENT_SPAN
            assert b.parent_span_id == a.span_id
            # The backend's span would be B's child, and the vendor's tracestate came along.
            [seen] = mesh.backend.seen
            assert seen["traceparent"] == f"00-{TRACE}-{b.span_id.hex()}-01"
            assert seen["tracestate"] == "vendor=1"
            for span, host, cluster in ((a, FRONTEND, REVIEWS), (b, REVIEWS, "backend.bookinfo.svc.cluster.local")):
                assert span.kind == SpanProto.SPAN_KIND_SERVER
                assert span.name == f"{host}:{PORT}/*"
                found = attributes(span)
                assert (found["http.method"], found["http.status_code"], found["component"]) == ("GET", "200", "proxy")
                assert found["http.url"].endswith("/reviews/1")
                assert found["upstream_cluster"] == f"outbound|{PORT}||{cluster}"
            # B's span lies within A's: A waited for B's answer.
            assert a.start_time_unix_nano <= b.start_time_unix_nano <= b.end_time_unix_nano <= a.end_time_unix_nano
            # The exporters count once they have read the collector's answer.
            await until(lambda: counter(mesh.a, "waypoint_tracing_spans_exported_total") == counter(mesh.b, "waypoint_tracing_spans_exported_total") == 1)
        outer.cancel_scope.cancel()


async def test_a_request_without_traceparent_starts_a_trace_at_the_first_waypoint():
    async with trio.open_nursery() as outer:
        collector = Collector()
        await outer.start(serve_collector, collector)
        async with chain(collector.endpoint) as mesh:
            assert (await mesh.get())[0] == 200
            spans = await collector.wait_for_spans(2)
            [a], [b] = spans["waypoint-a.bookinfo"], spans["waypoint-b.bookinfo"]
            assert a.parent_span_id == b"" and b.parent_span_id == a.span_id
            assert a.trace_id == b.trace_id
            assert mesh.backend.seen[0]["traceparent"] == f"00-{a.trace_id.hex()}-{b.span_id.hex()}-01"
        outer.cancel_scope.cancel()


async def test_spans_arrive_after_the_collector_answers_503():
    async with trio.open_nursery() as outer:
        collector = Collector(statuses=[503, 503])
        await outer.start(serve_collector, collector)
        async with chain(collector.endpoint) as mesh:
            assert (await mesh.get(headers=[("traceparent", f"00-{TRACE}-{CLIENT_SPAN}-01")]))[0] == 200
            spans = await collector.wait_for_spans(2)
            assert sorted(spans) == ["waypoint-a.bookinfo", "waypoint-b.bookinfo"]
            assert collector.answered.count(503) == 2
            assert counter(mesh.a, "waypoint_tracing_spans_failed_total") == counter(mesh.b, "waypoint_tracing_spans_failed_total") == 0
        outer.cancel_scope.cancel()


async def test_requests_are_served_while_the_collector_is_down_and_lost_spans_are_counted():
    closed = netio.listen(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: every export is refused
    async with chain(OtlpEndpoint("127.0.0.1", port, "/v1/traces")) as mesh:
        with trio.fail_after(2):  # the exporters retrying must not hold requests up
            assert (await mesh.get())[0] == 200
            assert (await mesh.get())[0] == 200
        await until(lambda: counter(mesh.a, "waypoint_tracing_spans_failed_total") + counter(mesh.b, "waypoint_tracing_spans_failed_total") == 4, timeout=20)
        assert counter(mesh.a, "waypoint_tracing_spans_exported_total") == 0


def _spans(count: int) -> list[Span]:
    spans: list[Span] = []
    tracer = Tracer(export=spans.append)
    for n in range(count):
        hop = tracer.start((), now_unix_nano=n)
        tracer.finish(hop, _record(), operation="op", now_unix_nano=n + 1)
    return spans


def _record() -> RequestRecord:
    return RequestRecord(
        source=PeerLabels(), source_address="127.0.0.1:1", destination=PeerLabels(), destination_address=None,
        service_host=None, service_name=None, service_namespace=None, method="GET", authority="a:80", path="/",
        protocol="http", http_version="HTTP/1.1", response_code=200, response_flags="-",
        response_code_details="via_upstream", grpc_status="", duration_ms=1.0, request_bytes=0, response_bytes=0,
        upstream_cluster=None, attempts=1, trace_id="",
    )  # fmt: skip


async def test_a_full_queue_drops_and_counts_and_shutdown_exports_what_was_queued():
    async with trio.open_nursery() as outer:
        collector = Collector()
        await outer.start(serve_collector, collector)
        registry = new_registry()
        exporter = OtlpExporter(collector.endpoint, service_name="wp.ns", registry=registry, queue_size=3)
        for span in _spans(5):
            exporter.submit(span)
        assert registry.get_sample_value("waypoint_tracing_spans_dropped_total") == 2
        outer.start_soon(exporter.run)
        with trio.fail_after(5):
            await exporter.aclose()
        assert [len(e.resource_spans[0].scope_spans[0].spans) for e in collector.exports] == [3]  # one batch
        assert registry.get_sample_value("waypoint_tracing_spans_exported_total") == 3
        exporter.submit(_spans(1)[0])  # after shutdown: dropped, not an error
        assert registry.get_sample_value("waypoint_tracing_spans_dropped_total") == 3
        outer.cancel_scope.cancel()


async def test_a_collector_refusing_the_payload_is_not_retried():
    async with trio.open_nursery() as outer:
        collector = Collector(statuses=[400])
        await outer.start(serve_collector, collector)
        registry = new_registry()
        exporter = OtlpExporter(collector.endpoint, service_name="wp.ns", registry=registry)
        for span in _spans(2):
            exporter.submit(span)
        outer.start_soon(exporter.run)
        with trio.fail_after(5):
            await exporter.aclose()
        assert collector.answered == [400]
        assert registry.get_sample_value("waypoint_tracing_spans_failed_total") == 2
        outer.cancel_scope.cancel()
