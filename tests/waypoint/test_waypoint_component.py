"""The waypoint end to end on loopback, in process, with real TLS and real sockets.

    client --HBONE (client identity)--> waypoint --HBONE (waypoint identity)--> fake ztunnel --TCP--> echo pod

The waypoint is configured with Envoy protos built here (as istiod_lite would send them),
through its static feed: the same conversion as over xDS. Each pod has its own loopback
address (127.x.y.z), with a ztunnel-like HBONE server on :15008 that checks nothing but
records the identity it saw, and an echo app on :8080 that reports which pod answered.
"""

from __future__ import annotations

import json
import random
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from meshcore import netio
from meshcore._gen import workload_pb2
from meshcore.hbone.connection import TunnelRequest
from meshcore.hbone.errors import TunnelRejected
from meshcore.hbone.handshake import client_connection, server_connection
from meshcore.identity.manager import LocalCaProvider
from meshcore.identity.spiffe import Identity
from meshcore.testing.pki import make_mesh_pki
from meshcore.tls.context import client_context, server_context
from waypoint.__main__ import main
from waypoint.app import Waypoint
from waypoint.http1 import Http1ClientConnection, serve_http1
from waypoint.http2 import Http2ClientConnection, serve_http2
from waypoint.messages import BufferedBody, Request, Response
from waypoint.settings import HttpLimits, Ports, WaypointSettings

NAMESPACE = "bookinfo"
HOST = "reviews.bookinfo.svc.cluster.local"
VIP = "198.18.100.10"
PORT = 9080
APP_PORT = 8080
LISTENER = f"{HOST}:{PORT}"
WAYPOINT_IDENTITY = Identity("cluster.local", NAMESPACE, "waypoint")


# --- the pods: an echo app behind a ztunnel-like HBONE server ---


@dataclass
class Pod:
    name: str
    version: str
    ip: str
    identity: Identity
    statuses: list[int] = field(default_factory=list)  # answered in turn, then 200
    delay: float = 0.0
    seen: list[dict] = field(default_factory=list)
    tunnel_peers: list[str] = field(default_factory=list)

    async def handle(self, request: Request, respond) -> None:
        if request.path == "/grpc.Echo/Stream":  # bidirectional: each message echoed as it arrives
            await respond(Response(200, (("content-type", "application/grpc"),), StreamingEcho(request.body)))
            return
        body = b""
        while chunk := await request.body.read():
            body += chunk
        self.seen.append({"method": request.method, "target": request.target, "headers": dict(request.headers), "body": body})
        if self.delay:
            await trio.sleep(self.delay)
        status = self.statuses.pop(0) if self.statuses else 200
        if request.path.startswith("/grpc"):
            trailers = (("grpc-status", "0"), ("grpc-message", self.name))
            await respond(Response(200, (("content-type", "application/grpc"),), BufferedBody(body, trailers)))
            return
        payload = json.dumps({"pod": self.name, "version": self.version, "target": request.target}).encode()
        await respond(Response(status, (("content-type", "application/json"), ("x-pod", self.name)), BufferedBody(payload)))


class StreamingEcho:
    def __init__(self, source) -> None:
        self._source = source

    async def read(self) -> bytes:
        return await self._source.read()

    @property
    def trailers(self):
        return (("grpc-status", "0"),)

    async def aclose(self) -> None:
        pass


class QueueBody:
    """A request body the test feeds message by message."""

    def __init__(self) -> None:
        self.send, self._receive = trio.open_memory_channel[bytes](10)

    async def read(self) -> bytes:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            return b""

    @property
    def trailers(self):
        return ()

    async def aclose(self) -> None:
        pass


