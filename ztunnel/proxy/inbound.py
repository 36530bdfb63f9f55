"""ztunnel/proxy/inbound: HBONE inbound (15008) and plaintext inbound (15006).

HBONE, in phases like ztunnel's `serve_connect`:
  1. accept on a local workload's IP; the certificate presented is that workload's (no SNI:
     the address the client dialed says which pod it wants);
  2. mTLS handshake: the client must chain to the mesh root and be of our trust domain;
  3. per CONNECT: parse the authority, check it names the IP the TLS connection arrived on
     and a workload on this node (400 / 503), authorize with the peer's identity (401),
     connect to the app (503), and only then answer 200 and relay bytes.
Plaintext inbound: connections that reached a local workload without HBONE (from outside the
mesh) are authorized with no identity and relayed; STRICT PeerAuthentication shows up as a
DENY policy that refuses them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket

import trio

from meshcore import netio
from meshcore.hbone.connection import TunnelConnection, TunnelRequest
from meshcore.hbone.handshake import server_connection
from meshcore.identity.manager import CertificateUnavailable
from meshcore.log import get_logger
from meshcore.tls.context import server_context
from meshcore.tls.errors import PeerIdentityError, TlsError
from ztunnel.metrics import ConnectionInfo
from ztunnel.proxy import copy
from ztunnel.proxy.errors import (
    AuthorizationRevoked,
    IdentityFailure,
    MalformedConnect,
    NoLocalWorkload,
    PolicyDenied,
    ProxyError,
    SelfCall,
    TlsFailure,
    UpstreamConnectFailed,
)
from ztunnel.proxy.inputs import CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, ProxyInputs
from ztunnel.proxy.route import inbound_destination, parse_authority
from ztunnel.rbac import ConnectionAttributes, authorize

_log = get_logger("inbound")


class InboundHbone:
    """Serves HBONE for this node's workloads."""

    def __init__(self, inputs: ProxyInputs) -> None:
        self._in = inputs

    async def serve_listener(self, listener: socket.socket, connections: trio.Nursery) -> None:
        await netio.serve_listener(listener, connections, self._serve_connection)

    async def _serve_connection(self, sock: socket.socket) -> None:
        inputs = self._in
        local_ip, local_port = sock.getsockname()[:2]
        peer = sock.getpeername()[:2]
        state = inputs.state.current
        workload = state.workload_by_ip(ipaddress.ip_address(local_ip))
        info = ConnectionInfo(
            reporter="destination",
            src_addr=peer,
            dst_addr=(local_ip, local_port),
            hbone_target=None,
            source_workload=state.workload_by_ip(ipaddress.ip_address(peer[0])),
            source_identity=None,
            destination_workload=workload,
            destination_service=None,
            destination_identity=workload.identity if workload else None,
            mtls=True,
        )
        try:
            if workload is None or workload.node != inputs.config.node:
                raise NoLocalWorkload(f"no workload on node {inputs.config.node} has address {local_ip}")
            try:
                cert = await inputs.certificates.get(workload.identity)
            except CertificateUnavailable as exc:
                raise IdentityFailure(str(exc)) from exc
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                conn = await server_connection(
                    sock,
                    server_context(cert),
                    local_identity=workload.identity,
                    trust_domain=inputs.config.trust_domain,
                    on_request=self._serve_tunnel,
                    on_bad_request=lambda reason: self._bad_request(info, reason),
                )
        except (ProxyError, TlsError, trio.TooSlowError, OSError) as exc:
            error = _handshake_error(exc)
            inputs.metrics.connection(info).failed(error)
            _log.warning("inbound HBONE connection refused", peer=f"{peer[0]}:{peer[1]}", error=str(error))
            netio.close(sock)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_goaway_on_drain, inputs, conn)
            await conn.run()
            nursery.cancel_scope.cancel()

    def _bad_request(self, info: ConnectionInfo, reason: str) -> None:
        self._in.metrics.connection(info).failed(MalformedConnect(f"malformed CONNECT: {reason}"))
        _log.warning("malformed HBONE request", peer=f"{info.src_addr[0]}:{info.src_addr[1]}", reason=reason)

    async def _serve_tunnel(self, request: TunnelRequest) -> None:
        inputs = self._in
        conn = request.connection
        state = inputs.state.current
        peer_ip = ipaddress.ip_address(conn.peer_address[0])
        info = ConnectionInfo(
            reporter="destination",
            src_addr=conn.peer_address,
            dst_addr=conn.local_address,
            hbone_target=request.authority,
            source_workload=state.workload_by_ip(peer_ip),
            source_identity=conn.peer_identity,
            destination_workload=None,
            destination_service=None,
            destination_identity=conn.local_identity,
            mtls=True,
        )
        try:
            ip, port = parse_authority(request.authority)
            if str(ip) != conn.local_address[0]:
                raise MalformedConnect(
                    f"CONNECT {request.authority} arrived on {conn.local_address[0]}: a tunnel may only target the pod it was dialed on"
                )
            workload, ip, port = inbound_destination(state, request.authority, inputs.config.node)
            info = dataclasses.replace(
                info,
                destination_workload=workload,
                destination_service=_forwarded_service(state, request.header("forwarded")),
                dst_addr=(str(ip), port),
            )
            if port in inputs.config.ports.own:
                raise SelfCall(f"CONNECT {request.authority} targets ztunnel's own port {port}")
            attributes = ConnectionAttributes(src_ip=peer_ip, dst_ip=ip, dst_port=port, src_identity=conn.peer_identity)
            decision = authorize(state.policies_for(workload), attributes)
            if not decision.allowed:
                raise PolicyDenied(decision)
            upstream = await _connect_app(inputs, (str(ip), port), conn.peer_address[0])
        except ProxyError as error:
            request.reject(error.status)
            inputs.metrics.connection(info).failed(error)
            return
        try:
            tunnel = request.accept()
        except trio.BrokenResourceError as exc:
            netio.close(upstream)
            inputs.metrics.connection(info).failed(UpstreamConnectFailed(f"client went away: {exc}"))
            return
        recorder = inputs.metrics.connection(info)
        recorder.allowed_by(decision.policy)
        recorder.opened()
        error: BaseException | None = None
        with trio.CancelScope() as scope:
            key = inputs.connections.register(attributes, workload.uid, scope)
            try:
                await tunnel.relay(upstream)
            except (trio.BrokenResourceError, OSError) as exc:
                error = UpstreamConnectFailed(f"relay to {ip}:{port} broke: {exc}")
            finally:
                netio.close(upstream)
        closed_by = inputs.connections.unregister(key)
        if closed_by is not None:
            error = AuthorizationRevoked(None if closed_by == "-" else closed_by)
            await tunnel.aclose()
        recorder.closed(sent=tunnel.bytes_sent, received=tunnel.bytes_received, error=error)


