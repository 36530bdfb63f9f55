"""meshcore/netio: the accept loop serves connections and resets none when it stops; the raw
socket stream carries bytes, half-closes and fails the way trio streams do."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from meshcore import netio


def listening() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    return listener


async def test_connections_queued_when_the_loop_is_cancelled_are_still_served():
    listener = listening()
    served: list[bytes] = []

    async def echo_once(sock: socket.socket) -> None:
        try:
            await netio.wait_readable(sock)
            data = sock.recv(100)
            served.append(data)
            sock.send(data)
        finally:
            sock.close()

    async def serve(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await netio.serve_listener(listener, connections, echo_once)

    with listener:
        async with trio.open_nursery() as connections:
            serving = await connections.start(serve)
            await trio.testing.wait_all_tasks_blocked()
            # Queued in the kernel's backlog, not yet seen by the loop, when a pod's release
            # cancels it: the loop must take them, not leave them to be reset by close().
            clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
            serving.cancel()
            for number, client in enumerate(clients):
                client.sendall(b"hello %d" % number)
            await trio.to_thread.run_sync(lambda: [client.settimeout(5) for client in clients])
            replies = await trio.to_thread.run_sync(lambda: [client.recv(100) for client in clients])
    for client in clients:
        client.close()
    assert replies == [b"hello 0", b"hello 1", b"hello 2"]
    assert sorted(served) == [b"hello 0", b"hello 1", b"hello 2"]


async def test_socket_stream_carries_bytes_half_closes_and_maps_errors_to_trios():
    left, right = socket.socketpair()
    for end in (left, right):
        end.setblocking(False)
    a, b = netio.SocketStream(left), netio.SocketStream(right)
    big = b"x" * 3_000_000  # more than the kernel buffers: send_all has to wait for the reader

    async def read_all(stream: netio.SocketStream) -> bytes:
        chunks = []
        while chunk := await stream.receive_some():
            chunks.append(chunk)
        return b"".join(chunks)

    received: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _collect(read_all(b), received))
        await a.send_all(big)
        await a.send_eof()
    assert received == [big]
    await b.send_all(b"still open this way")  # half-closed: the other direction works
    assert await a.receive_some(100) == b"still open this way"

    await b.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await b.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the peer is gone: a write fails (EPIPE) once the kernel knows
            await a.send_all(b"y" * 65536)
    await a.aclose()


async def _collect(awaitable, into: list) -> None:
    into.append(await awaitable)