async def serve_pod(pod: Pod, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The echo app on pod.ip:8080 and a ztunnel-like HBONE server on pod.ip:15008."""
    pki_cert = _PKI.ca.issue(pod.identity)
    app_listener = netio.listen((pod.ip, APP_PORT))
    hbone_listener = netio.listen((pod.ip, 15008))

    async def serve_app_connection(sock) -> None:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        async with stream:
            first = await stream.receive_some(24)
            if first.startswith(b"PRI * HTTP/2.0"):
                first += await stream.receive_some(24 - len(first)) if len(first) < 24 else b""
                await serve_http2(stream, pod.handle, HttpLimits(), initial=first)
            else:
                await serve_http1(stream, pod.handle, HttpLimits(), initial=first)

    async def on_tunnel(request: TunnelRequest) -> None:
        pod.tunnel_peers.append(str(request.peer_identity))
        host, _, port = request.authority.rpartition(":")
        try:
            upstream = await netio.connect((host, int(port)))
        except OSError:
            request.reject(503)
            return
        try:
            tunnel = request.accept()
            await tunnel.relay(upstream)
        except (trio.BrokenResourceError, OSError):
            pass
        finally:
            netio.close(upstream)

    async def serve_hbone_connection(sock) -> None:
        conn = await server_connection(
            sock, server_context(pki_cert), local_identity=pod.identity, trust_domain="cluster.local", on_request=on_tunnel
        )
        await conn.run()

    async def accept(listener, handler, nursery) -> None:
        while True:
            sock, _ = await netio.accept(listener)
            nursery.start_soon(handler, sock)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept, app_listener, serve_app_connection, nursery)
            nursery.start_soon(accept, hbone_listener, serve_hbone_connection, nursery)
            task_status.started()
    finally:
        netio.close(app_listener)
        netio.close(hbone_listener)


_PKI = make_mesh_pki()


def pod_ips(count: int) -> list[str]:
    """Loopback addresses whose :15008 is free (tests of other modules may run alongside)."""
    rng = random.Random()
    while True:
        base = f"127.{rng.randrange(64, 250)}.{rng.randrange(1, 250)}"
        ips = [f"{base}.{n + 1}" for n in range(count)]
        try:
            for ip in ips:
                netio.listen((ip, 15008)).close()
        except OSError:
            continue
        return ips


# --- Envoy config, as istiod_lite sends it ---


def _any(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def listener(*, allow_principal: str | None = None) -> listener_pb2.Listener:
    filters = []
    if allow_principal is not None:
        policy = rbac_config_pb2.Policy(
            permissions=[rbac_config_pb2.Permission(any=True)],
            principals=[
                rbac_config_pb2.Principal(
                    authenticated=rbac_config_pb2.Principal.Authenticated(principal_name=string_pb2.StringMatcher(exact=allow_principal))
                )
            ],
        )
        rules = rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.ALLOW, policies={"ns[bookinfo]-policy[allow-one]-rule[0]": policy})
        filters.append(hcm_pb2.HttpFilter(name="envoy.filters.http.rbac", typed_config=_any(rbac_pb2.RBAC(rules=rules))))
    filters.append(hcm_pb2.HttpFilter(name="envoy.filters.http.fault", typed_config=_any(fault_pb2.HTTPFault())))
    filters.append(hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())))
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=LISTENER,
        rds=hcm_pb2.Rds(route_config_name=LISTENER, config_source=config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource())),
        http_filters=filters,
    )
    return listener_pb2.Listener(
        name=LISTENER,
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager", typed_config=_any(hcm))]
            )
        ],
    )


def cluster_name(subset: str) -> str:
    return f"outbound|{PORT}|{subset}|{HOST}"


def route(*, clusters: dict[str, int], header: tuple[str, str] | None = None, timeout: float = 0, retries: int = 0, fault_status: int | None = None) -> route_components_pb2.Route:
    match = route_components_pb2.RouteMatch(prefix="/")
    if header is not None:
        match.headers.append(route_components_pb2.HeaderMatcher(name=header[0], string_match=string_pb2.StringMatcher(exact=header[1])))
    action = route_components_pb2.RouteAction(
        weighted_clusters=route_components_pb2.WeightedCluster(
            clusters=[
                route_components_pb2.WeightedCluster.ClusterWeight(name=cluster_name(subset), weight=wrappers_pb2.UInt32Value(value=weight))
                for subset, weight in clusters.items()
            ]
        ),
        timeout=_duration(timeout),
    )
    if retries:
        action.retry_policy.CopyFrom(route_components_pb2.RetryPolicy(retry_on="5xx", num_retries=wrappers_pb2.UInt32Value(value=retries)))
    result = route_components_pb2.Route(match=match, route=action)
    if fault_status is not None:
        fault = fault_pb2.HTTPFault()
        fault.abort.http_status = fault_status
        fault.abort.percentage.CopyFrom(percent_pb2.FractionalPercent(numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED))
        result.typed_per_filter_config["envoy.filters.http.fault"].CopyFrom(_any(fault))
    return result


def route_config(*routes: route_components_pb2.Route) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=LISTENER, virtual_hosts=[route_components_pb2.VirtualHost(name=LISTENER, domains=["*"], routes=list(routes))]
    )


def cluster(subset: str, *, max_connections: int | None = None, max_pending: int | None = None) -> cluster_pb2.Cluster:
    msg = cluster_pb2.Cluster(name=cluster_name(subset), type=cluster_pb2.Cluster.EDS, lb_policy=cluster_pb2.Cluster.ROUND_ROBIN)
    msg.eds_cluster_config.service_name = cluster_name(subset)
    msg.metadata.filter_metadata["istio"].update({"services": [{"host": HOST, "name": "reviews", "namespace": NAMESPACE}]})
    if max_connections is not None:
        msg.circuit_breakers.thresholds.append(
            circuit_breaker_pb2.CircuitBreakers.Thresholds(
                max_connections=wrappers_pb2.UInt32Value(value=max_connections),
                max_pending_requests=wrappers_pb2.UInt32Value(value=max_pending or 1),
            )
        )
    return msg


def assignment(subset: str, pods: list[Pod], *, tunnel: str = "hbone") -> endpoint_pb2.ClusterLoadAssignment:
    endpoints = []
    for pod in pods:
        metadata = base_pb2.Metadata()
        metadata.filter_metadata["istio"].update({"workload": f"{NAMESPACE}/{pod.name}", "identity": pod.identity.uri, "tunnel": tunnel})
        endpoints.append(
            endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(
                    address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=pod.ip, port_value=APP_PORT))
                ),
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
                metadata=metadata,
            )
        )
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster_name(subset), endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=endpoints)]
    )


def service_address(app_protocol: int = workload_pb2.UNKNOWN) -> workload_pb2.Address:
    return workload_pb2.Address(
        service=workload_pb2.Service(
            name="reviews",
            namespace=NAMESPACE,
            hostname=HOST,
            addresses=[workload_pb2.NetworkAddress(address=bytes(map(int, VIP.split("."))))],
            ports=[workload_pb2.Port(service_port=PORT, target_port=APP_PORT, app_protocol=app_protocol)],
        )
    )


def workload_address(pod: Pod) -> workload_pb2.Address:
    return workload_pb2.Address(
        workload=workload_pb2.Workload(
            uid=f"Kubernetes//Pod/{NAMESPACE}/{pod.name}",
            name=pod.name,
            namespace=NAMESPACE,
            addresses=[bytes(map(int, pod.ip.split(".")))],
            service_account=pod.identity.service_account,
            workload_name=f"reviews-{pod.version}",
            canonical_name="reviews",
            canonical_revision=pod.version,
        )
    )


# --- the mesh ---


@dataclass
class Mesh:
    waypoint: Waypoint
    v1: Pod
    v2: Pod
    nursery: trio.Nursery

    def configure(self, *routes, allow_principal: str | None = None, app_protocol: int = workload_pb2.UNKNOWN, **cluster_options) -> None:
        errors = self.waypoint.feed.apply(
            [
                service_address(app_protocol),
                workload_address(self.v1),
                workload_address(self.v2),
                listener(allow_principal=allow_principal),
                route_config(*routes),
                cluster("v1", **cluster_options),
                cluster("v2"),
                assignment("v1", [self.v1]),
                assignment("v2", [self.v2]),
            ]
        )
        assert errors == {}

    async def client(self, *, identity: Identity | None = None):
        """An HBONE connection to the waypoint, as the client's ztunnel opens it."""
        cert = _PKI.ca.issue(identity or Identity("cluster.local", "default", "productpage"))
        sock = await netio.connect(self.waypoint.hbone_address)
        conn = await client_connection(sock, client_context(cert), local_identity=cert.identity, expected=[WAYPOINT_IDENTITY])
        await self.nursery.start(conn.run)
        return conn

    async def http1(self, **kwargs) -> Http1ClientConnection:
        conn = await self.client(**kwargs)
        return Http1ClientConnection(await conn.open_tunnel(f"{VIP}:{PORT}"))


@asynccontextmanager
async def running_mesh(**waypoint_options):
    ip1, ip2, waypoint_ip = pod_ips(3)
    v1 = Pod("reviews-v1-abc", "v1", ip1, Identity("cluster.local", NAMESPACE, "reviews-v1"))
    v2 = Pod("reviews-v2-def", "v2", ip2, Identity("cluster.local", NAMESPACE, "reviews-v2"))
    settings = WaypointSettings(
        name="waypoint",
        namespace=NAMESPACE,
        address=waypoint_ip,
        control_plane=None,
        ports=Ports(hbone=0, metrics=0, readiness=0, admin=0),
        http=HttpLimits(max_header_bytes=8192, header_timeout=2.0),
    )
    waypoint = Waypoint(settings, certificate_provider=LocalCaProvider(_PKI.ca), rng=random.Random(7), **waypoint_options)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_pod, v1)
        await nursery.start(serve_pod, v2)
        await nursery.start(waypoint.run)
        yield Mesh(waypoint, v1, v2, nursery)
        nursery.cancel_scope.cancel()


