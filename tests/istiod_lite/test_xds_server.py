"""The delta ADS server over real gRPC on loopback, driven by a raw test client that sees
every response exactly as a proxy would.
"""

from __future__ import annotations

import functools
from contextlib import asynccontextmanager

import grpc
import pytest
import trio
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from meshcore._gen import authorization_pb2, workload_pb2
from meshcore.xds.grpc_bridge import RpcStatusError, open_bidi_stream
from meshcore.xds.types import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    CLUSTER_TYPE_URL,
    LISTENER_TYPE_URL,
    ROUTE_TYPE_URL,
)
from istiod_lite.model import ResourceDelta, Translator, TypeDelta
from istiod_lite.sources.base import ObjectEvent
from istiod_lite.xds import XdsServer
from istiod_lite.xds.server import ADS_SERVICE
from istiod_lite.xds.resources import ResourceStore, stage
from istiod_lite.xds.session import DeltaSession, Nacked, StaleNonce, Subscribed, XdsRequestError

UNKNOWN_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
TIMEOUT = 5.0


def workload(name: str, octet: int = 1) -> workload_pb2.Address:
    return workload_pb2.Address(
        workload=workload_pb2.Workload(
            uid=f"Kubernetes//Pod/default/{name}",
            name=name,
            namespace="default",
            addresses=[bytes([10, 0, 0, octet])],
        )
    )


def uid(name: str) -> str:
    return f"Kubernetes//Pod/default/{name}"


def policy(name: str, port: int) -> authorization_pb2.Authorization:
    match = authorization_pb2.Match(destination_ports=[port])
    return authorization_pb2.Authorization(
        name=name,
        namespace="default",
        action=authorization_pb2.Action.DENY,
        rules=[authorization_pb2.Rule(clauses=[authorization_pb2.Clause(matches=[match])])],
    )


def addresses(upserts=None, removals=()):
    return {
        ADDRESS_TYPE_URL: (
            {uid(n): m for n, m in (upserts or {}).items()},
            {uid(n) for n in removals},
        )
    }


def names(response: discovery_pb2.DeltaDiscoveryResponse) -> set[str]:
    return {r.name for r in response.resources}


def decoded_workload(resource: discovery_pb2.Resource) -> workload_pb2.Workload:
    address = workload_pb2.Address()
    assert resource.resource.Unpack(address)
    return address.workload


class RawClient:
    """One ADS stream: sends requests as written, returns responses as received."""

    def __init__(self, stream, node_id: str, metadata: dict[str, str] | None = None) -> None:
        self.stream = stream
        self.node_id = node_id
        self.metadata = metadata or {}

    async def subscribe(self, type_url, names=(), *, unsubscribe=(), initial=None, node=True):
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=list(names),
            resource_names_unsubscribe=list(unsubscribe),
            initial_resource_versions=initial or {},
        )
        if node:
            request.node.id = self.node_id
            request.node.metadata.update(self.metadata)
        await self.stream.send(request)

    async def ack(self, response, *, error: str | None = None, subscribe=(), unsubscribe=()):
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=response.type_url,
            response_nonce=response.nonce,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
        )
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.stream.send(request)

    async def response(self) -> discovery_pb2.DeltaDiscoveryResponse:
        with trio.fail_after(TIMEOUT):
            return await self.stream.receive()

    async def expect_nothing(self, within: float = 0.3) -> None:
        with trio.move_on_after(within):
            response = await self.stream.receive()
            pytest.fail(f"unexpected response: {response}")


@asynccontextmanager
async def serving(*, ready: bool = True, **kwargs):
    registry = CollectorRegistry()
    server = XdsServer(registry=registry, **kwargs)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, ("127.0.0.1", 0))
        if ready:
            server.mark_ready()
        yield server, port, registry
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connect(
    port: int,
    node_id: str = "ztunnel~10.0.0.9~ztunnel-abc.istio-system~istio-system.svc.cluster.local",
    metadata: dict[str, str] | None = None,
):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        async with open_bidi_stream(stub.DeltaAggregatedResources) as stream:
            yield RawClient(stream, node_id, metadata)
    finally:
        channel.close()


