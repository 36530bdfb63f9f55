"""waypoint/upstream: HTTP connections to the endpoints of the waypoint's clusters.

An upstream connection is one byte stream to one endpoint:
- tunnel "hbone": a CONNECT `podIP:targetPort` tunnel over a pooled HBONE connection to
  `podIP:15008`, spoken with the waypoint's own identity and accepted only from the identity
  the endpoint metadata names (the destination ztunnel then sees the waypoint, facts §10);
- tunnel "tcp": a plain TCP connection to `podIP:targetPort` (a pod outside the mesh).

On top of it runs HTTP/1.1 (one request at a time, kept alive and reused) or HTTP/2 (requests
multiplexed up to the peer's stream limit), as the pipeline asks. Per cluster the Envoy
circuit breakers the pipeline keeps in `ConnectionPoolLimits` apply: a new connection needs
room under `max_connections`; without it the request waits as pending (under
`max_pending_requests`, else Overflow: 503 UO) until a connection is released. A connection
serves at most `max_requests_per_connection` requests. Opening a connection (TCP, TLS and
the CONNECT answer) must finish within the cluster's `connect_timeout`.

Invariants:
* Every open connection holds one unit of its cluster's `connections` resource, released
  exactly once: when it closes, or when its cluster config is replaced (below).
* An HTTP/1.1 connection is in the idle list only while no request uses it; connections
  idle longer than `IDLE_TIMEOUT` are closed (Envoy's upstream idle timeout is 1 h; ours
  is shorter because every idle connection pins an HBONE tunnel).
* Connections serve only the Cluster config (and limits) they were opened under. A changed
  Cluster (a DestinationRule edit: limits, protocol, balancing...) drains them, as Envoy
  drains the pools of a cluster that CDS replaced: idle ones close at once, busy ones once
  their requests end, and they stop counting against `max_connections` (in Envoy they
  count against the old cluster's breakers), so the new limits hold from the next request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import trio

from meshcore import netio
from meshcore.hbone.connection import TunnelConnection
from meshcore.hbone.errors import TunnelRejected
from meshcore.hbone.handshake import client_connection
from meshcore.hbone.pool import HbonePool, PoolKey
from meshcore.identity.manager import CertificateManager, CertificateUnavailable
from meshcore.identity.spiffe import Identity
from meshcore.log import get_logger
from meshcore.tls.context import client_context
from meshcore.tls.errors import TlsError
from waypoint.config.model import ClusterConfig, Endpoint, Tunnel
from waypoint.http1 import Http1ClientConnection
from waypoint.http2 import Http2ClientConnection, StreamResetError
from waypoint.messages import Request, Response
from waypoint.policy.limits import ConnectionPoolLimits
from waypoint.policy.retry import UpstreamFailure

HBONE_PORT = 15008  # facts §1: the destination ztunnel listens on the pod IP's 15008
IDLE_TIMEOUT = 60.0
_REAP_INTERVAL = 5.0
_DRAIN_POLL_INTERVAL = 0.1  # how soon a drained HTTP/2 connection closes after its last stream
# TLS with a peer ztunnel (the TCP connect is under the cluster's connect_timeout).
HANDSHAKE_TIMEOUT = 10.0

_log = get_logger("upstream")


class UpstreamError(Exception):
    """An attempt produced no response head; `failure` is what retry and outlier logic see."""

    response_flag = "UF"
    failure = UpstreamFailure.CONNECT_FAILURE


class UpstreamConnectFailed(UpstreamError):
    """No connection (or tunnel) to the endpoint could be opened (Envoy's UF)."""


class UpstreamReset(UpstreamError):
    """The connection or stream broke before the response head (Envoy's UC/UR)."""

    response_flag = "UC"
    failure = UpstreamFailure.RESET

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        if refused:  # HTTP/2 REFUSED_STREAM: the request was not processed, safe to retry
            self.response_flag = "UR"
            self.failure = UpstreamFailure.REFUSED_STREAM


@dataclass(slots=True)
class _ClusterConnections:
    """The open connections of one cluster config, per (endpoint, protocol)."""

    config: ClusterConfig
    limits: ConnectionPoolLimits
    draining: bool = False  # the cluster config changed: no new requests, close when idle
    holding: int = 0  # units of `limits.connections` its connections hold
    idle: dict[tuple[str, int], list[tuple[Http1ClientConnection, float]]] = field(default_factory=dict)  # with idle-since
    multiplexed: dict[tuple[str, int], list[Http2ClientConnection]] = field(default_factory=dict)
    released: trio.Event = field(default_factory=trio.Event)

    def signal(self) -> None:
        """A connection went idle or closed: pending requests look again."""
        if self.limits.pending.count:  # each waiter holds a pending unit while it waits
            self.released.set()
            self.released = trio.Event()


class Upstreams:
    """Upstream connections of every cluster; run `run()` in a nursery first."""

    def __init__(
        self,
        *,
        certificates: CertificateManager,
        identity: Identity,
        max_header_bytes: int = 64 * 1024,
        hbone_port: int = HBONE_PORT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._certificates = certificates
        self._identity = identity
        self._max_header_bytes = max_header_bytes
        self._hbone_port = hbone_port
        self._idle_timeout = idle_timeout
        self.hbone = HbonePool(self._dial_hbone)
        self._clusters: dict[str, _ClusterConnections] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.hbone.run)
            self._nursery = nursery
            nursery.start_soon(self._reap_idle)
            task_status.started()

    def connection_count(self) -> int:
        return sum(
            sum(len(v) for v in c.idle.values()) + sum(len(v) for v in c.multiplexed.values()) for c in self._clusters.values()
        )

    async def send(
        self,
        cluster: ClusterConfig,
        limits: ConnectionPoolLimits,
        endpoint: Endpoint,
        request: Request,
        *,
        http2: bool,
        tunnel_headers: tuple[tuple[str, str], ...] = (),
    ) -> Response:
        """Send `request` to `endpoint`; the response once its head arrived.

        Raises UpstreamConnectFailed, UpstreamReset, Overflow (no room to wait for a
        connection), BodyError (the request body broke on the way).
        """
        connections = self._clusters.get(cluster.name)
        if connections is None or connections.limits is not limits or (connections.config is not cluster and connections.config != cluster):
            if connections is not None:
                self._drain(connections)
            connections = self._clusters[cluster.name] = _ClusterConnections(cluster, limits)
        if http2:
            connection2 = await self._lease_http2(cluster, connections, endpoint, tunnel_headers)
            try:
                return await connection2.send(request)
            except StreamResetError as exc:
                raise UpstreamReset(f"{_describe(cluster, endpoint)}: {exc}", refused=exc.refused) from exc
        connection1 = await self._lease_http1(cluster, connections, endpoint, tunnel_headers)
        try:
            return await connection1.send(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UpstreamReset(f"{_describe(cluster, endpoint)}: connection broke before the response: {exc or type(exc).__name__}") from exc
        except h11.ProtocolError as exc:
            raise UpstreamReset(f"{_describe(cluster, endpoint)}: bad HTTP/1.1 response: {exc}") from exc

    # --- HTTP/1.1: one request per connection at a time ---

    async def _lease_http1(
        self,
        cluster: ClusterConfig,
        connections: _ClusterConnections,
        endpoint: Endpoint,
        tunnel_headers: tuple[tuple[str, str], ...],
    ) -> Http1ClientConnection:
        idle = connections.idle.setdefault(endpoint.key, [])
        while True:
            while idle:
                connection, _ = idle.pop()
                if not connection.closed:
                    return connection
            if self._make_room(connections):
                break
            await self._wait_pending(connections)
        max_requests = cluster.limits.max_requests_per_connection
        try:
            stream = await self._open_stream(cluster, endpoint, tunnel_headers)
        except BaseException:
            self._connection_closed(connections)
            raise

        def on_idle(connection: Http1ClientConnection) -> None:
            if connections.draining or (max_requests is not None and connection.requests_sent >= max_requests):
                self._nursery_close(connection)
                return
            connections.idle.setdefault(endpoint.key, []).append((connection, trio.current_time()))
            connections.signal()

        return Http1ClientConnection(
            stream,
            max_header_bytes=self._max_header_bytes,
            on_idle=on_idle,
            on_close=lambda: self._connection_closed(connections),
        )

    def _make_room(self, connections: _ClusterConnections) -> bool:
        """Take a connection slot, closing an idle connection of another endpoint if the
        cluster is at its limit; False when every slot is busy."""
        if connections.limits.connections.can_acquire():
            connections.limits.connections.try_acquire()
            connections.holding += 1
            return True
        for idle in connections.idle.values():
            while idle:
                connection, _ = idle.pop()
                if not connection.closed:
                    self._nursery_close(connection)
                    return False  # its release wakes us to take the slot
        return False

    async def _wait_pending(self, connections: _ClusterConnections) -> None:
        """Wait for a connection to be released, counted as a pending request (UO when full)."""
        connections.limits.pending.try_acquire()
        try:
            await connections.released.wait()
        finally:
            connections.limits.pending.release()

    def _connection_closed(self, connections: _ClusterConnections) -> None:
        if connections.holding:  # not when draining released it already
            connections.holding -= 1
            connections.limits.connections.release()
        connections.signal()
        current = self._clusters.get(connections.config.name)
        if current is not None and current is not connections:
            current.signal()  # a drained connection made room for the new config's requests

    def _drain(self, connections: _ClusterConnections) -> None:
        """Retire the connections of a replaced cluster config (see the module invariants)."""
        connections.draining = True
        for _ in range(connections.holding):
            connections.limits.connections.release()
        connections.holding = 0
        for idle in connections.idle.values():
            while idle:
                self._nursery_close(idle.pop()[0])
        assert self._nursery is not None
        for pool in connections.multiplexed.values():
            for connection in pool:
                self._nursery.start_soon(self._close_when_idle, connection)

    async def _close_when_idle(self, connection: Http2ClientConnection) -> None:
        while connection.active_requests and not connection.closed.is_set():
            await trio.sleep(_DRAIN_POLL_INTERVAL)
        await connection.aclose()

    def _nursery_close(self, connection: Http1ClientConnection) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(connection.aclose)

    # --- HTTP/2: multiplexed ---

    async def _lease_http2(
        self,
        cluster: ClusterConfig,
        connections: _ClusterConnections,
        endpoint: Endpoint,
        tunnel_headers: tuple[tuple[str, str], ...],
    ) -> Http2ClientConnection:
        pool = connections.multiplexed.setdefault(endpoint.key, [])
        while True:
            for connection in pool:
                if connection.usable:
                    return connection
            if self._make_room(connections):
                break
            await self._wait_pending(connections)
        try:
            stream = await self._open_stream(cluster, endpoint, tunnel_headers)
        except BaseException:
            self._connection_closed(connections)
            raise
        connection = Http2ClientConnection(
            stream, max_requests=cluster.limits.max_requests_per_connection, max_header_bytes=self._max_header_bytes
        )
        assert self._nursery is not None
        await self._nursery.start(self._run_http2, connection, pool, connections)
        return connection

    async def _run_http2(
        self,
        connection: Http2ClientConnection,
        pool: list[Http2ClientConnection],
        connections: _ClusterConnections,
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        pool.append(connection)
        try:
            await connection.run(task_status=task_status)
        finally:
            pool.remove(connection)
            self._connection_closed(connections)

    # --- opening streams ---

    async def _open_stream(
        self, cluster: ClusterConfig, endpoint: Endpoint, tunnel_headers: tuple[tuple[str, str], ...]
    ) -> trio.abc.Stream:
        where = _describe(cluster, endpoint)
        try:
            with trio.fail_after(cluster.connect_timeout):
                if endpoint.tunnel is Tunnel.HBONE:
                    assert endpoint.identity is not None  # from_xds requires it for HBONE
                    key = PoolKey(
                        source_identity=self._identity,
                        destination_identities=(Identity.parse(endpoint.identity),),
                        address=(endpoint.address, self._hbone_port),
                        source_ip=None,
                    )
                    return await self.hbone.open_tunnel(key, str(endpoint), tunnel_headers)
                return netio.SocketStream(await netio.connect((endpoint.address, endpoint.port)))
        except trio.TooSlowError:
            raise UpstreamConnectFailed(f"{where}: not connected within the connect timeout of {cluster.connect_timeout:g} s") from None
        except TunnelRejected as exc:
            raise UpstreamConnectFailed(f"{where}: {exc} (the destination ztunnel refused the tunnel)") from exc
        except UpstreamConnectFailed as exc:
            raise UpstreamConnectFailed(f"{where}: {exc}") from exc
        except (OSError, trio.BrokenResourceError) as exc:
            raise UpstreamConnectFailed(f"{where}: connect failed: {exc}") from exc

    async def _dial_hbone(self, key: PoolKey) -> TunnelConnection:
        """The HBONE pool's dialer: TCP to podIP:15008, mTLS as the waypoint."""
        host, port = key.address
        try:
            cert = await self._certificates.get(key.source_identity)
        except CertificateUnavailable as exc:
            raise UpstreamConnectFailed(f"the waypoint has no certificate: {exc}") from exc
        try:
            sock = await netio.connect(key.address)
        except OSError as exc:
            raise UpstreamConnectFailed(f"connect to HBONE {host}:{port} failed: {exc}") from exc
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                return await client_connection(
                    sock, client_context(cert), local_identity=key.source_identity, expected=key.destination_identities
                )
        except (TlsError, OSError, trio.TooSlowError) as exc:
            netio.close(sock)
            reason = getattr(exc, "reason", None) or str(exc) or "timed out"
            raise UpstreamConnectFailed(f"TLS with HBONE peer {host}:{port} failed: {reason}") from exc
        except BaseException:
            netio.close(sock)
            raise

    # --- idle connections ---

    async def _reap_idle(self) -> None:
        seen: dict[Http2ClientConnection, tuple[int, float]] = {}
        while True:
            await trio.sleep(_REAP_INTERVAL)
            now = trio.current_time()
            for connections in self._clusters.values():
                for idle in connections.idle.values():
                    for entry in [e for e in idle if now - e[1] > self._idle_timeout or e[0].closed]:
                        idle.remove(entry)
                        self._nursery_close(entry[0])
                for pool in connections.multiplexed.values():
                    for connection in list(pool):  # closing one removes it from the pool
                        sent, since = seen.get(connection, (-1, now))
                        if connection.requests_sent != sent or connection.active_requests:
                            seen[connection] = (connection.requests_sent, now)
                        elif now - since > self._idle_timeout:
                            await connection.aclose()
            seen = {c: v for c, v in seen.items() if not c.closed.is_set()}


def _describe(cluster: ClusterConfig, endpoint: Endpoint) -> str:
    how = f"HBONE as {endpoint.identity}" if endpoint.tunnel is Tunnel.HBONE else "TCP"
    return f"cluster {cluster.name} endpoint {endpoint} ({how})"

