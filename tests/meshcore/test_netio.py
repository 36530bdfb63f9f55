"""meshcore/netio's accept loop: connections are served, and none is reset when it stops."""

from __future__ import annotations

import socket

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
