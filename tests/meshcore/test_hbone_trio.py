"""HBONE over real TLS on loopback sockets: tunnels, half-close, back-pressure, pooling."""

from __future__ import annotations

import os

import pytest
import trio

from meshcore import netio
from meshcore.hbone.connection import TunnelRequest
from meshcore.hbone.errors import TunnelRejected
from meshcore.hbone.handshake import client_connection, server_connection
from meshcore.hbone.pool import HbonePool, PoolKey
from meshcore.identity.ca import CertificateAuthority
from meshcore.identity.spiffe import Identity
from meshcore.tls.context import client_context, server_context

CLIENT = Identity("cluster.local", "ns", "client")
SERVER = Identity("cluster.local", "ns", "server")


@pytest.fixture(scope="module")
def pki():
    ca = CertificateAuthority.generate()
    return ca.issue(CLIENT), ca.issue(SERVER)


async def echo_handler(request: TunnelRequest) -> None:
    if request.authority == "deny:1":
        request.reject(401)
        return
    tunnel = request.accept()
    async for chunk in tunnel:
        await tunnel.send_all(chunk)
    await tunnel.send_eof()


async def start_server(nursery: trio.Nursery, pki, handler=echo_handler) -> tuple[str, int]:
    listener = netio.listen(("127.0.0.1", 0))
    _, server_cert = pki
    connections = []

    async def serve(*, task_status):
        task_status.started()
        try:
            while True:
                sock, _ = await netio.accept(listener)
                conn = await server_connection(
                    sock, server_context(server_cert), local_identity=SERVER, trust_domain="cluster.local", on_request=handler
                )
                connections.append(conn)
                nursery.start_soon(conn.run)
        finally:
            netio.close(listener)

    await nursery.start(serve)
    return listener.getsockname()


async def dial(address, pki):
    client_cert, _ = pki
    sock = await netio.connect(address)
    return await client_connection(sock, client_context(client_cert), local_identity=CLIENT, expected=[SERVER])


async def roundtrip(tunnel, payload: bytes) -> bytes:
    received = bytearray()
    async with trio.open_nursery() as nursery:
        async def send():
            await tunnel.send_all(payload)
            await tunnel.send_eof()
        nursery.start_soon(send)
        async for chunk in tunnel:
            received += chunk
    return bytes(received)


async def test_many_concurrent_tunnels_on_one_connection(nursery, pki):
    address = await start_server(nursery, pki)
    conn = await dial(address, pki)
    await nursery.start(conn.run)
    payloads = [os.urandom(50_000 + i) for i in range(40)]
    results = {}

    async def one(i):
        tunnel = await conn.open_tunnel("10.0.0.1:80")
        results[i] = await roundtrip(tunnel, payloads[i])
        await tunnel.aclose()

    async with trio.open_nursery() as n:
        for i in range(len(payloads)):
            n.start_soon(one, i)
    assert [results[i] for i in range(len(payloads))] == payloads
    assert conn.open_tunnels == 0
    conn.abort()


async def test_bulk_transfer_larger_than_all_windows(nursery, pki):
    address = await start_server(nursery, pki)
    conn = await dial(address, pki)
    await nursery.start(conn.run)
    tunnel = await conn.open_tunnel("10.0.0.1:80")
    payload = os.urandom(40 * 1024 * 1024)  # > 16 MiB connection window, > 4 MiB stream window
    assert await roundtrip(tunnel, payload) == payload
    conn.abort()


async def test_stalled_tunnel_does_not_block_others(nursery, pki):
    """A consumer that stops reading holds only its own stream window (no head-of-line block)."""
    address = await start_server(nursery, pki)
    conn = await dial(address, pki)
    await nursery.start(conn.run)
    stalled = await conn.open_tunnel("10.0.0.1:80")
    with trio.move_on_after(1):
        await stalled.send_all(os.urandom(20 * 1024 * 1024))  # echo fills our unread inbox
    other = await conn.open_tunnel("10.0.0.1:80")
    with trio.fail_after(5):
        assert await roundtrip(other, b"x" * 100_000) == b"x" * 100_000
    conn.abort()


async def test_rejected_tunnel_reports_status(nursery, pki):
    address = await start_server(nursery, pki)
    conn = await dial(address, pki)
    await nursery.start(conn.run)
    with pytest.raises(TunnelRejected) as info:
        await conn.open_tunnel("deny:1")
    assert info.value.status == 401
    conn.abort()


async def test_server_death_breaks_open_tunnels(nursery, pki):
    started = trio.Event()

    async def hang(request):
        request.accept()
        started.set()
        await trio.sleep_forever()

    address = await start_server(nursery, pki, hang)
    conn = await dial(address, pki)
    await nursery.start(conn.run)
    tunnel = await conn.open_tunnel("10.0.0.1:80")
    await started.wait()
    conn.abort()
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        await tunnel.receive_some()


async def test_pool_shares_one_connection_for_a_burst(nursery, pki):
    address = await start_server(nursery, pki)
    dials = []

    async def dialer(key):
        dials.append(key)
        return await dial(key.address, pki)

    pool = HbonePool(dialer)
    await nursery.start(pool.run)
    key = PoolKey(CLIENT, (SERVER,), address, "127.0.0.1")

    async def one():
        tunnel = await pool.open_tunnel(key, "10.0.0.1:80")
        assert await roundtrip(tunnel, b"hi") == b"hi"

    async with trio.open_nursery() as n:
        for _ in range(32):
            n.start_soon(one)
    assert len(dials) == 1
    assert pool.connection_count() == 1
