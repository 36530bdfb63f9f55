"""waypoint/listener: the HBONE listener (15008) that client ztunnels send a service's traffic to.

In phases, like the ztunnel's inbound `serve_connect`:
  1. mTLS handshake with the waypoint's own certificate; the client must chain to the mesh
     root and be of our trust domain (its identity is the client's, for L7 authorization);
  2. per CONNECT: the authority is the service `VIP:port` the client addressed (facts §4);
     unparsable -> 400, no known service port there -> 503; otherwise 200 at once, since
     the waypoint itself terminates the tunnel;
  3. inside the tunnel, HTTP/1.1 or HTTP/2: the service port's app protocol decides, or, when
     it does not say, the HTTP/2 connection preface does;
  4. every request goes to the pipeline with what the tunnel tells about it (`Downstream`).
Draining sends GOAWAY on every HBONE connection: open tunnels finish, new ones go elsewhere.
"""

from __future__ import annotations

import ipaddress
import socket
from functools import partial

import trio

from meshcore import netio
from meshcore.drain import Drain
from meshcore.hbone.connection import TunnelConnection, TunnelRequest, TunnelStream
from meshcore.hbone.handshake import server_connection
from meshcore.identity.manager import CertificateManager, CertificateUnavailable
from meshcore.identity.spiffe import Identity
from meshcore.log import get_logger
from meshcore.tls.context import server_context
from meshcore.tls.errors import TlsError
from waypoint.config.model import listener_name
from waypoint.feeds import WaypointStore
from waypoint.http1 import serve_http1
from waypoint.http2 import serve_http2
from waypoint.http2_wire import PREFACE
from waypoint.pipeline import Downstream, Pipeline
from waypoint.settings import HttpLimits

HANDSHAKE_TIMEOUT = 10.0  # as ztunnel's inbound
_HTTP2_PROTOCOLS = frozenset({"http2", "grpc"})

_log = get_logger("listener")


class HboneListener:
    """Accepts HBONE connections and serves HTTP inside their tunnels."""

    def __init__(
        self,
        *,
        identity: Identity,
        certificates: CertificateManager,
        store: WaypointStore,
        pipeline: Pipeline,
        limits: HttpLimits,
        drain: Drain,
    ) -> None:
        self._identity = identity
        self._certificates = certificates
        self._store = store
        self._pipeline = pipeline
        self._limits = limits
        self._drain = drain

    async def serve_listener(self, listener: socket.socket, connections: trio.Nursery) -> None:
        await netio.serve_listener(listener, connections, self._serve_connection)

    async def _serve_connection(self, sock: socket.socket) -> None:
        peer = sock.getpeername()[:2]
        try:
            cert = await self._certificates.get(self._identity)
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                conn = await server_connection(
                    sock,
                    server_context(cert),
                    local_identity=self._identity,
                    trust_domain=self._identity.trust_domain,
                    on_request=self._serve_tunnel,
                    on_bad_request=lambda reason: _log.warning("malformed HBONE request", peer=f"{peer[0]}:{peer[1]}", reason=reason),
                )
        except (CertificateUnavailable, TlsError, trio.TooSlowError, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc) or "TLS handshake timed out"
            _log.warning("HBONE connection refused", peer=f"{peer[0]}:{peer[1]}", error=reason)
            netio.close(sock)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._goaway_on_drain, conn)
            await conn.run()
            nursery.cancel_scope.cancel()

    async def _goaway_on_drain(self, conn: TunnelConnection) -> None:
        await self._drain.wait_started()
        conn.goaway()

    async def _serve_tunnel(self, request: TunnelRequest) -> None:
        conn = request.connection
        peer = f"{conn.peer_address[0]}:{conn.peer_address[1]}"
        try:
            ip, port = _parse_authority(request.authority)
        except ValueError as exc:
            _log.warning("HBONE CONNECT refused", peer=peer, authority=request.authority, status=400, error=str(exc))
            request.reject(400)
            return
        found = self._store.current.addresses.service(ip, port)
        if found is None:
            _log.warning(
                "HBONE CONNECT refused",
                peer=peer,
                authority=request.authority,
                status=503,
                error="no service port of this waypoint's mesh has that address (is the service bound to this waypoint?)",
            )
            request.reject(503)
            return
        service, service_port = found
        try:
            tunnel = request.accept()
        except trio.BrokenResourceError:
            return  # the client reset the tunnel before we answered
        downstream = Downstream(
            listener=listener_name(service.hostname, port),
            service=service,
            port=port,
            client_identity=conn.peer_identity,
            client_address=conn.peer_address,
        )
        handler = partial(self._pipeline.handle, downstream)
        try:
            if service_port.app_protocol in _HTTP2_PROTOCOLS:
                await serve_http2(tunnel, handler, self._limits)
            elif service_port.app_protocol == "http1":
                await serve_http1(tunnel, handler, self._limits)
            else:
                is_http2, initial = await _detect_http2(tunnel, self._limits.header_timeout)
                serve = serve_http2 if is_http2 else serve_http1
                await serve(tunnel, handler, self._limits, initial=initial)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the tunnel broke; nothing left to answer
        finally:
            await _close_tunnel(tunnel)


async def _detect_http2(stream: trio.abc.Stream, timeout: float) -> tuple[bool, bytes]:
    """Whether the client starts with the HTTP/2 connection preface, and what was read."""
    data = b""
    with trio.move_on_after(timeout):
        while len(data) < len(PREFACE) and PREFACE.startswith(data):
            chunk = await stream.receive_some(len(PREFACE) - len(data))
            if not chunk:
                break
            data += chunk
    return data == PREFACE, data


async def _close_tunnel(tunnel: TunnelStream) -> None:
    """End our side cleanly (the client sees EOF, not a reset), then let go of the tunnel."""
    try:
        await tunnel.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    await tunnel.aclose()


def _parse_authority(authority: str) -> tuple[str, int]:
    """"ip:port" or "[ipv6]:port" -> (normalised ip, port); ValueError otherwise."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"authority {authority!r} is not ip:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"authority {authority!r} has port {port} outside 1-65535")
    try:
        ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        raise ValueError(f"authority {authority!r} does not start with an IP address") from None
    return str(ip), port
