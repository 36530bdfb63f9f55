"""meshcore/hbone/connection: the trio shell around one HBONE connection.

One `TunnelConnection` owns a connected, TLS-handshaken raw socket, a `TlsEngine` and the
sans-IO `HboneConnection`. It runs two tasks (the design the Python HBONE reference measured
fastest, shared/reference/python-hbone-ceiling.md):

* the reader receives ciphertext, decrypts it, feeds the core, dispatches events to the
  tunnels, and flushes whatever the core queued (WINDOW_UPDATEs, PING acks) inline;
* the writer is the only other place that writes the socket. Tunnels append frames to the
  core and `_mark_dirty()`; the writer wakes once per scheduler round, so 32 busy tunnels
  cost one SSL_write and one send() instead of 32. Because only these two tasks touch the
  TLS socket and neither is cancelled mid-write, a cancelled tunnel cannot leave a partial
  TLS record behind (the "bad record mac" trap).

Payload for a tunnel that is relayed to a TCP socket is written to that socket straight from
the reader (`TunnelStream.relay`), falling back to a per-tunnel backlog only when the socket
would block; stream credit goes back to the peer only for bytes that reached the socket, which
carries the app's back-pressure through the tunnel without stalling other tunnels.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
import trio

from meshcore import netio
from meshcore.hbone import sansio
from meshcore.hbone.errors import TunnelRejected
from meshcore.tls.errors import TlsClosed, TlsError

if TYPE_CHECKING:
    from meshcore.identity.spiffe import Identity
    from meshcore.tls.engine import TlsEngine

_log = structlog.get_logger("hbone")

KEEPALIVE_INTERVAL = 10.0  # facts §1: PING every 10 s, connection dropped after 20 s silence
KEEPALIVE_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class TunnelRequest:
    """Server side: one CONNECT waiting for `accept()` or `reject()` by the handler."""

    connection: TunnelConnection
    stream_id: int
    authority: str
    headers: tuple[tuple[str, str], ...]

    @property
    def peer_identity(self) -> Identity | None:
        return self.connection.peer_identity

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def accept(self, headers: tuple[tuple[str, str], ...] = ()) -> TunnelStream:
        """Answer 200: the tunnel is open. Call only after the upstream connection succeeded.

        Raises trio.BrokenResourceError if the peer reset the stream (or the connection died)
        while the handler was busy.
        """
        stream = self.connection._streams.get(self.stream_id)
        if stream is None or stream._reset_code is not None:
            raise trio.BrokenResourceError(f"HBONE stream {self.stream_id} was reset before it was accepted")
        self.connection._core.respond(self.stream_id, 200, headers)
        self.connection._mark_dirty()
        return stream

    def reject(self, status: int) -> None:
        """Answer `status` (400/401/503) and end the stream."""
        conn = self.connection
        if self.stream_id in conn._streams:
            conn._core.respond(self.stream_id, status, end_stream=True)
            conn._streams.pop(self.stream_id)._on_reset(0)
            conn._mark_dirty()


RequestHandler = Callable[[TunnelRequest], Awaitable[None]]


class TunnelConnection:
    """An HBONE connection over TLS on a raw non-blocking socket; carries many tunnels."""

    def __init__(
        self,
        sock: socket.socket,
        tls: TlsEngine,
        *,
        client_side: bool,
        local_identity: Identity | None,
        peer_identity: Identity | None,
        on_request: RequestHandler | None = None,
        on_bad_request: Callable[[str], None] | None = None,
    ) -> None:
        self._sock = sock
        self._tls = tls
        self._core = sansio.HboneConnection(client_side=client_side)
        self._client_side = client_side
        self.local_identity = local_identity
        self.peer_identity = peer_identity
        self.local_address = sock.getsockname()[:2]
        self.peer_address = sock.getpeername()[:2]
        self._on_request = on_request
        self._on_bad_request = on_bad_request
        self._streams: dict[int, TunnelStream] = {}
        self._backlog = bytearray()  # ciphertext the kernel has not taken yet
        self._wakeup = trio.Event()
        self._dirty = False
        self._handler_nursery: trio.Nursery | None = None
        self._last_ping_ack = trio.current_time()
        self.failure: BaseException | None = None
        self.closed = trio.Event()
        self.going_away = False  # GOAWAY sent or received: open no new tunnels here
        self.last_used = trio.current_time()

    # --- public surface ---

    @property
    def open_tunnels(self) -> int:
        return self._core.open_streams

    @property
    def max_tunnels(self) -> int:
        return self._core.max_streams

    @property
    def usable(self) -> bool:
        """Can this connection take one more tunnel right now?"""
        return not (self.going_away or self.closed.is_set()) and self._core.open_streams < self._core.max_streams

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it closes; tunnel handlers run inside (server side).

        Never raises for connection failures: they end up in `failure`, and every tunnel
        still open sees trio.BrokenResourceError.
        """
        try:
            self._core.initiate()
            self._flush()
            async with trio.open_nursery() as handlers:
                self._handler_nursery = handlers
                try:
                    async with trio.open_nursery() as io:
                        io.start_soon(self._guard, self._writer, io.cancel_scope)
                        if self._client_side:
                            io.start_soon(self._guard, self._keepalive, io.cancel_scope)
                        io.start_soon(self._guard, self._reader, io.cancel_scope)
                        task_status.started()
                finally:
                    self.going_away = True
                    for stream in list(self._streams.values()):
                        stream._on_reset(sansio.ErrorCode.CONNECT_ERROR)
                    self._streams.clear()
        finally:
            netio.close(self._sock)
            self.closed.set()

    async def _guard(self, task: Callable[[], Awaitable[None]], io_scope: trio.CancelScope) -> None:
        """Run one I/O task; whichever ends first, or fails, ends the connection."""
        try:
            await task()
        except (OSError, TlsError, sansio.HboneProtocolError, trio.ClosedResourceError) as exc:
            if self.failure is None:
                self.failure = exc
        except Exception as exc:
            # A bug in one connection's handling ends that connection, not the proxy with
            # every other tunnel it carries; the traceback goes to the log.
            _log.exception("HBONE connection task failed; closing the connection", peer=str(self.peer_address))
            if self.failure is None:
                self.failure = exc
        finally:
            io_scope.cancel()

    async def open_tunnel(self, authority: str, headers: tuple[tuple[str, str], ...] = ()) -> TunnelStream:
        """Client side: CONNECT to `authority`; returns the tunnel once the peer answered 200.

        Raises TunnelRejected for any other status, trio.BrokenResourceError if the connection
        died first.
        """
        self.last_used = trio.current_time()
        stream_id = self._core.open_tunnel(authority, headers)
        stream = TunnelStream(self, stream_id)
        self._streams[stream_id] = stream
        self._mark_dirty()
        try:
            await stream._response.wait()
        except BaseException:
            stream._abort()
            raise
        if stream._status == 0:
            stream._abort()
            raise trio.BrokenResourceError(f"HBONE connection to {self.peer_address} failed before CONNECT {authority} was answered")
        if stream._status != 200:
            stream._abort()
            raise TunnelRejected(stream._status, authority)
        return stream

    def goaway(self) -> None:
        """Drain: tell the peer to open no new tunnels; the open ones may finish."""
        if not self.going_away and not self.closed.is_set():
            self.going_away = True
            self._core.close()
            self._mark_dirty()

    def abort(self) -> None:
        """Drop the connection now (all its tunnels break)."""
        netio.abort(self._sock)

    # --- reader / writer ---

    async def _reader(self) -> None:
        buf = bytearray(netio.READ_SIZE)
        view = memoryview(buf)
        tls, core, sock = self._tls, self._core, self._sock
        fairness = netio.Fairness()
        while True:
            # Plaintext may already sit in the TLS engine (it arrived with the handshake).
            while True:
                try:
                    plaintext = tls.read_plaintext()
                except TlsClosed:
                    self._flush()
                    return
                if not plaintext:
                    break
                try:
                    events = core.receive_data(plaintext)
                except sansio.HboneProtocolError:
                    self._flush()  # the GOAWAY the core queued
                    raise
                if events:
                    self._dispatch(events)
            self._flush()
            await fairness.tick()
            n = await netio.recv_into(sock, buf)
            if n == 0:
                return
            tls.receive_ciphertext(view[:n])

    def _dispatch(self, events: list[sansio.Event]) -> None:
        streams = self._streams
        for ev in events:
            if type(ev) is sansio.TunnelData:
                stream = streams.get(ev.stream_id)
                if stream is not None:
                    stream._on_data(ev.data)
                else:
                    self._core.acknowledge(ev.stream_id, len(ev.data))
            elif type(ev) is sansio.TunnelEnded:
                stream = streams.get(ev.stream_id)
                if stream is not None:
                    stream._on_end()
            elif type(ev) is sansio.SendWindowOpened:
                if ev.stream_id == 0:
                    for stream in streams.values():
                        stream._wake_sender()
                elif (stream := streams.get(ev.stream_id)) is not None:
                    stream._wake_sender()
            elif type(ev) is sansio.TunnelResponse:
                stream = streams.get(ev.stream_id)
                if stream is not None:
                    stream._on_response(ev.status, ev.headers)
            elif type(ev) is sansio.TunnelReset:
                stream = streams.pop(ev.stream_id, None)
                if stream is not None:
                    stream._on_reset(ev.error_code)
            elif type(ev) is sansio.TunnelRequested:
                self._start_request(ev)
            elif type(ev) is sansio.BadTunnelRequest:
                if self._on_bad_request is not None:
                    self._on_bad_request(ev.reason)
            elif type(ev) is sansio.ConnectionTerminated:
                self.going_away = True
                for stream_id in [s for s in streams if s > ev.last_stream_id]:
                    streams.pop(stream_id)._on_reset(sansio.ErrorCode.REFUSED_STREAM)
            elif type(ev) is sansio.PingAcknowledged:
                self._last_ping_ack = trio.current_time()

    def _start_request(self, ev: sansio.TunnelRequested) -> None:
        self._streams[ev.stream_id] = TunnelStream(self, ev.stream_id)
        if self._on_request is None or self._handler_nursery is None or self.going_away:
            self._core.respond(ev.stream_id, 503, end_stream=True)
            self._streams.pop(ev.stream_id)._on_reset(0)
            return
        self._handler_nursery.start_soon(self._handle_request, TunnelRequest(self, ev.stream_id, ev.authority, ev.headers))

    async def _handle_request(self, request: TunnelRequest) -> None:
        stream = self._streams.get(request.stream_id)
        try:
            await self._on_request(request)  # type: ignore[misc]
        except Exception:
            # A bug in one tunnel's handler must not take down the connection's other tunnels.
            _log.exception("hbone tunnel handler failed", authority=request.authority, peer=str(self.peer_identity))
        finally:
            if stream is not None:
                stream._abort()

    def _mark_dirty(self) -> None:
        if not self._dirty:
            self._dirty = True
            self._wakeup.set()

    def _flush(self) -> None:
        """Encrypt what the core queued and write what the kernel takes; never blocks."""
        out = self._core.data_to_send()
        if out:
            self._tls.write_plaintext(out)
        ciphertext = self._tls.ciphertext_to_send()
        if not ciphertext:
            return
        if self._backlog:
            self._backlog += ciphertext
            return
        try:
            sent = netio.send_nowait(self._sock, ciphertext)
        except OSError as exc:
            # The reader or writer notices the dead socket and ends the connection.
            self.failure = self.failure or exc
            self._backlog += ciphertext
            self._mark_dirty()
            return
        if sent < len(ciphertext):
            self._backlog += memoryview(ciphertext)[sent:]
            self._mark_dirty()

    async def _writer(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            self._dirty = False
            self._flush()
            while self._backlog:
                await netio.wait_writable(self._sock)
                sent = netio.send_nowait(self._sock, self._backlog)
                del self._backlog[:sent]
                self._flush()

    async def _keepalive(self) -> None:
        while True:
            await trio.sleep(KEEPALIVE_INTERVAL)
            if trio.current_time() - self._last_ping_ack > KEEPALIVE_TIMEOUT:
                raise TimeoutError(f"HBONE peer {self.peer_address} stopped answering PINGs")
            self._core.ping(os.urandom(8))
            self._mark_dirty()


class TunnelStream(trio.abc.HalfCloseableStream):
    """One CONNECT tunnel as a trio stream; `relay()` is the fast path to a TCP socket."""

    def __init__(self, connection: TunnelConnection, stream_id: int) -> None:
        self._conn = connection
        self._core = connection._core
        self.stream_id = stream_id
        self.bytes_sent = 0
        self.bytes_received = 0
        self._response = trio.Event()
        self._status = 0
        self.response_headers: tuple[tuple[str, str], ...] = ()
        self._inbox: deque[bytes | memoryview] = deque()  # payload not yet consumed (stream mode)
        self._backlog = bytearray()  # payload not yet written to the sink (relay mode)
        self._sink: socket.socket | None = None
        self._recv_wakeup = trio.Event()
        self._send_wakeup = trio.Event()
        self._remote_ended = False
        self._local_ended = False
        self._reset_code: int | None = None
        self._closed = False

    @property
    def connection(self) -> TunnelConnection:
        return self._conn

    # --- events from the connection's reader ---

    def _on_response(self, status: int, headers: tuple[tuple[str, str], ...]) -> None:
        self._status = status
        self.response_headers = headers
        self._response.set()

    def _on_data(self, data: bytes | memoryview) -> None:
        self.bytes_received += len(data)
        sink = self._sink
        if sink is not None and not self._backlog:
            try:
                sent = netio.send_nowait(sink, data)
            except OSError:
                self._abort()
                return
            if sent:
                self._core.acknowledge(self.stream_id, sent)
            if sent == len(data):
                return
            data = data[sent:]
        if sink is not None:
            self._backlog += data
        else:
            self._inbox.append(data)
        self._recv_wakeup.set()

    def _on_end(self) -> None:
        self._remote_ended = True
        self._recv_wakeup.set()
        self._forget_if_done()

    def _on_reset(self, error_code: int) -> None:
        if self._reset_code is None:
            self._reset_code = error_code
        self._response.set()
        self._recv_wakeup.set()
        self._send_wakeup.set()

    def _wake_sender(self) -> None:
        self._send_wakeup.set()

    def _forget_if_done(self) -> None:
        if self._remote_ended and self._local_ended:
            self._conn._streams.pop(self.stream_id, None)

    def _abort(self) -> None:
        """Reset the tunnel unless it finished cleanly in both directions."""
        self._closed = True
        if self._conn._streams.pop(self.stream_id, None) is not None and not (self._remote_ended and self._local_ended):
            self._core.reset(self.stream_id)
            self._conn._mark_dirty()
        if self._reset_code is None and not (self._remote_ended and self._local_ended):
            self._reset_code = sansio.ErrorCode.CANCEL
        self._recv_wakeup.set()
        self._send_wakeup.set()

    def _check_sendable(self) -> None:
        if self._reset_code is not None:
            raise trio.BrokenResourceError(f"HBONE tunnel {self.stream_id} was reset (code {self._reset_code})")
        if self._local_ended:
            raise trio.ClosedResourceError("tunnel already half-closed")

    # --- trio stream API ---

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data)
        total = len(view)
        offset = 0
        while offset < total:
            self._check_sendable()
            taken = self._core.send_data(self.stream_id, view[offset:])
            if taken:
                offset += taken
                self.bytes_sent += taken
                self._conn._mark_dirty()
                continue
            # Out of send window: the writer flushes what we queued; the peer's
            # WINDOW_UPDATE wakes us. Re-check after every wakeup.
            self._send_wakeup = trio.Event()
            if self._core.send_window(self.stream_id) <= 0 and self._reset_code is None:
                await self._send_wakeup.wait()

    async def wait_send_all_might_not_block(self) -> None:
        while self._reset_code is None and not self._local_ended and self._core.send_window(self.stream_id) <= 0:
            self._send_wakeup = trio.Event()
            await self._send_wakeup.wait()
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._local_ended or self._reset_code is not None:
            return
        self._local_ended = True
        self._core.send_eof(self.stream_id)
        self._conn._mark_dirty()
        self._forget_if_done()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._inbox:
            if self._closed:
                raise trio.ClosedResourceError("tunnel closed")
            if self._remote_ended:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return b""
            if self._reset_code is not None:
                raise trio.BrokenResourceError(f"HBONE tunnel {self.stream_id} was reset (code {self._reset_code})")
            self._recv_wakeup = trio.Event()
            await self._recv_wakeup.wait()
        chunk = self._inbox.popleft()
        if max_bytes is not None and len(chunk) > max_bytes:
            self._inbox.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        if self._core.acknowledge(self.stream_id, len(chunk)):
            self._conn._mark_dirty()
        return bytes(chunk)

    async def aclose(self) -> None:
        self._abort()
        await trio.lowlevel.checkpoint()

    # --- relay to a TCP socket ---

    async def relay(self, sock: socket.socket) -> None:
        """Copy both ways between this tunnel and `sock` until both sides ended, with half-close.

        Raises trio.BrokenResourceError if the tunnel was reset, OSError if the socket failed.
        """
        await netio.run_both(self._socket_to_tunnel(sock), self._tunnel_to_socket(sock))

    async def _socket_to_tunnel(self, sock: socket.socket) -> None:
        buf = bytearray(netio.READ_SIZE)
        view = memoryview(buf)
        fairness = netio.Fairness()
        while True:
            n = await netio.recv_into(sock, buf)
            if n == 0:
                await self.send_eof()
                return
            await self.send_all(view[:n])
            await fairness.tick()

    async def _tunnel_to_socket(self, sock: socket.socket) -> None:
        self._sink = sock
        while self._inbox:  # payload that arrived before the relay started
            self._backlog += self._inbox.popleft()
        while True:
            if self._backlog:
                await netio.wait_writable(sock)
                sent = netio.send_nowait(sock, self._backlog)
                del self._backlog[:sent]
                if self._core.acknowledge(self.stream_id, sent):
                    self._conn._mark_dirty()
                continue
            if self._remote_ended:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            if self._reset_code is not None:
                raise trio.BrokenResourceError(f"HBONE tunnel {self.stream_id} was reset (code {self._reset_code})")
            self._recv_wakeup = trio.Event()
            await self._recv_wakeup.wait()
