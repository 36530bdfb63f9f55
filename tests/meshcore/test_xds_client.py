"""DeltaXdsClient against istiod_lite's real delta ADS server over loopback gRPC (plaintext and
TLS): sync, updates, NACKs, and resync after the server restarts.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

import grpc
import pytest
import trio
from envoy.config.core.v3 import base_pb2
from google.protobuf import any_pb2, struct_pb2
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from meshcore._gen import workload_pb2
from meshcore.identity.ca import CertificateAuthority
from meshcore.xds.client import DeltaXdsClient
from meshcore.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from istiod_lite.ca.root import issue_serving_certificate
from istiod_lite.xds import XdsServer

TYPE_URLS = (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)
NODE = base_pb2.Node(
    id="ztunnel~10.0.0.9~ztunnel-abc.istio-system~istio-system.svc.cluster.local",
    metadata=struct_pb2.Struct(fields={"NODE_NAME": struct_pb2.Value(string_value="node-1")}),
)


def uid(name: str) -> str:
    return f"Kubernetes//Pod/default/{name}"


def workload(name: str, octet: int) -> workload_pb2.Address:
    return workload_pb2.Address(
        workload=workload_pb2.Workload(
            uid=uid(name), name=name, addresses=[bytes([10, 0, 0, octet])]
        )
    )


def addresses(upserts=None, removals=()):
    return {
        ADDRESS_TYPE_URL: (
            {uid(n): m for n, m in (upserts or {}).items()},
            {uid(n) for n in removals},
        )
    }


class RecordingHandler:
    """Keeps what it accepted; rejects names listed in `reject` with the given error."""

    def __init__(self) -> None:
        self.resources: dict[str, dict[str, any_pb2.Any]] = {url: {} for url in TYPE_URLS}
        self.calls: list[tuple[str, set[str], set[str]]] = []  # (type_url, upserted, removed)
        self.reject: dict[str, str] = {}

    def apply(self, type_url, upserts, removals):
        errors = {}
        for name, version, resource in upserts:
            assert version
            if name in self.reject:
                errors[name] = self.reject[name]
            else:
                self.resources[type_url][name] = resource
        for name in removals:
            self.resources[type_url].pop(name, None)
        self.calls.append((type_url, {name for name, _, _ in upserts}, set(removals)))
        return errors

    def octet(self, name: str) -> int:
        address = workload_pb2.Address()
        assert self.resources[ADDRESS_TYPE_URL][uid(name)].Unpack(address)
        return address.workload.addresses[0][3]


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


@asynccontextmanager
async def xds_server(port: int = 0, *, initial=None, credentials=None):
    server = XdsServer(registry=CollectorRegistry())
    if initial:
        server.apply(initial)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            lambda task_status: server.serve(
                ("127.0.0.1", port), credentials=credentials, task_status=task_status
            )
        )
        server.mark_ready()
        yield server, bound
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def running(client: DeltaXdsClient):
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        yield client
        nursery.cancel_scope.cancel()


def new_client(port: int, handler, **kwargs) -> DeltaXdsClient:
    return DeltaXdsClient(
        f"127.0.0.1:{port}", node=NODE, type_urls=TYPE_URLS, handler=handler, **kwargs
    )


async def test_initial_sync_then_updates_and_removals():
    handler = RecordingHandler()
    initial = addresses({"a": workload("a", 1), "b": workload("b", 2)})
    async with (
        xds_server(initial=initial) as (server, port),
        running(new_client(port, handler)) as client,
    ):
        assert not client.statistics().synced
        with trio.fail_after(5):
            await client.wait_synced()
        assert set(handler.resources[ADDRESS_TYPE_URL]) == {uid("a"), uid("b")}
        assert handler.resources[AUTHORIZATION_TYPE_URL] == {}
        stats = client.statistics()
        assert stats.synced and stats.connected and stats.responses == 2 and stats.nacks == 0

        server.apply(addresses({"a": workload("a", 9)}, removals=["b"]))
        await eventually(lambda: uid("b") not in handler.resources[ADDRESS_TYPE_URL])
        assert handler.octet("a") == 9
        assert handler.calls[-1] == (ADDRESS_TYPE_URL, {uid("a")}, {uid("b")})
        # Every response was acknowledged: the server saw no NACK.
        assert server.statistics().nacks == 0


async def test_rejected_resources_are_nacked_by_name_and_the_rest_applied():
    handler = RecordingHandler()
    handler.reject = {uid("b"): "tunnel_protocol LEGACY_ISTIO_MTLS is not supported"}
    async with xds_server() as (server, port), running(new_client(port, handler)) as client:
        with trio.fail_after(5):
            await client.wait_synced()
        with capture_logs() as logs:
            server.apply(addresses({"a": workload("a", 1), "b": workload("b", 2)}))
            await eventually(lambda: server.statistics().nacks == 1)
        [nack] = [e for e in logs if e["event"] == "xds NACK: proxy rejected resources"]
        assert nack["node"] == NODE.id
        assert (
            nack["error_detail"]
            == f"{uid('b')}: tunnel_protocol LEGACY_ISTIO_MTLS is not supported"
        )
        assert set(handler.resources[ADDRESS_TYPE_URL]) == {uid("a")}
        assert client.statistics().nacks == 1

        # Fixed upstream: the next version is accepted.
        handler.reject = {}
        server.apply(addresses({"b": workload("b", 3)}))
        await eventually(lambda: uid("b") in handler.resources[ADDRESS_TYPE_URL])
        assert server.statistics().nacks == 1


async def test_reconnects_after_a_server_restart_and_gets_only_the_difference():
    handler = RecordingHandler()
    registry = CollectorRegistry()
    before = addresses({"a": workload("a", 1), "b": workload("b", 2), "d": workload("d", 4)})
    after = addresses({"a": workload("a", 1), "b": workload("b", 20), "c": workload("c", 3)})
    async with trio.open_nursery() as nursery:
        async with xds_server(initial=before) as (_, port):
            client = new_client(port, handler, registry=registry)
            await nursery.start(client.run)
            with trio.fail_after(5):
                await client.wait_synced()
        # The server is gone; the proxy keeps what it has and retries with backoff.
        await trio.sleep(0.3)
        assert set(handler.resources[ADDRESS_TYPE_URL]) == {uid("a"), uid("b"), uid("d")}
        calls_before_restart = len(handler.calls)

        async with xds_server(port, initial=after) as (server, _):
            await eventually(lambda: uid("c") in handler.resources[ADDRESS_TYPE_URL])
            resync = [c for c in handler.calls[calls_before_restart:] if c[0] == ADDRESS_TYPE_URL]
            assert resync == [(ADDRESS_TYPE_URL, {uid("b"), uid("c")}, {uid("d")})]
            assert handler.octet("b") == 20
            assert client.statistics().reconnects >= 1
            terminations = registry.get_sample_value(
                "istio_xds_connection_terminations_total", {"reason": "Reconnect"}
            )
            assert terminations == 1
            assert server.statistics().connected_streams == 1
        nursery.cancel_scope.cancel()


async def test_sync_over_tls_with_per_connect_metadata():
    ca = CertificateAuthority.generate("cluster.local")
    serving = issue_serving_certificate(
        ca, dns_names=["istiod.istio-system.svc"], ip_addresses=["127.0.0.1"]
    )
    server_credentials = grpc.ssl_server_credentials([(serving.key_pem, serving.chain_pem)])
    handler = RecordingHandler()
    tokens_read = 0

    def metadata():
        nonlocal tokens_read
        tokens_read += 1
        return [("authorization", "Bearer token-from-file")]

    async with xds_server(
        initial=addresses({"a": workload("a", 1)}), credentials=server_credentials
    ) as (_, port):
        client = new_client(
            port,
            handler,
            channel_credentials=grpc.ssl_channel_credentials(root_certificates=ca.roots_pem[0]),
            metadata=metadata,
        )
        async with running(client):
            with trio.fail_after(5):
                await client.wait_synced()
            assert set(handler.resources[ADDRESS_TYPE_URL]) == {uid("a")}
            assert tokens_read == 1


async def test_an_untrusted_server_is_retried_with_backoff_not_synced():
    other_ca = CertificateAuthority.generate("cluster.local")
    ca = CertificateAuthority.generate("cluster.local")
    serving = issue_serving_certificate(ca, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    server_credentials = grpc.ssl_server_credentials([(serving.key_pem, serving.chain_pem)])
    async with xds_server(credentials=server_credentials) as (_, port):
        client = new_client(
            port,
            RecordingHandler(),
            channel_credentials=grpc.ssl_channel_credentials(
                root_certificates=other_ca.roots_pem[0]
            ),
        )
        async with running(client):
            await trio.sleep(0.5)
            stats = client.statistics()
            assert not stats.synced and not stats.connected
            # 10 ms doubling: a handful of attempts in half a second, not hundreds.
            assert 2 <= stats.reconnects <= 8


def test_needs_a_type_url():
    with pytest.raises(ValueError, match="type URL"):
        DeltaXdsClient("127.0.0.1:1", node=NODE, type_urls=[], handler=RecordingHandler())