async def settle() -> None:
    """Wait until what was applied has been committed (the debounce is 3 ms)."""
    await trio.sleep(0.05)


# --- Sync, updates, removals ---


async def test_initial_wildcard_sync_sends_everything_and_answers_empty_types():
    async with serving() as (server, port, _):
        server.apply(addresses({"a": workload("a", 1), "b": workload("b", 2)}))
        server.mark_ready()
        async with connect(port) as client:
            await client.subscribe(ADDRESS_TYPE_URL)
            await client.subscribe(AUTHORIZATION_TYPE_URL)
            first, second = await client.response(), await client.response()
            by_type = {r.type_url: r for r in (first, second)}
            address = by_type[ADDRESS_TYPE_URL]
            assert names(address) == {uid("a"), uid("b")}
            assert all(len(r.version) == 16 for r in address.resources)
            assert {decoded_workload(r).name for r in address.resources} == {"a", "b"}
            # No policies yet: still answered, so the proxy knows it is in sync.
            assert not by_type[AUTHORIZATION_TYPE_URL].resources
            assert first.nonce and second.nonce
            assert server.statistics().connected_streams == 1


async def test_update_and_removal_send_only_what_changed():
    async with serving() as (server, port, registry):
        server.apply(addresses({"a": workload("a", 1), "b": workload("b", 2)}))
        server.mark_ready()
        async with connect(port) as client:
            await client.subscribe(ADDRESS_TYPE_URL)
            initial = await client.response()
            versions = {r.name: r.version for r in initial.resources}
            await client.ack(initial)

            server.apply(addresses({"a": workload("a", 7)}))
            update = await client.response()
            assert names(update) == {uid("a")} and not update.removed_resources
            assert update.resources[0].version != versions[uid("a")]
            assert decoded_workload(update.resources[0]).addresses == [bytes([10, 0, 0, 7])]
            await client.ack(update)

            server.apply(addresses(removals=["b"]))
            removal = await client.response()
            assert not removal.resources and list(removal.removed_resources) == [uid("b")]
            await client.ack(removal)

            # Re-applying identical content is not a change.
            server.apply(addresses({"a": workload("a", 7)}))
            await client.expect_nothing()
        pushes = registry.get_sample_value(
            "istiod_xds_pushes_total", {"type_url": ADDRESS_TYPE_URL}
        )
        assert pushes == 3


async def test_changes_within_the_debounce_window_go_out_together():
    async with serving(debounce=0.2) as (server, port, _), connect(port) as client:
        await client.subscribe(ADDRESS_TYPE_URL)
        await client.ack(await client.response())
        server.apply(addresses({"a": workload("a", 1)}))
        await trio.sleep(0.05)
        server.apply(addresses({"b": workload("b", 2), "a": workload("a", 3)}))
        response = await client.response()
        assert names(response) == {uid("a"), uid("b")}
        [a] = [r for r in response.resources if r.name == uid("a")]
        assert decoded_workload(a).addresses == [bytes([10, 0, 0, 3])]


# --- ACK / NACK ---


async def test_nack_is_counted_logged_and_nothing_is_resent_until_the_next_change():
    async with serving() as (server, port, registry):
        server.apply(addresses({"a": workload("a", 1)}))
        server.mark_ready()
        async with connect(port) as client:
            await client.subscribe(ADDRESS_TYPE_URL)
            await client.ack(await client.response())

            server.apply(addresses({"a": workload("a", 2)}))
            rejected = await client.response()

            with capture_logs() as logs:
                await client.ack(rejected, error=f"{uid('a')}: bad address")
                await client.expect_nothing()  # the rejected version is not sent again
            nack_logs = [e for e in logs if e["event"].startswith("xds NACK")]
            assert nack_logs and nack_logs[0]["node"] == client.node_id
            assert nack_logs[0]["error_detail"] == f"{uid('a')}: bad address"
            assert server.statistics().nacks == 1
            assert (
                registry.get_sample_value("istiod_xds_nacks_total", {"type_url": ADDRESS_TYPE_URL})
                == 1
            )

            # The stream stays up and the next change arrives.
            server.apply(addresses({"a": workload("a", 3)}))
            fixed = await client.response()
            assert decoded_workload(fixed.resources[0]).addresses == [bytes([10, 0, 0, 3])]


