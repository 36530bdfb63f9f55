"""meshcore/hbone/handshake: turn a connected raw socket into a running-ready TunnelConnection.

The caller owns dialing and accepting (it may do so inside a pod's network namespace, with
socket marks) and puts a cancel scope around these calls for the handshake timeout.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from OpenSSL import SSL

from meshcore import netio
from meshcore.hbone.connection import RequestHandler, TunnelConnection
from meshcore.tls.context import verify_client_peer, verify_server_peer
from meshcore.tls.engine import TlsEngine
from meshcore.tls.errors import TlsError

if TYPE_CHECKING:
    from meshcore.identity.spiffe import Identity

_HANDSHAKE_READ = 64 * 1024


async def _tls_handshake(sock: socket.socket, engine: TlsEngine) -> None:
    buf = bytearray(_HANDSHAKE_READ)
    while True:
        try:
            done = engine.do_handshake()
        except TlsError:
            # Send the alert we owe the peer, so it learns why instead of seeing a bare EOF.
            alert = engine.ciphertext_to_send()
            if alert:
                try:
                    netio.send_nowait(sock, alert)
                except OSError:
                    pass
            raise
        out = engine.ciphertext_to_send()
        if out:
            await netio.send_all(sock, out)
        if done:
            return
        n = await netio.recv_into(sock, buf)
        if n == 0:
            raise TlsError("peer closed the connection during the TLS handshake")
        engine.receive_ciphertext(memoryview(buf)[:n])


async def client_connection(
    sock: socket.socket,
    context: SSL.Context,
    *,
    local_identity: Identity,
    expected: Collection[Identity],
) -> TunnelConnection:
    """TLS-handshake as client, check the server is one of `expected`, return the connection.

    Raises TlsError (or its PeerIdentityError) on failure; the socket is then the caller's
    to close.
    """
    engine = TlsEngine(context, server_side=False)
    await _tls_handshake(sock, engine)
    peer = verify_server_peer(engine.ssl_connection, expected)
    return TunnelConnection(sock, engine, client_side=True, local_identity=local_identity, peer_identity=peer)


async def server_connection(
    sock: socket.socket,
    context: SSL.Context,
    *,
    local_identity: Identity,
    trust_domain: str,
    on_request: RequestHandler,
    on_bad_request: Callable[[str], None] | None = None,
) -> TunnelConnection:
    """TLS-handshake as server, require a client identity of our trust domain."""
    engine = TlsEngine(context, server_side=True)
    await _tls_handshake(sock, engine)
    peer = verify_client_peer(engine.ssl_connection, trust_domain)
    return TunnelConnection(
        sock,
        engine,
        client_side=False,
        local_identity=local_identity,
        peer_identity=peer,
        on_request=on_request,
        on_bad_request=on_bad_request,
    )
