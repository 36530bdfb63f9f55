"""ztunnel/proxy/outbound: outbound capture (15001, transparent) and SOCKS5 (15080, explicit).

Both find the source workload (by the client's IP), decide with `build_outbound_request`
(pure), then act: plain TCP to the target, or a tunnel over a pooled HBONE connection that
speaks for the source workload's identity and accepts only the expected peer identities.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from meshcore import netio
from meshcore.hbone.connection import TunnelConnection
from meshcore.hbone.errors import TunnelRejected
from meshcore.hbone.handshake import client_connection
from meshcore.hbone.pool import PoolKey
from meshcore.identity.manager import CertificateUnavailable
from meshcore.log import get_logger
from meshcore.tls.context import client_context
from meshcore.tls.errors import PeerIdentityError, TlsError
from ztunnel.metrics import ConnectionInfo
from ztunnel.proxy import copy
from ztunnel.proxy.errors import (
    HboneRejected,
    IdentityFailure,
    ProxyError,
    TlsFailure,
    UnknownSource,
    UpstreamConnectFailed,
)
from ztunnel.proxy.inputs import CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, ProxyInputs
from ztunnel.proxy.route import OutboundRequest, build_outbound_request
from ztunnel.state.model import Workload

_log = get_logger("outbound")

# Called once the upstream is established (SOCKS5 answers its client then); may raise.
OnEstablished = Callable[[], Awaitable[None]]
# Called when the connection fails before it was established (SOCKS5 sends an error reply).
OnFailed = Callable[[ProxyError], None]


class Outbound:
    def __init__(self, inputs: ProxyInputs) -> None:
        self._in = inputs

    async def serve_listener(self, listener: socket.socket, connections: trio.Nursery) -> None:
        """Transparent capture: the target is the pre-REDIRECT destination."""
        await netio.serve_listener(listener, connections, self._serve_captured)

    async def _serve_captured(self, sock: socket.socket) -> None:
        try:
            dst_ip, dst_port = netio.original_destination(sock)
        except OSError as exc:
            _log.warning("outbound connection without an original destination (not redirected?)", error=str(exc))
            netio.close(sock)
            return
        await self.proxy(sock, dst_ip, dst_port)

    async def proxy(
        self,
        client: socket.socket,
        dst_ip: str,
        dst_port: int,
        *,
        on_established: OnEstablished | None = None,
        on_failed: OnFailed | None = None,
    ) -> ProxyError | None:
        """Carry `client` to dst_ip:dst_port; closes `client`. Returns the error, if any."""
        inputs = self._in
        state = inputs.state.current
        peer = client.getpeername()[:2]
        source = state.workload_by_ip(ipaddress.ip_address(peer[0]))
        info = ConnectionInfo(
            reporter="source",
            src_addr=peer,
            dst_addr=(dst_ip, dst_port),
            hbone_target=None,
            source_workload=source,
            source_identity=source.identity if source else None,
            destination_workload=None,
            destination_service=None,
            destination_identity=None,
            mtls=False,
        )
        try:
            if source is None or source.node != inputs.config.node:
                raise UnknownSource(f"no workload on node {inputs.config.node} has the client address {peer[0]}")
            request = build_outbound_request(
                state, source, ipaddress.ip_address(dst_ip), dst_port, rng=inputs.rng, own_ports=inputs.config.ports.own
            )
            info = _described(info, request)
            if request.protocol == "tcp":
                await self._plain(client, request, info, on_established)
            else:
                await self._hbone(client, request, info, peer, on_established)
        except ProxyError as error:
            inputs.metrics.connection(info).failed(error)
            _log.info("outbound connection failed", src=f"{peer[0]}:{peer[1]}", dst=f"{dst_ip}:{dst_port}", error=str(error))
            if on_failed is not None:
                on_failed(error)
            else:
                netio.abort(client)  # a transparent client sees a reset, as with ztunnel
            return error
        finally:
            netio.close(client)
        return None

    async def _plain(
        self, client: socket.socket, request: OutboundRequest, info: ConnectionInfo, on_established: OnEstablished | None
    ) -> None:
        address = (str(request.dial[0]), request.dial[1])
        source_ip = str(request.source.addresses[0]) if request.source.addresses else None
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                upstream = await self._in.sockets.connect(address, source_ip=source_ip)
        except (OSError, trio.TooSlowError) as exc:
            raise UpstreamConnectFailed(f"connect to {address[0]}:{address[1]} failed: {exc or 'timed out'}") from exc
        recorder = self._in.metrics.connection(info)
        counts = [0, 0]
        error: BaseException | None = None
        try:
            if on_established is not None:
                await on_established()
            recorder.opened()
            await copy.relay(client, upstream, counts)
        except OSError as exc:
            error = UpstreamConnectFailed(f"relay to {address[0]}:{address[1]} broke: {exc}")
        finally:
            netio.close(upstream)
            recorder.closed(sent=counts[0], received=counts[1], error=error)

    async def _hbone(
        self,
        client: socket.socket,
        request: OutboundRequest,
        info: ConnectionInfo,
        peer: tuple[str, int],
        on_established: OnEstablished | None,
    ) -> None:
        source = request.source
        key = PoolKey(
            source_identity=source.identity,
            destination_identities=request.expected_identities,
            address=(str(request.dial[0]), request.dial[1]),
            source_ip=str(source.addresses[0]) if source.addresses else None,
        )
        assert request.authority is not None
        try:
            tunnel = await self._in.pool.open_tunnel(key, request.authority, _tunnel_headers(source, request, peer))
        except TunnelRejected as exc:
            raise HboneRejected(exc.status, f"{request.dial[0]}:{request.dial[1]} refused CONNECT {request.authority} with {exc.status}") from exc
        except trio.BrokenResourceError as exc:
            raise UpstreamConnectFailed(f"HBONE connection to {request.dial[0]}:{request.dial[1]} broke: {exc}") from exc
        recorder = self._in.metrics.connection(info)
        error: BaseException | None = None
        try:
            if on_established is not None:
                await on_established()
            recorder.opened()
            await tunnel.relay(client)
        except (trio.BrokenResourceError, OSError) as exc:
            error = UpstreamConnectFailed(f"tunnel to {request.authority} broke: {exc}")
        finally:
            await tunnel.aclose()
            recorder.closed(sent=tunnel.bytes_sent, received=tunnel.bytes_received, error=error)

    async def dial(self, key: PoolKey) -> TunnelConnection:
        """The pool's dialer: TCP to the peer's 15008, mTLS as the source identity."""
        inputs = self._in
        address = key.address
        try:
            cert = await inputs.certificates.get(key.source_identity)
        except CertificateUnavailable as exc:
            raise IdentityFailure(str(exc)) from exc
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                sock = await inputs.sockets.connect(address, source_ip=key.source_ip)
        except (OSError, trio.TooSlowError) as exc:
            raise UpstreamConnectFailed(f"connect to HBONE peer {address[0]}:{address[1]} failed: {exc or 'timed out'}") from exc
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                return await client_connection(
                    sock, client_context(cert), local_identity=key.source_identity, expected=key.destination_identities
                )
        except PeerIdentityError as exc:
            netio.close(sock)
            raise IdentityFailure(f"HBONE peer {address[0]}:{address[1]}: {exc.reason}") from exc
        except TlsError as exc:
            netio.close(sock)
            raise TlsFailure(f"TLS with HBONE peer {address[0]}:{address[1]} failed: {exc.reason}") from exc
        except (OSError, trio.TooSlowError) as exc:
            netio.close(sock)
            raise TlsFailure(f"TLS with HBONE peer {address[0]}:{address[1]} failed: {exc or 'timed out'}") from exc


def _described(info: ConnectionInfo, request: OutboundRequest) -> ConnectionInfo:
    return dataclasses.replace(
        info,
        dst_addr=(str(request.dial[0]), request.dial[1]),
        hbone_target=request.authority,
        destination_workload=request.destination_workload,
        destination_service=request.destination_service,
        destination_identity=request.expected_identities[0] if request.expected_identities else None,
        mtls=request.protocol == "hbone",
    )


def _tunnel_headers(source: Workload, request: OutboundRequest, peer: tuple[str, int]) -> tuple[tuple[str, str], ...]:
    """forwarded / baggage / traceparent, as ztunnel's create_hbone_request sends them."""
    forwarded = f'for="{peer[0]}:{peer[1]}"'
    if request.destination_service is not None:
        forwarded += f";host={request.destination_service.hostname}"
    baggage = [f"k8s.cluster.name={source.cluster_id}", f"k8s.namespace.name={source.namespace}"]
    if source.workload_name:
        baggage.append(f"k8s.{source.workload_type.name.lower()}.name={source.workload_name}")
    if source.canonical_name:
        baggage.append(f"service.name={source.canonical_name}")
    if source.canonical_revision:
        baggage.append(f"service.version={source.canonical_revision}")
    traceparent = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-00"
    return (("forwarded", forwarded), ("baggage", ",".join(baggage)), ("traceparent", traceparent))