# --- Reconnect ---


async def test_reconnect_with_initial_resource_versions_gets_only_the_difference():
    async with serving() as (server, port, _):
        server.apply(
            addresses({"a": workload("a", 1), "b": workload("b", 2), "c": workload("c", 3)})
        )
        server.mark_ready()
        async with connect(port) as client:
            await client.subscribe(ADDRESS_TYPE_URL)
            initial = await client.response()
            known = {r.name: r.version for r in initial.resources}

        # While the proxy is away: b changes, c goes, d appears; a stays.
        server.apply(addresses({"b": workload("b", 20), "d": workload("d", 4)}, removals=["c"]))
        await settle()

        async with connect(port) as client:
            await client.subscribe(ADDRESS_TYPE_URL, initial=known)
            resync = await client.response()
            assert names(resync) == {uid("b"), uid("d")}
            assert list(resync.removed_resources) == [uid("c")]


async def test_nothing_differs_on_reconnect_still_gets_an_empty_answer():
    async with serving() as (server, port, _):
        server.apply(addresses({"a": workload("a", 1)}))
        server.mark_ready()
        async with connect(port) as client:
            await client.subscribe(ADDRESS_TYPE_URL)
            known = {r.name: r.version for r in (await client.response()).resources}
        async with connect(port) as client:
            await client.subscribe(ADDRESS_TYPE_URL, initial=known)
            resync = await client.response()
            assert not resync.resources and not resync.removed_resources


async def test_streams_wait_until_the_server_has_its_initial_state():
    async with serving(ready=False) as (server, port, _):
        server.apply(addresses({"a": workload("a", 1)}))
        async with connect(port) as client:
            await client.subscribe(ADDRESS_TYPE_URL, initial={uid("a"): "old", uid("z"): "old"})
            with pytest.raises(RpcStatusError) as refused:
                await client.response()
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        server.mark_ready()
        async with connect(port) as client:
            await client.subscribe(ADDRESS_TYPE_URL)
            assert names(await client.response()) == {uid("a")}


# --- Named subscriptions ---


async def test_named_subscription_subscribe_unsubscribe_and_missing_names():
    async with serving() as (server, port, _):
        server.apply(
            addresses({"a": workload("a", 1), "b": workload("b", 2), "c": workload("c", 3)})
        )
        server.mark_ready()
        async with connect(port) as client:
            await client.subscribe(ADDRESS_TYPE_URL, [uid("a"), uid("missing")])
            first = await client.response()
            assert names(first) == {uid("a")}
            # A subscribed name that does not exist is reported removed, not left to a timeout.
            assert list(first.removed_resources) == [uid("missing")]

            await client.ack(first, subscribe=[uid("b")])
            added = await client.response()
            assert names(added) == {uid("b")}
            await client.ack(added, unsubscribe=[uid("a")])
            await client.expect_nothing(0.1)  # unsubscribing needs no answer

            server.apply(
                addresses({"a": workload("a", 10), "b": workload("b", 20), "c": workload("c", 30)})
            )
            update = await client.response()
            assert names(update) == {uid("b")}  # not a (unsubscribed), not c (never subscribed)