async def get(connection: Http1ClientConnection, target: str = "/reviews/1", headers=()) -> tuple[int, dict, bytes]:
    response = await connection.send(Request("GET", f"{HOST}:{PORT}", target, tuple(headers), BufferedBody(), "HTTP/1.1"))
    body = b""
    while chunk := await response.body.read():
        body += chunk
    return response.status, dict(response.headers), body


def requests_total(waypoint: Waypoint, **labels: str) -> float:
    total = 0.0
    for family in waypoint.registry.collect():
        if family.name != "istio_requests":
            continue
        for sample in family.samples:
            if sample.name == "istio_requests_total" and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# --- tests ---


async def test_header_route_sends_jason_to_v2_and_everyone_else_to_v1():
    async with running_mesh() as mesh:
        mesh.configure(route(clusters={"v2": 1}, header=("end-user", "jason")), route(clusters={"v1": 1}))
        connection = await mesh.http1()
        status, headers, body = await get(connection, headers=[("end-user", "jason")])
        assert (status, json.loads(body)["pod"]) == (200, "reviews-v2-def")
        status, headers, body = await get(connection)
        assert (status, json.loads(body)["pod"]) == (200, "reviews-v1-abc")
        # The pods' ztunnels saw the waypoint's identity, and the app a traceparent.
        assert mesh.v1.tunnel_peers == [WAYPOINT_IDENTITY.uri]
        assert len(mesh.v1.seen[0]["headers"]["traceparent"]) == 55
        labels = dict(
            reporter="waypoint",
            source_principal="spiffe://cluster.local/ns/default/sa/productpage",
            destination_workload="reviews-v1",
            destination_version="v1",
            destination_service=HOST,
            destination_principal=mesh.v1.identity.uri,
            response_code="200",
            response_flags="-",
        )
        assert requests_total(mesh.waypoint, **labels) == 1