class InboundPlaintext:
    """Port 15006: captured plaintext connections to a local workload (no peer identity)."""

    def __init__(self, inputs: ProxyInputs) -> None:
        self._in = inputs

    async def serve_listener(self, listener: socket.socket, connections: trio.Nursery) -> None:
        await netio.serve_listener(listener, connections, self._serve_connection)

    async def _serve_connection(self, sock: socket.socket) -> None:
        inputs = self._in
        state = inputs.state.current
        peer = sock.getpeername()[:2]
        dst_ip_text, dst_port = netio.original_destination(sock)
        dst_ip = ipaddress.ip_address(dst_ip_text)
        workload = state.workload_by_ip(dst_ip)
        info = ConnectionInfo(
            reporter="destination",
            src_addr=peer,
            dst_addr=(dst_ip_text, dst_port),
            hbone_target=None,
            source_workload=state.workload_by_ip(ipaddress.ip_address(peer[0])),
            source_identity=None,
            destination_workload=workload,
            destination_service=None,
            destination_identity=workload.identity if workload else None,
            mtls=False,
        )
        counts = [0, 0]
        recorder = inputs.metrics.connection(info)
        try:
            if workload is None or workload.node != inputs.config.node:
                raise NoLocalWorkload(f"no workload on node {inputs.config.node} has address {dst_ip}")
            if dst_port in inputs.config.ports.own:
                raise SelfCall(f"plaintext connection to ztunnel's own port {dst_port}")
            attributes = ConnectionAttributes(src_ip=ipaddress.ip_address(peer[0]), dst_ip=dst_ip, dst_port=dst_port, src_identity=None)
            decision = authorize(state.policies_for(workload), attributes)
            if not decision.allowed:
                raise PolicyDenied(decision)
            recorder.allowed_by(decision.policy)
            upstream = await _connect_app(inputs, (dst_ip_text, dst_port), peer[0])
        except ProxyError as error:
            recorder.failed(error)
            netio.abort(sock)
            return
        recorder.opened()
        error: BaseException | None = None
        try:
            with trio.CancelScope() as scope:
                key = inputs.connections.register(attributes, workload.uid, scope)
                await copy.relay(sock, upstream, counts)
        except OSError as exc:
            error = UpstreamConnectFailed(f"relay to {dst_ip}:{dst_port} broke: {exc}")
        finally:
            netio.close(upstream)
            netio.close(sock)
        closed_by = inputs.connections.unregister(key)
        if closed_by is not None:
            error = AuthorizationRevoked(None if closed_by == "-" else closed_by)
        recorder.closed(sent=counts[1], received=counts[0], error=error)


async def _connect_app(inputs: ProxyInputs, address: tuple[str, int], client_ip: str) -> socket.socket:
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            return await inputs.sockets.connect_to_pod(address, client_ip=client_ip)
    except (OSError, trio.TooSlowError) as exc:
        raise UpstreamConnectFailed(f"connect to the application at {address[0]}:{address[1]} failed: {exc or 'timed out'}") from exc


async def _goaway_on_drain(inputs: ProxyInputs, conn: TunnelConnection) -> None:
    await inputs.drain.wait_started()
    conn.goaway()


def _forwarded_service(state, forwarded: str | None):
    """The Service the client addressed, from `forwarded: for="...";host=<fqdn>` (metrics only)."""
    if not forwarded:
        return None
    for part in forwarded.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "host" and value:
            host = value.strip('"')
            labels = host.split(".")
            return state.service_by_key(f"{labels[1]}/{host}") if len(labels) > 1 else None
    return None


def _handshake_error(exc: BaseException) -> ProxyError:
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, PeerIdentityError):
        return IdentityFailure(f"client identity refused: {exc.reason}")
    if isinstance(exc, TlsError):
        return TlsFailure(f"TLS handshake failed: {exc.reason}")
    if isinstance(exc, trio.TooSlowError):
        return TlsFailure(f"TLS handshake did not finish within {HANDSHAKE_TIMEOUT:.0f} s")
    return TlsFailure(f"connection failed during the TLS handshake: {exc}")