async def test_on_demand_style_subscribe_to_nothing_then_to_names():
    async with serving() as (server, port, _):
        server.apply(addresses({"a": workload("a", 1), "b": workload("b", 2)}))
        server.mark_ready()
        async with connect(port) as client:
            # ztunnel's XDS_ON_DEMAND: subscribe and unsubscribe "*" at once = nothing.
            await client.subscribe(ADDRESS_TYPE_URL, ["*"], unsubscribe=["*"])
            empty = await client.response()
            assert not empty.resources and not empty.removed_resources
            await client.ack(empty, subscribe=[uid("b")])
            assert names(await client.response()) == {uid("b")}


# --- Bad input ---


async def test_unknown_type_url_is_answered_empty_and_the_stream_keeps_serving():
    async with serving() as (server, port, registry):
        server.apply(addresses({"a": workload("a", 1)}))
        server.mark_ready()
        async with connect(port) as client:
            await client.subscribe(UNKNOWN_TYPE_URL)
            unknown = await client.response()
            assert unknown.type_url == UNKNOWN_TYPE_URL and not unknown.resources
            assert (
                registry.get_sample_value(
                    "istiod_xds_rejected_requests_total", {"reason": "unknown_type_url"}
                )
                == 1
            )
            await client.ack(unknown)
            await client.subscribe(ADDRESS_TYPE_URL, node=False)
            assert names(await client.response()) == {uid("a")}


async def test_malformed_requests_end_only_their_own_stream():
    async with serving() as (server, port, _):
        server.apply(addresses({"a": workload("a", 1)}))
        server.mark_ready()
        async with connect(port) as healthy:
            await healthy.subscribe(ADDRESS_TYPE_URL)
            await healthy.ack(await healthy.response())

            async with connect(port) as no_node:
                await no_node.subscribe(ADDRESS_TYPE_URL, node=False)
                with pytest.raises(RpcStatusError) as missing_node:
                    await no_node.response()
            assert missing_node.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "node.id" in missing_node.value.details

            async with connect(port) as no_type:
                await no_type.subscribe("")
                with pytest.raises(RpcStatusError) as missing_type:
                    await no_type.response()
            assert missing_type.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "type_url" in missing_type.value.details
            assert server.statistics().rejected_requests == 2

            # Bytes that are not a DeltaDiscoveryRequest at all (no serializers: raw bytes).
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            try:
                garbage = channel.stream_stream(f"/{ADS_SERVICE}/DeltaAggregatedResources")
                async with open_bidi_stream(garbage) as stream:
                    await stream.send(b"\xff\xff\xff")
                    with pytest.raises(RpcStatusError) as undecodable, trio.fail_after(TIMEOUT):
                        await stream.receive()
                assert undecodable.value.code == grpc.StatusCode.INTERNAL
            finally:
                channel.close()

            server.apply(addresses({"a": workload("a", 2)}))
            assert names(await healthy.response()) == {uid("a")}


async def test_state_of_the_world_ads_is_unimplemented():
    async with serving() as (_, port, _):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources(iter([discovery_pb2.DiscoveryRequest()]))
            with pytest.raises(grpc.RpcError) as failed:
                await trio.to_thread.run_sync(functools.partial(next, call))
            assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "DeltaAggregatedResources" in failed.value.details()
        finally:
            channel.close()


def test_apply_rejects_a_message_of_the_wrong_type_and_unserved_types():
    server = XdsServer(registry=CollectorRegistry())
    with pytest.raises(ValueError, match=r"istio\.workload\.Workload"):
        server.apply({ADDRESS_TYPE_URL: ({"x": workload_pb2.Workload(uid="x")}, set())})
    with pytest.raises(ValueError, match="is not served"):
        server.apply({UNKNOWN_TYPE_URL: ({}, {"x"})})


# --- Fairness ---