async def test_ninety_ten_split_lands_near_ninety_percent():
    async with running_mesh() as mesh:
        mesh.configure(route(clusters={"v1": 90, "v2": 10}))
        connection = await mesh.http1()
        for _ in range(300):
            status, _, _ = await get(connection)
            assert status == 200
        share = len(mesh.v1.seen) / 300
        assert 0.84 <= share <= 0.96, share
        assert len(mesh.v1.tunnel_peers) == 1  # one kept-alive upstream connection


async def test_retry_turns_a_flaky_backends_503s_into_200():
    async with running_mesh() as mesh:
        mesh.configure(route(clusters={"v1": 1}, retries=3))
        mesh.v1.statuses = [503, 503]
        status, _, body = await get(await mesh.http1())
        assert status == 200
        assert len(mesh.v1.seen) == 3


async def test_retries_exhausted_return_the_last_answer_with_urx():
    async with running_mesh() as mesh:
        mesh.configure(route(clusters={"v1": 1}, retries=1))
        mesh.v1.statuses = [503, 503, 503]
        status, _, _ = await get(await mesh.http1())
        assert status == 503
        assert requests_total(mesh.waypoint, response_code="503", response_flags="URX") == 1


async def test_route_timeout_answers_504():
    async with running_mesh() as mesh:
        mesh.configure(route(clusters={"v1": 1}, timeout=0.2))
        mesh.v1.delay = 5.0
        with trio.fail_after(3):
            status, _, body = await get(await mesh.http1())
        assert (status, body) == (504, b"upstream request timeout")
        assert requests_total(mesh.waypoint, response_code="504", response_flags="UT") == 1


