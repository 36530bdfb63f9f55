"""meshcore/netio: raw non-blocking sockets driven by trio's low-level I/O waits.

The proxies' data paths use plain stdlib sockets in non-blocking mode and call trio only when
a call would block (`wait_readable` / `wait_writable`). trio's own socket methods always yield
to the scheduler after a successful call and re-arm epoll each time, which cost a Python
tunnel about a third of its throughput (shared/reference/python-hbone-ceiling.md, "rawsock").
Loops built on these helpers must yield now and then themselves: see `Fairness`.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable

import trio

from meshcore.log import get_logger

Buffer = bytes | bytearray | memoryview

_log = get_logger("netio")

# SO_MARK value ztunnel puts on every socket it creates, so capture rules skip its traffic.
MESH_MARK = 0x539
SO_ORIGINAL_DST = 80  # from linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80
READ_SIZE = 256 * 1024
# accept() errors that mean "out of resources": log, back off, keep serving (like trio).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class Fairness:
    """Yields to the scheduler every `every` fast-path iterations of a hot loop."""

    __slots__ = ("_left", "_every")

    def __init__(self, every: int = 16) -> None:
        self._every = every
        self._left = every

    async def tick(self) -> None:
        self._left -= 1
        if self._left <= 0:
            self._left = self._every
            await trio.lowlevel.checkpoint()


async def wait_readable(sock: socket.socket) -> None:
    """trio's wait, but a socket closed under us is ClosedResourceError, not ValueError."""
    if sock.fileno() < 0:
        raise trio.ClosedResourceError("socket was closed")
    await trio.lowlevel.wait_readable(sock)


async def wait_writable(sock: socket.socket) -> None:
    if sock.fileno() < 0:
        raise trio.ClosedResourceError("socket was closed")
    await trio.lowlevel.wait_writable(sock)


async def run_both(first: Awaitable[None], second: Awaitable[None]) -> None:
    """Run two copy directions together; the first I/O failure cancels the other and is
    raised as itself (not wrapped in an ExceptionGroup), so callers can map it to an error."""
    failures: list[BaseException] = []

    async def guarded(direction: Awaitable[None], scope: trio.CancelScope) -> None:
        try:
            await direction
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            failures.append(exc)
            scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guarded, first, nursery.cancel_scope)
        await guarded(second, nursery.cancel_scope)
    if failures:
        raise failures[0]


def set_mark(sock: socket.socket, mark: int) -> None:
    """Put SO_MARK on a socket (needs CAP_NET_ADMIN)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)


def tune(sock: socket.socket) -> None:
    """TCP_NODELAY and keepalive as ztunnel sets them (idle 180 s, interval 180 s, 9 probes)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 180)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 180)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 9)


def listen(address: tuple[str, int], *, mark: int | None = None, backlog: int = 1024, transparent: bool = False) -> socket.socket:
    """A non-blocking TCP listener; port 0 picks a free port (read it with getsockname)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if mark is not None:
            set_mark(sock, mark)
        if transparent:
            sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def accept(listener: socket.socket) -> tuple[socket.socket, tuple]:
    """Accept one connection (non-blocking, tuned). Raises OSError for real failures."""
    while True:
        try:
            sock, peer = listener.accept()
        except BlockingIOError:
            await wait_readable(listener)
            continue
        sock.setblocking(False)
        tune(sock)
        return sock, peer


async def serve_listener(
    listener: socket.socket,
    connections: trio.Nursery,
    handler: Callable[[socket.socket], Awaitable[object]],
) -> None:
    """Accept until cancelled, serving each connection as `handler(sock)` in `connections`.

    Out-of-resources errors are logged and retried after a pause (like trio's serve loop).
    When cancelled, the connections already queued on the listener are served too: closing a
    listener resets them, and a pod being released still has some in flight.
    """
    try:
        while True:
            try:
                sock, _ = await accept(listener)
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                _log.error("accept failed, backing off", error=str(exc))
                await trio.sleep(0.1)
                continue
            connections.start_soon(handler, sock)
    finally:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:  # BlockingIOError: the backlog is empty
                break
            sock.setblocking(False)
            tune(sock)
            connections.start_soon(handler, sock)


async def connect(
    address: tuple[str, int], *, mark: int | None = None, source: tuple[str, int] | None = None
) -> socket.socket:
    """Open a non-blocking TCP connection. Callers put a cancel scope around it for the timeout."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if mark is not None:
            set_mark(sock, mark)
        if source is not None:
            sock.bind(source)
        tune(sock)
    except BaseException:
        sock.close()
        raise
    return await connect_socket(sock, address)


async def connect_socket(sock: socket.socket, address: tuple[str, int]) -> socket.socket:
    """Connect a prepared non-blocking socket (e.g. one made inside a pod's netns); closes it on failure."""
    try:
        try:
            sock.connect(address)
        except BlockingIOError:
            await wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"connect to {address[0]}:{address[1]}: {errno.errorcode.get(err, err)}")
    except BaseException:
        close(sock)
        raise
    return sock


async def recv_into(sock: socket.socket, buf: bytearray | memoryview) -> int:
    """Read what is available into `buf` (0 = EOF); waits only when nothing is there."""
    try:
        return sock.recv_into(buf)
    except BlockingIOError:
        pass
    while True:
        await wait_readable(sock)
        try:
            return sock.recv_into(buf)
        except BlockingIOError:
            continue


async def send_all(sock: socket.socket, data: Buffer) -> None:
    """Write all of `data`; waits only while the kernel buffer is full."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            sent = 0
        view = view[sent:]
        if view:
            await wait_writable(sock)


def send_nowait(sock: socket.socket, data: Buffer) -> int:
    """Write what the kernel takes now; returns the byte count (0 when it would block)."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


class SocketStream(trio.abc.HalfCloseableStream):
    """A trio stream over a raw non-blocking socket that yields to the scheduler only when it
    must wait, like the HBONE tunnel streams: trio's own SocketStream schedules on every call,
    which for an L7 proxy's upstream connections is a round trip per read and write.

    Cancellation is still honoured at every call (`checkpoint_if_cancelled`), and a caller
    that never waits must yield itself, as `Fairness` says.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    async def send_all(self, data: Buffer) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.socket.fileno() < 0:
            raise trio.ClosedResourceError("the socket is closed")
        try:
            await send_all(self.socket, data)
        except OSError as exc:
            raise trio.BrokenResourceError(f"send failed: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await wait_writable(self.socket)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.socket.fileno() < 0:
            raise trio.ClosedResourceError("the socket is closed")
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise trio.BrokenResourceError(f"shutdown failed: {exc}") from exc

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.socket.fileno() < 0:
            raise trio.ClosedResourceError("the socket is closed")
        size = max_bytes or READ_SIZE
        try:
            while True:
                try:
                    return self.socket.recv(size)
                except BlockingIOError:
                    await wait_readable(self.socket)
        except OSError as exc:
            raise trio.BrokenResourceError(f"receive failed: {exc}") from exc

    async def aclose(self) -> None:
        close(self.socket)
        await trio.lowlevel.checkpoint()


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """The pre-REDIRECT destination of an accepted connection (SO_ORIGINAL_DST)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = int.from_bytes(raw[2:4], "big")
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = int.from_bytes(raw[2:4], "big")
    return socket.inet_ntoa(raw[4:8]), port


def close(sock: socket.socket) -> None:
    """Close a socket that trio tasks may be waiting on."""
    if sock.fileno() >= 0:
        trio.lowlevel.notify_closing(sock)
        sock.close()


def abort(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER 0): the peer sees a reset, not a clean end."""
    if sock.fileno() >= 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        close(sock)