async def test_a_slow_client_gets_coalesced_state_while_a_fast_one_keeps_up():
    async with serving() as (server, port, _):
        server.apply(addresses({"a": workload("a", 0)}))
        server.mark_ready()
        async with connect(port, "slow") as slow, connect(port, "fast") as fast:
            for client in (slow, fast):
                await client.subscribe(ADDRESS_TYPE_URL)
                await client.subscribe(AUTHORIZATION_TYPE_URL)
                for _ in range(2):
                    await client.ack(await client.response())

            # The slow proxy receives the first change and then stops acknowledging.
            server.apply(addresses({"a": workload("a", 1)}))
            slow_pending = await slow.response()
            for octet in range(1, 30):
                if octet > 1:
                    server.apply(addresses({"a": workload("a", octet)}))
                started = trio.current_time()
                update = await fast.response()
                assert trio.current_time() - started < 1.0
                assert decoded_workload(update.resources[0]).addresses == [bytes([10, 0, 0, octet])]
                await fast.ack(update)
            server.apply({AUTHORIZATION_TYPE_URL: ({"default/deny": policy("deny", 80)}, set())})
            assert [r.name for r in (await fast.response()).resources] == ["default/deny"]

            # Its own other type is not held up by the unacknowledged Address response...
            assert [r.name for r in (await slow.response()).resources] == ["default/deny"]
            # ...and once it acknowledges, it gets one response with the latest state only.
            await slow.ack(slow_pending)
            coalesced = await slow.response()
            assert len(coalesced.resources) == 1
            assert decoded_workload(coalesced.resources[0]).addresses == [bytes([10, 0, 0, 29])]
            await slow.expect_nothing(0.1)


async def test_a_flood_of_reconnecting_clients_does_not_starve_a_connected_one():
    async with serving() as (server, port, _):
        server.apply(addresses({f"w{i}": workload(f"w{i}", i % 250) for i in range(500)}))
        server.mark_ready()
        reconnects = 0

        async def reconnect_forever(n: int) -> None:
            nonlocal reconnects
            while True:
                async with connect(port, f"flood-{n}") as client:
                    await client.subscribe(ADDRESS_TYPE_URL)
                    await client.response()
                reconnects += 1

        async with connect(port, "steady") as steady:
            await steady.subscribe(ADDRESS_TYPE_URL)
            await steady.ack(await steady.response())
            async with trio.open_nursery() as flood:
                for n in range(8):
                    flood.start_soon(reconnect_forever, n)
                await trio.sleep(0.3)
                delays = []
                for octet in range(10):
                    server.apply(addresses({"w0": workload("w0", octet + 1)}))
                    started = trio.current_time()
                    update = await steady.response()
                    delays.append(trio.current_time() - started)
                    assert names(update) == {uid("w0")}
                    await steady.ack(update)
                flood.cancel_scope.cancel()
        assert reconnects >= 8
        assert max(delays) < 1.0, delays


# --- Session rules, sans-IO ---


def store_with(*names: str) -> ResourceStore:
    store = ResourceStore([ADDRESS_TYPE_URL])
    staged: dict = {}
    stage({ADDRESS_TYPE_URL: ({n: workload(n) for n in names}, set())}, store.type_urls, staged)
    store.commit(staged)
    return store


def request(*, subscribe=(), unsubscribe=(), nonce="", error=None, node="proxy"):
    message = discovery_pb2.DeltaDiscoveryRequest(
        type_url=ADDRESS_TYPE_URL,
        resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe),
        response_nonce=nonce,
    )
    message.node.id = node
    if error is not None:
        message.error_detail.message = error
    return message


def sent(response) -> tuple[set[str], set[str]]:
    decoded = discovery_pb2.DeltaDiscoveryResponse.FromString(response.payload)
    return {r.name for r in decoded.resources}, set(decoded.removed_resources)


def test_session_unsubscribing_a_name_the_wildcard_covers_resends_it():
    session = DeltaSession(store_with("a", "b"))
    assert session.receive(request(subscribe=["a"])) == [Subscribed(ADDRESS_TYPE_URL, served=True)]
    first = session.next_response()
    assert sent(first) == ({"a"}, set())
    session.receive(request(subscribe=["*"], nonce=first.nonce))
    everything = session.next_response()
    assert sent(everything) == ({"a", "b"}, set())
    # The client cannot tell whether "a" is still wanted through "*": the spec says resend it.
    session.receive(request(unsubscribe=["a"], nonce=everything.nonce))
    assert sent(session.next_response()) == ({"a"}, set())