async def test_fault_abort_answers_without_reaching_the_backend():
    async with running_mesh() as mesh:
        mesh.configure(route(clusters={"v1": 1}, fault_status=418))
        status, _, body = await get(await mesh.http1())
        assert (status, body) == (418, b"fault filter abort")
        assert mesh.v1.seen == []
        assert requests_total(mesh.waypoint, response_code="418", response_flags="FI") == 1


async def test_policy_denies_other_principals_and_a_change_applies_to_the_open_connection():
    async with running_mesh() as mesh:
        mesh.configure(route(clusters={"v1": 1}), allow_principal="spiffe://cluster.local/ns/default/sa/admin")
        connection = await mesh.http1()
        status, _, body = await get(connection)
        assert (status, body) == (403, b"RBAC: access denied")
        assert mesh.v1.seen == []
        mesh.configure(route(clusters={"v1": 1}), allow_principal="spiffe://cluster.local/ns/default/sa/productpage")
        status, _, _ = await get(connection)
        assert status == 200


async def test_grpc_over_http2_keeps_trailers():
    async with running_mesh() as mesh:
        mesh.configure(route(clusters={"v1": 1}), app_protocol=workload_pb2.GRPC)
        conn = await mesh.client()
        h2 = Http2ClientConnection(await conn.open_tunnel(f"{VIP}:{PORT}"))
        await mesh.nursery.start(h2.run)
        request = Request("POST", f"{HOST}:{PORT}", "/grpc.Echo/Say", (("content-type", "application/grpc"),), BufferedBody(b"\x00\x00\x00\x00\x02hi"), "HTTP/2")
        response = await h2.send(request)
        body = b""
        while chunk := await response.body.read():
            body += chunk
        assert response.status == 200
        assert body == b"\x00\x00\x00\x00\x02hi"
        assert dict(response.body.trailers)["grpc-status"] == "0"
        assert requests_total(mesh.waypoint, request_protocol="grpc", grpc_response_status="0") == 1


async def test_connection_pool_overflow_answers_503_uo():
    async with running_mesh() as mesh:
        mesh.configure(route(clusters={"v1": 1}), max_connections=1, max_pending=1)
        mesh.v1.delay = 0.5
        statuses: list[int] = []

        async def one() -> None:
            statuses.append((await get(await mesh.http1()))[0])

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one)
        assert sorted(statuses) == [200, 200, 503, 503]
        assert requests_total(mesh.waypoint, response_code="503", response_flags="UO") == 2


async def raw_exchange(mesh: Mesh, raw: bytes) -> bytes:
    conn = await mesh.client()
    tunnel = await conn.open_tunnel(f"{VIP}:{PORT}")
    await tunnel.send_all(raw)
    answer = b""
    with trio.fail_after(5):
        while chunk := await tunnel.receive_some(65536):
            answer += chunk
    return answer


