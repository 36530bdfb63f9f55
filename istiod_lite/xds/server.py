"""The delta ADS server: istiod_lite's resources pushed to every connected proxy.

    xds = XdsServer(registry=registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(xds.run)
        xds.apply(translator.apply(event))          # as events arrive, from the trio thread
        xds.mark_ready()                            # once every source listed everything
        grpc_server = GrpcServer(("0.0.0.0", 15010), servicers=[xds.add_to_server, ...])
        await nursery.start(grpc_server.run)

Threads: grpc serves each ADS stream on one of its pool threads; `meshcore.xds.grpc_bridge`
turns it into a trio task running `_serve_stream` in `run()`'s nursery. Everything else (the
store, the sessions, `apply`) lives in the trio thread, so nothing here takes a lock.

Push path: `apply` encodes the changed resources at once (errors reach the caller) and stages
them. The push loop waits `DEBOUNCE_SECONDS` after the first staged change, commits everything
staged meanwhile to the store and tells only the streams subscribed to each changed type which
names changed (a wildcard stream takes them all, a named one the intersection). A resource with
an audience (waypoint config: see `resources.py`) is announced only to the streams of the
waypoints in its old or new audience, found by index: the work per change is proportional to
the streams that can see it. Each stream's sender then builds its
response from the store's shared bytes (see `resources.py`) and `session.py`'s flow control
keeps at most one unacknowledged response per type and stream. Large responses (full syncs)
are written at most `MAX_LARGE_RESPONSES` at a time, so a crowd of (re)connecting proxies costs
bounded memory and each waits its turn instead of slowing everyone's updates.

Until `mark_ready()`, streams are refused UNAVAILABLE: a proxy reconnecting to a restarted
istiod_lite must not be told that everything it has was removed before the sources listed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc
import prometheus_client
import trio
from envoy.service.discovery.v3 import discovery_pb2

from meshcore.log import get_logger
from meshcore.xds.grpc_bridge import BidiStream, RpcStatusError, StreamServicerBridge
from meshcore.xds.types import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    CLUSTER_TYPE_URL,
    ENDPOINT_TYPE_URL,
    LISTENER_TYPE_URL,
    ROUTE_TYPE_URL,
)
from istiod_lite.grpcserver import GrpcServer
from istiod_lite.xds.resources import ResourceChanges, ResourceStore, StagedChanges, stage
from istiod_lite.xds.session import (
    Acked,
    DeltaSession,
    Nacked,
    StaleNonce,
    Subscribed,
    XdsRequestError,
)

# Changes arriving within this long after a first one go out in the same push. A source's
# burst (one scan's or one relist's events) reaches us within a millisecond or two; longer
# would only add to every change's latency (Istio's 100 ms debounce is its largest part).
DEBOUNCE_SECONDS = 0.003

# Responses with at least this many resources (full syncs, in practice) are written at most
# MAX_LARGE_RESPONSES at a time, and a proxy that does not read one within the timeout is
# disconnected: that bounds istiod_lite's memory when many proxies (re)connect at once.
LARGE_RESPONSE_RESOURCES = 1000
MAX_LARGE_RESPONSES = 4
LARGE_RESPONSE_WRITE_TIMEOUT_SECONDS = 30.0

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

# What istiod_lite serves: ztunnel resources, and waypoint config as Envoy's own types.
SERVED_TYPE_URLS = (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    LISTENER_TYPE_URL,
    ROUTE_TYPE_URL,
    CLUSTER_TYPE_URL,
    ENDPOINT_TYPE_URL,
)

_log = get_logger("xds")


@dataclass(frozen=True, slots=True)
class XdsServerStatistics:
    connected_streams: int
    pushes: int  # responses sent
    nacks: int
    rejected_requests: int  # malformed requests (each ended its stream)


class _Stream:
    """A connected stream as the push loop sees it: its session and a wake-up for its sender."""

    __slots__ = ("_wakeup", "peer", "session")

    def __init__(self, session: DeltaSession, peer: str) -> None:
        self.session = session
        self.peer = peer
        self._wakeup = trio.Event()

    def wake(self) -> None:
        self._wakeup.set()

    async def wait(self) -> None:
        await self._wakeup.wait()
        self._wakeup = trio.Event()


class XdsServer:
    """Serves `type_urls` over delta ADS (see the module docstring)."""

    def __init__(
        self,
        *,
        registry: prometheus_client.CollectorRegistry,
        type_urls: Iterable[str] = SERVED_TYPE_URLS,
        debounce: float = DEBOUNCE_SECONDS,
    ) -> None:
        self._store = ResourceStore(type_urls)
        self._debounce = debounce
        self._staged: StagedChanges = {}
        self._staged_event = trio.Event()
        self._ready = False
        self._streams: set[_Stream] = set()
        self._subscribers: dict[str, set[_Stream]] = {}
        # (type URL, waypoint key) -> the subscribed streams of that waypoint.
        self._viewers: dict[tuple[str, str], set[_Stream]] = {}
        self._bridge = StreamServicerBridge(self._serve_stream)
        self._large_responses = trio.Semaphore(MAX_LARGE_RESPONSES)
        self._pushes = 0
        self._nacks = 0
        self._rejected = 0
        self._connected_gauge = prometheus_client.Gauge(
            "istiod_xds_connected_streams", "Delta ADS streams currently open", registry=registry
        )
        self._push_counter = prometheus_client.Counter(
            "istiod_xds_pushes", "Delta xDS responses sent", ["type_url"], registry=registry
        )
        self._nack_counter = prometheus_client.Counter(
            "istiod_xds_nacks",
            "Delta xDS responses rejected by proxies",
            ["type_url"],
            registry=registry,
        )
        self._rejected_counter = prometheus_client.Counter(
            "istiod_xds_rejected_requests",
            "Delta xDS requests refused: invalid_request ends the stream, unknown_type_url is "
            "answered with no resources",
            ["reason"],
            registry=registry,
        )

    # --- Control plane side (trio thread) ---

    def apply(self, changes: ResourceChanges) -> None:
        """Stage upserts/removals for the next push; ValueError (nothing staged) if invalid."""
        if changes:
            stage(changes, self._store.type_urls, self._staged)
            self._staged_event.set()

    def mark_ready(self) -> None:
        """Commit what is staged and start accepting streams (call after the initial sync)."""
        self._flush()
        self._ready = True

    def statistics(self) -> XdsServerStatistics:
        return XdsServerStatistics(
            connected_streams=len(self._streams),
            pushes=self._pushes,
            nacks=self._nacks,
            rejected_requests=self._rejected,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Push staged changes and serve the streams grpc hands over, until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._bridge.run)
            task_status.started()
            while True:
                await self._staged_event.wait()
                await trio.sleep(self._debounce)
                self._staged_event = trio.Event()
                self._flush()

    async def serve(
        self,
        address: tuple[str, int],
        *,
        credentials: grpc.ServerCredentials | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """`run()` plus a gRPC server of its own on `address`; reports the bound port."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run)
            server = GrpcServer(address, servicers=[self.add_to_server], credentials=credentials)
            task_status.started(await nursery.start(server.run))

    # --- gRPC side ---

    def add_to_server(self, server: grpc.Server) -> None:
        """Register the AggregatedDiscoveryService (delta only) on a grpc server."""
        delta = grpc.stream_stream_rpc_method_handler(
            self._bridge,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=None,  # responses are already serialized (resources.py)
        )
        state_of_the_world = grpc.stream_stream_rpc_method_handler(
            _state_of_the_world_unimplemented,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    ADS_SERVICE,
                    {
                        "DeltaAggregatedResources": delta,
                        "StreamAggregatedResources": state_of_the_world,
                    },
                ),
            )
        )

    # --- internals ---

    def _flush(self) -> None:
        staged, self._staged = self._staged, {}
        for type_url, concerned in self._store.commit(staged).items():
            public: set[str] = set()
            by_viewer: dict[str, set[str]] = {}
            for name, audience in concerned.items():
                if audience is None:
                    public.add(name)
                else:
                    for viewer in audience:
                        by_viewer.setdefault(viewer, set()).add(name)
            if public:
                self._announce(self._subscribers.get(type_url, ()), type_url, public)
            for viewer, names in by_viewer.items():
                self._announce(self._viewers.get((type_url, viewer), ()), type_url, names)

    @staticmethod
    def _announce(streams: Iterable[_Stream], type_url: str, names: set[str]) -> None:
        for stream in streams:
            if stream.session.resources_changed(type_url, names):
                stream.wake()

    async def _serve_stream(
        self, stream: BidiStream[discovery_pb2.DeltaDiscoveryRequest, bytes], peer: str
    ) -> None:
        if not self._ready:
            raise RpcStatusError(
                grpc.StatusCode.UNAVAILABLE,
                "istiod_lite has not loaded its initial configuration yet; retry shortly",
            )
        entry = _Stream(DeltaSession(self._store), peer)
        self._streams.add(entry)
        self._connected_gauge.inc()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_responses, entry, stream)
                async for request in stream:
                    self._handle_request(entry, request)
                nursery.cancel_scope.cancel()  # the proxy closed its side
        finally:
            self._streams.discard(entry)
            for subscribers in self._subscribers.values():
                subscribers.discard(entry)
            viewer = entry.session.viewer
            for key in [key for key in self._viewers if key[1] == viewer]:
                self._viewers[key].discard(entry)
                if not self._viewers[key]:
                    del self._viewers[key]
            self._connected_gauge.dec()
            _log.info("xds stream closed", node=entry.session.node_id, peer=peer)

    def _handle_request(self, entry: _Stream, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        first = not entry.session.node_id
        try:
            events = entry.session.receive(request)
        except XdsRequestError as exc:
            self._rejected += 1
            self._rejected_counter.labels("invalid_request").inc()
            _log.warning(
                "xds request rejected", node=entry.session.node_id, peer=entry.peer, error=str(exc)
            )
            raise RpcStatusError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if first:
            _log.info(
                "xds stream opened",
                node=entry.session.node_id,
                waypoint=entry.session.viewer,
                peer=entry.peer,
            )
        for event in events:
            match event:
                case Subscribed(type_url=type_url, served=served):
                    self._subscribers.setdefault(type_url, set()).add(entry)
                    if entry.session.viewer is not None:
                        self._viewers.setdefault((type_url, entry.session.viewer), set()).add(entry)
                    if not served:
                        self._rejected_counter.labels("unknown_type_url").inc()
                        _log.warning(
                            "xds subscription to an unknown type URL; answering with no resources",
                            node=entry.session.node_id,
                            type_url=type_url,
                        )
                case Nacked(type_url=type_url, nonce=nonce, message=message):
                    self._nacks += 1
                    self._nack_counter.labels(type_url).inc()
                    _log.warning(
                        "xds NACK: proxy rejected resources",
                        node=entry.session.node_id,
                        type_url=type_url,
                        nonce=nonce,
                        error_detail=message,
                    )
                case Acked(type_url=type_url, nonce=nonce):
                    _log.debug(
                        "xds ACK", node=entry.session.node_id, type_url=type_url, nonce=nonce
                    )
                case StaleNonce(type_url=type_url, nonce=nonce):
                    _log.debug(
                        "xds stale nonce",
                        node=entry.session.node_id,
                        type_url=type_url,
                        nonce=nonce,
                    )
        entry.wake()

    async def _send_responses(
        self, entry: _Stream, stream: BidiStream[discovery_pb2.DeltaDiscoveryRequest, bytes]
    ) -> None:
        while True:
            await entry.wait()
            while (size := entry.session.next_response_size()) is not None:
                if size < LARGE_RESPONSE_RESOURCES:
                    await self._send_next(entry, stream)
                    continue
                # A full sync: bound how many are built and being written at once (each is
                # megabytes, in our buffer and again in grpc's until the proxy reads it).
                async with self._large_responses:
                    with trio.move_on_after(LARGE_RESPONSE_WRITE_TIMEOUT_SECONDS) as timeout:
                        await self._send_next(entry, stream)
                if timeout.cancelled_caught:
                    raise RpcStatusError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"a {size}-resource response was not read within "
                        f"{LARGE_RESPONSE_WRITE_TIMEOUT_SECONDS:.0f} s; reconnect to resync",
                    )

    async def _send_next(
        self, entry: _Stream, stream: BidiStream[discovery_pb2.DeltaDiscoveryRequest, bytes]
    ) -> None:
        response = entry.session.next_response()
        if response is None:  # an ACK or unsubscription changed things while we waited
            return
        await stream.send(response.payload)
        self._pushes += 1
        self._push_counter.labels(response.type_url).inc()
        _log.debug(
            "xds push",
            node=entry.session.node_id,
            type_url=response.type_url,
            nonce=response.nonce,
            resources=response.resources,
            removals=response.removals,
        )


def _state_of_the_world_unimplemented(
    request_iterator: object, context: grpc.ServicerContext
) -> None:
    context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        "StreamAggregatedResources (state-of-the-world xDS) is not served; "
        "use DeltaAggregatedResources",
    )