def test_session_holds_changes_until_acked_and_ignores_stale_nonces_but_not_their_subscriptions():
    store = store_with("a", "b", "c")
    session = DeltaSession(store)
    session.receive(request(subscribe=["a", "b"]))
    first = session.next_response()
    assert session.resources_changed(ADDRESS_TYPE_URL, {"a", "c"})  # c is not subscribed
    assert session.next_response() is None  # one unacknowledged response at a time
    events = session.receive(request(nonce="not-sent", subscribe=["c"]))
    assert events == [StaleNonce(ADDRESS_TYPE_URL, "not-sent")]
    assert session.next_response() is None  # a stale nonce does not release the next push
    assert session.receive(request(nonce=first.nonce, error="a: bad")) == [
        Nacked(ADDRESS_TYPE_URL, first.nonce, "a: bad")
    ]
    # ...but the subscription that came with it counted.
    assert sent(session.next_response()) == ({"a", "c"}, set())


def test_session_rejects_requests_without_node_or_type_url():
    session = DeltaSession(store_with("a"))
    with pytest.raises(XdsRequestError, match=r"node\.id"):
        session.receive(request(node=""))
    session.receive(request())
    missing_type = request(node="")
    missing_type.type_url = ""
    with pytest.raises(XdsRequestError, match="type_url"):
        session.receive(missing_type)


# --- Per-waypoint visibility ---


def waypoint_node(namespace: str) -> tuple[str, dict[str, str]]:
    """A waypoint's node id and metadata, as its xDS client sends them."""
    node_id = f"waypoint~10.0.1.1~waypoint-0.{namespace}~{namespace}.svc.cluster.local"
    return node_id, {
        "NAME": "waypoint-0",
        "NAMESPACE": namespace,
        "WAYPOINT": f"{namespace}/waypoint",
    }


def two_waypoint_mesh() -> tuple[Translator, list]:
    """Namespaces a and b, each with its waypoint and one bound service (a/web, b/api)."""
    translator = Translator()
    deltas = []
    for namespace, name in (("a", "web"), ("b", "api")):
        for event in (
            ObjectEvent(
                "Namespace",
                "upsert",
                "",
                namespace,
                {"metadata": {"labels": {"istio.io/use-waypoint": "waypoint"}}},
            ),
            ObjectEvent("Waypoint", "upsert", namespace, "waypoint", {"spec": {}}),
            ObjectEvent(
                "Service",
                "upsert",
                namespace,
                name,
                {
                    "spec": {
                        "selector": {"app": name},
                        "clusterIP": "10.96.0.1",
                        "ports": [{"port": 80}],
                    }
                },
            ),
        ):
            deltas.append(translator.apply(event))
    return translator, deltas


async def sync(client: RawClient, type_url: str) -> discovery_pb2.DeltaDiscoveryResponse:
    await client.subscribe(type_url)
    response = await client.response()
    await client.ack(response)
    return response