async def test_oversized_headers_get_431():
    async with running_mesh() as mesh:
        mesh.configure(route(clusters={"v1": 1}))
        answer = await raw_exchange(mesh, b"GET / HTTP/1.1\r\nHost: reviews\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431 ")
        assert mesh.v1.seen == []


async def test_request_smuggling_gets_400_and_never_reaches_the_backend():
    async with running_mesh() as mesh:
        mesh.configure(route(clusters={"v1": 1}))
        answer = await raw_exchange(
            mesh,
            b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: reviews\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert answer.count(b"HTTP/1.1") == 1
        assert mesh.v1.seen == []


async def test_connect_to_an_address_without_a_service_is_refused():
    async with running_mesh() as mesh:
        mesh.configure(route(clusters={"v1": 1}))
        conn = await mesh.client()
        with pytest.raises(TunnelRejected) as refused:
            await conn.open_tunnel(f"198.18.100.99:{PORT}")
        assert refused.value.status == 503


async def test_http2_client_is_detected_when_the_port_does_not_say():
    async with running_mesh() as mesh:
        mesh.configure(route(clusters={"v1": 1}))
        conn = await mesh.client()
        h2 = Http2ClientConnection(await conn.open_tunnel(f"{VIP}:{PORT}"))
        await mesh.nursery.start(h2.run)
        response = await h2.send(Request("GET", f"{HOST}:{PORT}", "/reviews/2", (), BufferedBody(), "HTTP/2"))
        body = b""
        while chunk := await response.body.read():
            body += chunk
        assert response.status == 200
        assert json.loads(body)["target"] == "/reviews/2"


async def test_grpc_bidirectional_stream_flows_both_ways_through_the_waypoint():
    async with running_mesh() as mesh:
        mesh.configure(route(clusters={"v1": 1}), app_protocol=workload_pb2.GRPC)
        conn = await mesh.client()
        h2 = Http2ClientConnection(await conn.open_tunnel(f"{VIP}:{PORT}"))
        await mesh.nursery.start(h2.run)
        body = QueueBody()
        await body.send.send(b"\x00\x00\x00\x00\x03one")
        with trio.fail_after(5):
            response = await h2.send(Request("POST", f"{HOST}:{PORT}", "/grpc.Echo/Stream", (("content-type", "application/grpc"),), body, "HTTP/2"))
            assert await response.body.read() == b"\x00\x00\x00\x00\x03one"  # while the request is still open
            await body.send.send(b"\x00\x00\x00\x00\x03two")
            assert await response.body.read() == b"\x00\x00\x00\x00\x03two"
            await body.send.aclose()
            assert await response.body.read() == b""
        assert dict(response.body.trailers)["grpc-status"] == "0"


async def test_ready_after_config_and_certificate_and_drain_sends_goaway():
    async with running_mesh() as mesh:
        assert "config" in mesh.waypoint.readiness.pending
        await trio.sleep(0.2)
        assert mesh.waypoint.readiness.pending == ("config",)  # certificate in hand, no config yet
        mesh.configure(route(clusters={"v1": 1}))
        await trio.testing.wait_all_tasks_blocked()
        assert mesh.waypoint.readiness.ready
        conn = await mesh.client()
        mesh.waypoint.drain.start()
        with trio.fail_after(5):
            while not conn.going_away:
                await trio.sleep(0.01)
        with pytest.raises(OSError):  # no longer accepting
            await netio.connect(mesh.waypoint.hbone_address)


def test_cli_reports_config_errors_by_field(tmp_path, capsys):
    config = tmp_path / "waypoint.yaml"
    config.write_text("name: waypoint\nnamespace: bookinfo\naddress: 198.18.1.5\ncontrolPlane: {address: istiod:15012, tokenFile: t}\nports: {hbone: 99999}\n")
    assert main(["--config", str(config)]) == 2
    assert "ports.hbone: expected a port number 0-65535, got 99999" in capsys.readouterr().err
