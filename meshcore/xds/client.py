"""The proxies' delta xDS client: one ADS stream to istiod_lite, kept up for the proxy's life.

    client = DeltaXdsClient(
        "istiod.istio-system.svc:15012",
        node=node,                                   # envoy.config.core.v3.Node
        type_urls=[ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL],
        handler=state_handler,                       # XdsHandler
        channel_credentials=grpc.ssl_channel_credentials(root_pem),
        metadata=lambda: [("authorization", f"Bearer {token_file.read_text()}")],
    )
    await nursery.start(client.run)
    await client.wait_synced()                       # first response for every type applied

Behaviour follows ztunnel's AdsClient (src/xds/client.rs, ambient-facts §4):

- Every (re)connect sends one request per type: node, an empty subscription (wildcard), and
  `initial_resource_versions` = every name -> version applied so far, so istiod_lite sends only
  what changed while the stream was down and removals for what is gone.
- Each response goes to `handler.apply(type_url, upserts, removals)`, which applies what it can
  and returns `{name: error}` for what it rejected. Then one ACK, or one NACK whose
  `error_detail.message` is the "; "-joined `name: error` list; the accepted resources stay
  applied either way, and a rejected one keeps its previous version here.
- Reconnects after a stream ends: 10 ms later if the stream had worked or ended cleanly, else
  after a backoff doubling from 10 ms to 15 s. Between streams the proxy keeps serving with what
  it has (static stability).

grpcio runs in threads; this module touches them only through `grpc_bridge`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import prometheus_client
import trio
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.rpc import code_pb2, status_pb2

from meshcore.config import ControlPlane
from meshcore.log import get_logger
from meshcore.xds.grpc_bridge import BidiStream, RpcStatusError, open_bidi_stream

INITIAL_BACKOFF_SECONDS = 0.010
MAX_BACKOFF_SECONDS = 15.0
# ztunnel's limit: a full sync of a large mesh is one response.
MAX_RESPONSE_BYTES = 200 * 1024 * 1024

_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
    # Notice a control plane that vanished without closing (istiod_lite accepts pings >= 15 s).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # One connection per client: grpc would otherwise multiplex every channel of the process
    # to one address over a single TCP connection (the control-plane benchmark runs 100).
    ("grpc.use_local_subchannel_pool", 1),
)

_log = get_logger("xds")

Upsert = tuple[str, str, any_pb2.Any]  # (name, version, resource)
Metadata = Sequence[tuple[str, str]]


class XdsHandler(Protocol):
    """Where resources go: applies them and returns the rejected ones as {name: error}."""

    def apply(
        self, type_url: str, upserts: list[Upsert], removals: list[str]
    ) -> dict[str, str]: ...


@dataclass(frozen=True, slots=True)
class XdsClientStatistics:
    connected: bool  # a stream is open and has delivered a response
    synced: bool  # every type has had its first response applied
    reconnects: int  # streams that ended and were retried
    responses: int
    nacks: int


class DeltaXdsClient:
    """Keeps one delta ADS stream to `target` and feeds `handler` (see the module docstring).

    `metadata` is sent with every stream; give a callable to have it evaluated at each
    (re)connect, e.g. to re-read a rotated token. `registry` adds ztunnel's
    `istio_xds_connection_terminations_total{reason}` counter.
    """

    def __init__(
        self,
        target: str,
        *,
        node: base_pb2.Node,
        type_urls: Sequence[str],
        handler: XdsHandler,
        channel_credentials: grpc.ChannelCredentials | None = None,
        metadata: Metadata | Callable[[], Metadata] = (),
        registry: prometheus_client.CollectorRegistry | None = None,
    ) -> None:
        if not type_urls:
            raise ValueError("DeltaXdsClient needs at least one type URL to subscribe to")
        self._target = target
        self._node = node
        self._type_urls = tuple(dict.fromkeys(type_urls))
        self._handler = handler
        self._credentials = channel_credentials
        self._metadata = metadata
        # type URL -> name -> version, as applied; sent as initial_resource_versions.
        self._versions: dict[str, dict[str, str]] = {url: {} for url in self._type_urls}
        self._unsynced = set(self._type_urls)
        self._synced = trio.Event()
        self._connected = False
        self._reconnects = 0
        self._responses = 0
        self._nacks = 0
        self._terminations = (
            prometheus_client.Counter(
                "istio_xds_connection_terminations",
                "The total number of completed connections to xds server",
                ["reason"],
                registry=registry,
            )
            if registry is not None
            else None
        )

    async def wait_synced(self) -> None:
        """Return once the first response of every subscribed type was applied."""
        await self._synced.wait()

    def statistics(self) -> XdsClientStatistics:
        return XdsClientStatistics(
            connected=self._connected,
            synced=self._synced.is_set(),
            reconnects=self._reconnects,
            responses=self._responses,
            nacks=self._nacks,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, apply, reconnect; until cancelled. Reports started before the first connect."""
        task_status.started()
        backoff = INITIAL_BACKOFF_SECONDS
        while True:
            try:
                await self._run_stream()
                reason, delay = "Complete", INITIAL_BACKOFF_SECONDS
                _log.info("xds stream ended by the server; reconnecting", target=self._target)
            except RpcStatusError as exc:
                if self._connected:  # the stream had worked: a restart or a hiccup
                    reason, delay = "Reconnect", INITIAL_BACKOFF_SECONDS
                else:
                    reason = (
                        "ConnectionError" if exc.code is grpc.StatusCode.UNAVAILABLE else "Error"
                    )
                    delay, backoff = backoff, min(backoff * 2, MAX_BACKOFF_SECONDS)
                _log.warning(
                    "xds stream failed; reconnecting",
                    target=self._target,
                    code=exc.code.name,
                    error=exc.details,
                    retry_in_seconds=delay,
                )
            if self._connected:
                backoff = INITIAL_BACKOFF_SECONDS
            self._connected = False
            self._reconnects += 1
            if self._terminations is not None:
                self._terminations.labels(reason).inc()
            await trio.sleep(delay)

    async def _run_stream(self) -> None:
        """One stream, until it ends cleanly (returns) or fails (RpcStatusError)."""
        metadata = self._metadata() if callable(self._metadata) else self._metadata
        if self._credentials is None:
            channel = grpc.insecure_channel(self._target, options=_CHANNEL_OPTIONS)
        else:
            channel = grpc.secure_channel(self._target, self._credentials, options=_CHANNEL_OPTIONS)
        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            start = functools.partial(stub.DeltaAggregatedResources, metadata=tuple(metadata))
            async with open_bidi_stream(start) as stream:
                for type_url in self._type_urls:
                    await stream.send(self._initial_request(type_url))
                await self._exchange(stream)
        except trio.BrokenResourceError:
            pass  # the server ended the stream cleanly while we were answering it
        finally:
            channel.close()

    async def _exchange(
        self,
        stream: BidiStream[
            discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse
        ],
    ) -> None:
        async for response in stream:
            if not self._connected:
                self._connected = True
                _log.info("xds stream established", target=self._target)
            await stream.send(self._apply(response))

    def _initial_request(self, type_url: str) -> discovery_pb2.DeltaDiscoveryRequest:
        return discovery_pb2.DeltaDiscoveryRequest(
            node=self._node,
            type_url=type_url,
            initial_resource_versions=self._versions[type_url],
        )

    def _apply(
        self, response: discovery_pb2.DeltaDiscoveryResponse
    ) -> discovery_pb2.DeltaDiscoveryRequest:
        """Hand one response to the handler; the ACK or NACK to send back."""
        self._responses += 1
        type_url = response.type_url
        versions = self._versions.get(type_url)
        if versions is None:
            errors = {
                "*": f"unexpected type URL {type_url!r}; subscribed to {', '.join(self._type_urls)}"
            }
        else:
            upserts = [(r.name, r.version, r.resource) for r in response.resources]
            removals = list(response.removed_resources)
            errors = self._handler.apply(type_url, upserts, removals)
            for name, version, _ in upserts:
                if name not in errors:
                    versions[name] = version
            for name in removals:
                versions.pop(name, None)
            self._unsynced.discard(type_url)
            if not self._unsynced and not self._synced.is_set():
                self._synced.set()
                _log.info("xds synced", types=list(self._type_urls))
        _log.debug(
            "xds response applied",
            type_url=type_url,
            nonce=response.nonce,
            resources=len(response.resources),
            removals=len(response.removed_resources),
            rejected=len(errors),
        )
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, response_nonce=response.nonce
        )
        if errors:
            self._nacks += 1
            detail = "; ".join(f"{name}: {error}" for name, error in errors.items())
            request.error_detail.CopyFrom(
                status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=detail)
            )
            _log.warning(
                "xds NACK: rejected resources",
                type_url=type_url,
                nonce=response.nonce,
                error=detail,
            )
        return request


def control_plane_client(
    control_plane: ControlPlane,
    *,
    node: base_pb2.Node,
    type_urls: Sequence[str],
    handler: XdsHandler,
    registry: prometheus_client.CollectorRegistry | None = None,
) -> DeltaXdsClient:
    """A client of istiod_lite as `control_plane` names it: TLS trusting its root when one is
    given, and the bearer token read anew for every connection."""
    root = control_plane.root_cert_path
    return DeltaXdsClient(
        control_plane.address,
        node=node,
        type_urls=type_urls,
        handler=handler,
        channel_credentials=grpc.ssl_channel_credentials(root_certificates=root.read_bytes()) if root else None,
        metadata=lambda: (("authorization", f"Bearer {control_plane.token()}"),),
        registry=registry,
    )