async def test_a_waypoint_stream_sees_only_its_services_config_and_ztunnels_every_address():
    translator, deltas = two_waypoint_mesh()
    async with serving(ready=False) as (server, port, _):
        for delta in deltas:
            server.apply(delta)
        server.mark_ready()
        async with connect(port, *waypoint_node("a")) as waypoint_a, connect(port) as ztunnel:
            assert names(await sync(waypoint_a, LISTENER_TYPE_URL)) == {
                "web.a.svc.cluster.local:80"
            }
            assert names(await sync(waypoint_a, CLUSTER_TYPE_URL)) == {
                "outbound|80||web.a.svc.cluster.local"
            }
            # Addresses are for everyone: the waypoint resolves VIPs and endpoints with them.
            every_address = set(translator.resources()[ADDRESS_TYPE_URL])
            assert names(await sync(waypoint_a, ADDRESS_TYPE_URL)) == every_address
            assert names(await sync(ztunnel, ADDRESS_TYPE_URL)) == every_address
            assert names(await sync(ztunnel, LISTENER_TYPE_URL)) == set()
            # Asking by name for another waypoint's resource gets its removal, not the resource.
            await waypoint_a.subscribe(ROUTE_TYPE_URL, ["api.b.svc.cluster.local:80"])
            response = await waypoint_a.response()
            assert not response.resources and list(response.removed_resources) == [
                "api.b.svc.cluster.local:80"
            ]

            # b's config changes: a's stream hears nothing of it.
            server.apply(
                translator.apply(
                    ObjectEvent(
                        "DestinationRule",
                        "upsert",
                        "b",
                        "api",
                        {
                            "spec": {
                                "host": "api",
                                "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}},
                            }
                        },
                    )
                )
            )
            await waypoint_a.expect_nothing()


async def test_a_service_moving_to_another_waypoint_leaves_one_stream_and_reaches_the_other():
    translator, deltas = two_waypoint_mesh()
    async with serving(ready=False) as (server, port, _):
        for delta in deltas:
            server.apply(delta)
        server.mark_ready()
        async with connect(port, *waypoint_node("a")) as waypoint_a, connect(
            port, *waypoint_node("b")
        ) as waypoint_b:
            assert names(await sync(waypoint_a, LISTENER_TYPE_URL)) == {
                "web.a.svc.cluster.local:80"
            }
            assert names(await sync(waypoint_b, LISTENER_TYPE_URL)) == {
                "api.b.svc.cluster.local:80"
            }
            moved = ObjectEvent(
                "Service",
                "upsert",
                "a",
                "web",
                {
                    "metadata": {
                        "labels": {
                            "istio.io/use-waypoint": "waypoint",
                            "istio.io/use-waypoint-namespace": "b",
                        }
                    },
                    "spec": {
                        "selector": {"app": "web"},
                        "clusterIP": "10.96.0.1",
                        "ports": [{"port": 80}],
                    },
                },
            )
            server.apply(translator.apply(moved))
            left = await waypoint_a.response()
            assert not left.resources and list(left.removed_resources) == [
                "web.a.svc.cluster.local:80"
            ]
            arrived = await waypoint_b.response()
            assert (
                names(arrived) == {"web.a.svc.cluster.local:80"} and not arrived.removed_resources
            )


def scoped_store() -> ResourceStore:
    store = ResourceStore([LISTENER_TYPE_URL])
    delta = ResourceDelta()
    delta[LISTENER_TYPE_URL] = TypeDelta(
        {"mine": Listener(name="mine"), "theirs": Listener(name="theirs")}, set()
    )
    delta.audiences[LISTENER_TYPE_URL] = {
        "mine": frozenset({"a/waypoint"}),
        "theirs": frozenset({"b/waypoint"}),
    }
    staged: dict = {}
    stage(delta, store.type_urls, staged)
    store.commit(staged)
    return store


def test_session_reconnect_drops_what_the_waypoint_may_no_longer_see():
    store = scoped_store()
    session = DeltaSession(store)
    request = discovery_pb2.DeltaDiscoveryRequest(
        type_url=LISTENER_TYPE_URL,
        initial_resource_versions={
            "mine": store.get(LISTENER_TYPE_URL, "mine").version,
            "theirs": "v1",
        },
    )
    request.node.id = "waypoint~10.0.1.1~waypoint-0.a~a.svc.cluster.local"
    request.node.metadata.update({"WAYPOINT": "a/waypoint"})
    session.receive(request)
    assert session.viewer == "a/waypoint"
    # "mine" is up to date; "theirs" (held from before a rebinding) must go.
    assert sent(session.next_response()) == (set(), {"theirs"})
