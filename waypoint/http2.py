"""waypoint/http2: HTTP/2 (and gRPC) inside a tunnel - the downstream server (its protocol
state in `waypoint/http2_wire.py`) and the upstream client (on h2).

Both ends share `_H2Peer`: one reader task feeds received bytes to the protocol state and
hands events to per-stream state; one writer task is the only one that writes the transport,
woken whenever a stream queued frames (so a cancelled request can never leave half a frame
behind). Bodies flow both ways under HTTP/2 flow control: received DATA is acknowledged only
as it is read, so a slow reader holds back its sender instead of filling memory, and a writer
waits for window before queueing more. Trailers are carried (gRPC's grpc-status lives there).

Server, for the same contract as http1 (`handler(request, respond)`, one task per stream):
- a request head larger than `max_header_bytes` gets 431 (the HPACK decoder itself stops at
  4x that, which ends the connection with ENHANCE_YOUR_CALM: a header bomb);
- a body larger than `max_body_bytes` fails its read with 413;
- rapid reset (CVE-2023-44487): `rapid_reset_limit` streams reset by the client before their
  response completed within `rapid_reset_window` seconds end the connection with GOAWAY
  ENHANCE_YOUR_CALM; a client reset of one stream cancels only that stream's handler;
- a connection without open streams is closed after `idle_timeout`.

Client: `Http2ClientConnection` multiplexes requests (up to the peer's
SETTINGS_MAX_CONCURRENT_STREAMS) over one upstream stream; the request body is pumped in the
background so a bidirectional gRPC stream can read responses while it still sends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import outcome
import trio

from meshcore.log import get_logger
from waypoint.http1 import Handler
from waypoint.http2_wire import H2ServerConnection
from waypoint.messages import Body, BodyError, Headers, Request, Response, local_reply, without_hop_by_hop
from waypoint.settings import HttpLimits

RECEIVE_SIZE = 64 * 1024
# Generous windows: a Python proxy pays per frame, so fewer WINDOW_UPDATE round trips matter.
STREAM_WINDOW = 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
# Stream workers kept waiting per connection after a burst of concurrent streams.
MAX_IDLE_WORKERS = 16
# Downstream GOAWAY/flush on the way out must not hang on a peer that stopped reading.
FLUSH_SECONDS = 1.0

_log = get_logger("http2")


class StreamResetError(trio.BrokenResourceError):
    """An upstream stream ended before its response head: reset by the peer (`code`), or
    its connection died (`code` None)."""

    def __init__(self, stream_id: int, code: int | None) -> None:
        reason = f"reset by the upstream ({_code_name(code)})" if code is not None else "its connection closed"
        super().__init__(f"HTTP/2 stream {stream_id} ended before the response: {reason}")
        self.code = code

    @property
    def refused(self) -> bool:
        """REFUSED_STREAM: the upstream did not process the request (safe to retry)."""
        return self.code == h2.errors.ErrorCodes.REFUSED_STREAM


_NOBODY_WAITING = trio.Event()
_NOBODY_WAITING.set()


class _StreamState:
    """What one HTTP/2 stream has received, and the events its reader/sender wait on."""

    __slots__ = ("stream_id", "inbox", "ended", "reset_code", "trailers", "headers", "received", "readable", "writable", "response_complete", "scope")

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.inbox: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length)
        self.ended = False
        self.reset_code: int | None = None
        self.trailers: Headers = ()
        self.headers: list[tuple[str, str]] | None = None  # the response head (client side)
        self.received = 0
        # Waiters put a fresh event here before they wait; until then setting it is a no-op.
        self.readable = _NOBODY_WAITING
        self.writable = _NOBODY_WAITING
        self.response_complete = False
        self.scope: trio.CancelScope | None = None


class _H2Peer:
    """The reader/writer machinery both ends share; subclasses handle stream events."""

    def __init__(self, transport: trio.abc.Stream, protocol: h2.connection.H2Connection | H2ServerConnection) -> None:
        self._transport = transport
        self._h2 = protocol
        self._streams: dict[int, _StreamState] = {}
        self.quiet_since = trio.current_time()  # when the last stream ended (idle timeout)
        self._wakeup = trio.Event()
        self._dead = False
        self._finishing = False  # the writer sends what is queued, then returns
        self.closed = trio.Event()

    def _wake(self) -> None:
        self._wakeup.set()

    async def _writer(self) -> None:
        # Never cancelled while it holds bytes taken from h2 except at the very end (see
        # `_finish_writer`): a cancelled send would silently drop frames, the GOAWAY included.
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            data = self._h2.data_to_send()
            if data:
                await self._transport.send_all(data)
            if self._finishing and not self._wakeup.is_set():
                return

    async def _finish_writer(self, writer_done: trio.Event) -> None:
        """Let the writer send what is queued (a GOAWAY, last responses), briefly."""
        self._finishing = True
        self._wake()
        with trio.move_on_after(FLUSH_SECONDS):
            await writer_done.wait()

    async def _read_transport(self) -> list[h2.events.Event] | None:
        """Events from the next read; None when the peer closed. The caller wakes the
        writer if receiving queued frames (acks, window updates)."""
        data = await self._transport.receive_some(RECEIVE_SIZE)
        if not data:
            return None
        return self._h2.receive_data(data)

    def _dispatch_common(self, event: h2.events.Event) -> bool:
        """Handle the events both sides treat alike; False if `event` is not one of them."""
        if isinstance(event, h2.events.DataReceived):
            st = self._streams.get(event.stream_id)
            if st is None:
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                st.inbox.append((bytes(event.data), event.flow_controlled_length))
                st.readable.set()
            if event.stream_ended is not None:
                self._on_end(event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self._on_end(event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            st = self._streams.get(event.stream_id)
            if st is not None:
                st.trailers = tuple(event.headers)
            if event.stream_ended is not None:
                self._on_end(event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            targets = self._streams.values() if event.stream_id == 0 else filter(None, [self._streams.get(event.stream_id)])
            for st in targets:
                st.writable.set()
        elif isinstance(event, h2.events.StreamReset):
            st = self._streams.get(event.stream_id)
            if st is not None:
                st.reset_code = event.error_code
                # Cancel first: a handler waiting to read or for window then sees Cancelled,
                # not a BodyError or BrokenResourceError that setting the events would raise.
                self._on_reset(st)
                st.readable.set()
                st.writable.set()
        else:
            return False
        return True

    def _on_end(self, stream_id: int) -> None:
        st = self._streams.get(stream_id)
        if st is not None:
            st.ended = True
            st.readable.set()

    def _on_reset(self, st: _StreamState) -> None:
        """A stream was reset by the peer (subclasses count or cancel)."""

    def _mark_dead(self) -> None:
        self._dead = True
        for st in self._streams.values():
            st.readable.set()
            st.writable.set()

    async def _read_body(self, st: _StreamState, limit: int | None) -> bytes:
        while not st.inbox:
            if st.ended:
                return b""
            if st.reset_code is not None:
                raise BodyError(f"HTTP/2 stream {st.stream_id} was reset by the peer ({_code_name(st.reset_code)})", status=400)
            if self._dead:
                raise BodyError(f"HTTP/2 connection closed during stream {st.stream_id}", status=400)
            st.readable = trio.Event()
            await st.readable.wait()
        data, flow_length = st.inbox.popleft()
        self._h2.acknowledge_received_data(flow_length, st.stream_id)
        self._wake()
        st.received += len(data)
        if limit is not None and st.received > limit:
            raise BodyError(f"request body larger than {limit} bytes", status=413)
        return data

    async def _send_data(self, st: _StreamState, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._check_sendable(st)
            window = self._h2.local_flow_control_window(st.stream_id)
            if window <= 0:
                st.writable = trio.Event()
                await st.writable.wait()
                continue
            size = min(window, self._h2.max_outbound_frame_size, len(view))
            self._h2.send_data(st.stream_id, view[:size].tobytes())
            view = view[size:]
            self._wake()
        await trio.lowlevel.checkpoint_if_cancelled()

    async def _send_body(self, st: _StreamState, body: Body) -> None:
        """Stream `body` out and end the stream (with trailers if it has any)."""
        while chunk := await body.read():
            await self._send_data(st, chunk)
        self._check_sendable(st)
        if body.trailers:
            self._h2.send_headers(st.stream_id, _encode(without_hop_by_hop(body.trailers)), end_stream=True)
        else:
            # Even an empty DATA frame must wait while the peer's lowered
            # SETTINGS_INITIAL_WINDOW_SIZE holds the stream window below zero.
            while self._h2.local_flow_control_window(st.stream_id) < 0:
                st.writable = trio.Event()
                await st.writable.wait()
                self._check_sendable(st)
            self._h2.end_stream(st.stream_id)
        self._wake()

    def _check_sendable(self, st: _StreamState) -> None:
        if st.reset_code is not None:
            raise trio.BrokenResourceError(f"HTTP/2 stream {st.stream_id} was reset by the peer ({_code_name(st.reset_code)})")
        if self._dead:
            raise trio.BrokenResourceError(f"HTTP/2 connection closed during stream {st.stream_id}")

    def _reset(self, st: _StreamState, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Reset a stream we give up on, unless it is already closed."""
        if st.reset_code is None and not self._dead and not (st.ended and st.response_complete):
            try:
                self._h2.reset_stream(st.stream_id, code)
            except h2.exceptions.StreamClosedError:
                return
            st.reset_code = code
            self._wake()

    def _release(self, st: _StreamState, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Forget a stream: reset it with `code` if it is still open (the peer stops
        sending, a body pump still waiting for window gives up) and return its unread data
        to the connection window."""
        self._reset(st, code)
        st.writable.set()
        self._streams.pop(st.stream_id, None)
        if not self._streams:
            self.quiet_since = trio.current_time()
        unread = sum(length for _, length in st.inbox)
        st.inbox.clear()
        if unread and not self._dead:
            self._h2.acknowledge_received_data(unread, st.stream_id)
            self._wake()


class _StreamBody:
    """A received body on one HTTP/2 stream (a request body on the server: its stream is
    released when the handler ends, so `aclose` has nothing to do)."""

    def __init__(self, peer: _H2Peer, st: _StreamState, limit: int | None, *, on_done: Callable[[], None] = lambda: None) -> None:
        self._peer = peer
        self._st = st
        self._limit = limit
        self._on_done = on_done

    @property
    def trailers(self) -> Headers:
        return self._st.trailers

    async def read(self) -> bytes:
        data = await self._peer._read_body(self._st, self._limit)
        if not data:
            self._on_done()
        return data

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


# --- server ---


async def serve_http2(transport: trio.abc.Stream, handler: Handler, limits: HttpLimits, *, initial: bytes = b"") -> None:
    """Serve HTTP/2 on `transport` until the client, a protocol error or idleness ends it.

    `initial` is data already read (the client preface, when protocol detection read it).
    Never raises for what the client does; leaves `transport` for the caller to close.
    """
    await _H2Server(transport, handler, limits).run(initial)


class _H2Server(_H2Peer):
    def __init__(self, transport: trio.abc.Stream, handler: Handler, limits: HttpLimits) -> None:
        protocol = H2ServerConnection(
            max_concurrent_streams=limits.max_concurrent_streams,
            stream_window=STREAM_WINDOW,
            connection_window=CONNECTION_WINDOW,
            # Our own per-request check answers 431; this only stops HPACK bombs.
            max_header_list_size=4 * limits.max_header_bytes,
        )
        super().__init__(transport, protocol)
        self._handler = handler
        self._limits = limits
        self._premature_resets: deque[float] = deque()
        self._handlers: trio.Nursery | None = None
        self._idle_workers: list[trio.lowlevel.Task] = []  # waiting in `_next_stream`
        self._idle_timer = trio.CancelScope()
        self._client_going_away = False

    async def run(self, initial: bytes) -> None:
        self._h2.initiate_connection()
        self._wake()
        writer_done = trio.Event()
        try:
            async with trio.open_nursery() as io:
                io.start_soon(self._guarded_writer, io.cancel_scope, writer_done)
                io.start_soon(self._watch_idle)
                async with trio.open_nursery() as handlers:
                    self._handlers = handlers
                    try:
                        await self._reader(initial)
                    except h2.exceptions.ProtocolError as exc:
                        # h2 queued the GOAWAY naming the error; the writer sends it.
                        _log.info("http2 client broke the protocol", error=str(exc), code=_code_name(getattr(exc, "error_code", 1)))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    # Cancel first: a handler waiting to read or for window then sees Cancelled,
                    # not the BodyError or BrokenResourceError a dead connection raises.
                    handlers.cancel_scope.cancel()
                    self._mark_dead()
                await self._finish_writer(writer_done)
                io.cancel_scope.cancel()
        finally:
            self._mark_dead()
            self.closed.set()

    async def _guarded_writer(self, io_scope: trio.CancelScope, done: trio.Event) -> None:
        try:
            await self._writer()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            io_scope.cancel()  # before `_mark_dead`, as in `run`
            self._mark_dead()
        finally:
            done.set()

    async def _reader(self, initial: bytes) -> None:
        if initial:
            self._handle(self._h2.receive_data(initial))
            self._wake()
        with self._idle_timer:
            while not self._dead:
                events = await self._read_transport()
                if events is None:
                    return
                if self._h2.output_pending:
                    self._wake()
                if not self._handle(events):
                    return
        if self._idle_timer.cancelled_caught:
            self._h2.close_connection()  # idled out, or the client went away: GOAWAY

    async def _watch_idle(self) -> None:
        """Ends the reader once the connection had no stream for `idle_timeout` (a watchdog,
        because a cancel scope per read cost more than a tenth of a request)."""
        timeout = self._limits.idle_timeout
        while True:
            now = trio.current_time()
            deadline = now + timeout if self._streams else self.quiet_since + timeout
            if deadline <= now:
                self._idle_timer.cancel()
                return
            await trio.sleep_until(deadline)

    def _handle(self, events: list[h2.events.Event]) -> bool:
        """Dispatch events; False once the connection should end."""
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._on_request(event)
            elif isinstance(event, h2.events.ConnectionTerminated):
                # A graceful GOAWAY only says no new streams will come: the open ones are
                # still answered (then `_release` ends the connection).
                if event.error_code != h2.errors.ErrorCodes.NO_ERROR or not self._streams:
                    return False
                self._client_going_away = True
            else:
                self._dispatch_common(event)
            if self._dead:
                return False
        return True

    def _release(self, st: _StreamState, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        super()._release(st, code)
        if self._client_going_away and not self._streams:
            self._idle_timer.cancel()  # ends the reader, which says GOAWAY too

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        st = self._streams[event.stream_id] = _StreamState(event.stream_id)
        if event.stream_ended is not None:
            st.ended = True
        size = sum(len(name) + len(value) + 32 for name, value in event.headers)  # RFC 9113 §6.5.2
        if size > self._limits.max_header_bytes:
            self._refuse(st, 431, f"request headers larger than {self._limits.max_header_bytes} bytes")
            return
        request = self._request(st, event.headers)
        if request is None:
            self._refuse(st, 400, "bad request: missing :method, :path or :authority")
            return
        if self._idle_workers:
            trio.lowlevel.reschedule(self._idle_workers.pop(), outcome.Value((st, request)))
        else:
            assert self._handlers is not None
            self._handlers.start_soon(self._worker, st, request)

    async def _worker(self, st: _StreamState, request: Request) -> None:
        """Serve streams one after another, each in the worker's cancel scope, which a reset
        of that stream cancels (the worker then opens a new one): a task and a scope per
        stream cost a tenth of a request."""
        while True:
            with trio.CancelScope() as scope:
                while True:
                    st.scope = scope
                    try:
                        await self._serve_stream(st, request)
                    finally:
                        st.scope = None
                    if len(self._idle_workers) >= MAX_IDLE_WORKERS:
                        return
                    st, request = await self._next_stream()
            # A reset cancelled the stream being served.
            if len(self._idle_workers) >= MAX_IDLE_WORKERS:
                return
            st, request = await self._next_stream()

    async def _next_stream(self) -> tuple[_StreamState, Request]:
        task = trio.lowlevel.current_task()
        self._idle_workers.append(task)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._idle_workers.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def _request(self, st: _StreamState, fields: Headers) -> Request | None:
        pseudo: dict[str, str] = {}
        headers: list[tuple[str, str]] = []
        for name, value in fields:
            if name.startswith(":"):
                pseudo[name] = value
            elif name == "host":
                pseudo.setdefault(":authority", value)
            else:
                headers.append((name, value))
        if not {":method", ":path", ":authority"} <= pseudo.keys():
            return None
        return Request(
            method=pseudo[":method"],
            authority=pseudo[":authority"],
            target=pseudo[":path"],
            headers=without_hop_by_hop(tuple(headers)),
            body=_StreamBody(self, st, self._limits.max_body_bytes),
            protocol="HTTP/2",
            scheme=pseudo.get(":scheme", "http"),
        )

    def _refuse(self, st: _StreamState, status: int, reason: str) -> None:
        _log.info("http2 request refused", stream=st.stream_id, status=status, reason=reason)
        body = f"{reason}\n".encode()
        try:
            window = self._h2.local_flow_control_window(st.stream_id)
        except h2.exceptions.StreamClosedError:  # the same read reset it: nothing to answer
            st.reset_code = h2.errors.ErrorCodes.CANCEL
            self._release(st)
            return
        if window >= len(body):
            headers = ((":status", str(status)), ("content-type", "text/plain"), ("content-length", str(len(body))))
            self._h2.send_headers(st.stream_id, headers)
            self._h2.send_data(st.stream_id, body, end_stream=True)
        else:  # the client's window has no room for the reason (it may never open): the status alone
            self._h2.send_headers(st.stream_id, ((":status", str(status)),), end_stream=True)
        st.response_complete = True
        self._release(st, h2.errors.ErrorCodes.NO_ERROR)
        self._wake()  # nothing else may: a request that ended with its head queues no other frame

    async def _serve_stream(self, st: _StreamState, request: Request) -> None:
        if st.reset_code is not None:  # reset before its handler ran
            self._release(st)
            return
        started = False

        async def respond(response: Response) -> None:
            nonlocal started
            if started:
                raise RuntimeError("respond() called twice for one request")
            started = True
            self._check_sendable(st)
            headers = ((":status", str(response.status)), *without_hop_by_hop(response.headers))
            try:
                if response.header("grpc-status") is not None:
                    # gRPC "trailers-only": the status rides in the one HEADERS frame, which
                    # must end the stream, so gRPC clients read it as the call's status.
                    while await response.body.read():
                        pass
                    self._check_sendable(st)
                    self._h2.send_headers(st.stream_id, headers, end_stream=True)
                    self._wake()
                else:
                    self._h2.send_headers(st.stream_id, headers)
                    self._wake()
                    await self._send_body(st, response.body)
            except BodyError:
                self._reset(st, h2.errors.ErrorCodes.INTERNAL_ERROR)
                raise
            st.response_complete = True

        try:
            try:
                await self._handler(request, respond)
                if not started:
                    await respond(local_reply(500, "no response was produced\n"))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception:
                _log.exception("http2 handler failed", method=request.method, target=request.target)
                if not started:
                    await respond(local_reply(500, "internal error, see the waypoint log\n"))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._release(st, h2.errors.ErrorCodes.NO_ERROR if st.response_complete else h2.errors.ErrorCodes.CANCEL)

    def _on_reset(self, st: _StreamState) -> None:
        if st.scope is not None:
            st.scope.cancel()
        if st.response_complete:
            return
        now = trio.current_time()
        resets = self._premature_resets
        resets.append(now)
        while resets and resets[0] < now - self._limits.rapid_reset_window:
            resets.popleft()
        if len(resets) >= self._limits.rapid_reset_limit:
            _log.warning(
                "http2 rapid reset flood: closing the connection",
                resets=len(resets),
                window_seconds=self._limits.rapid_reset_window,
            )
            self._h2.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, additional_data=b"too many stream resets")
            self._wake()
            self._mark_dead()


# --- client ---


class Http2ClientConnection(_H2Peer):
    """One upstream HTTP/2 connection multiplexing requests; run `run()` in a nursery."""

    def __init__(self, transport: trio.abc.Stream, *, max_requests: int | None = None, max_header_bytes: int = 64 * 1024) -> None:
        protocol = h2.connection.H2Connection(
            # What we send is valid by construction (lower-case names from parsed messages and
            # checked config, hop-by-hop headers removed): h2's own checks of it cost a
            # tenth of a request. What peers send is still checked.
            h2.config.H2Configuration(
                client_side=True,
                header_encoding="latin-1",
                validate_inbound_headers=True,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        # Our own per-request check answers 431; this only stops HPACK bombs.
        protocol.decoder.max_header_list_size = 4 * max_header_bytes
        super().__init__(transport, protocol)
        self._max_requests = max_requests
        self._nursery: trio.Nursery | None = None
        self.requests_sent = 0
        self.going_away = False

    @property
    def usable(self) -> bool:
        """Can this connection take one more request now?"""
        if self._dead or self.going_away or self._nursery is None:
            return False
        if self._max_requests is not None and self.requests_sent >= self._max_requests:
            return False
        return self._h2.open_outbound_streams < self._h2.remote_settings.max_concurrent_streams

    @property
    def active_requests(self) -> int:
        return len(self._streams)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it closes; never raises for connection failures."""
        self._h2.initiate_connection()
        codes = h2.settings.SettingCodes
        self._h2.update_settings({codes.INITIAL_WINDOW_SIZE: STREAM_WINDOW, codes.ENABLE_PUSH: 0})
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._wake()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._guarded, self._writer, nursery.cancel_scope)
                nursery.start_soon(self._guarded, self._reader, nursery.cancel_scope)
                task_status.started()
        finally:
            self._mark_dead()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._transport)
            self.closed.set()

    async def _guarded(self, task: Callable[[], object], scope: trio.CancelScope) -> None:
        try:
            await task()  # type: ignore[misc]
        except (h2.exceptions.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            _log.info("upstream http2 connection failed", error=str(exc) or type(exc).__name__)
        finally:
            self._mark_dead()
            scope.cancel()

    async def _reader(self) -> None:
        while True:
            events = await self._read_transport()
            if events is None:
                return
            self._wake()
            for event in events:
                if isinstance(event, h2.events.ResponseReceived):
                    st = self._streams.get(event.stream_id)
                    if st is not None:
                        st.headers = event.headers
                        st.readable.set()
                        if event.stream_ended is not None:
                            st.ended = True
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.going_away = True
                    for st in list(self._streams.values()):
                        if st.stream_id > (event.last_stream_id or 0):
                            st.reset_code = h2.errors.ErrorCodes.REFUSED_STREAM
                            st.readable.set()
                            st.writable.set()
                    if not self._streams:
                        return
                else:
                    self._dispatch_common(event)

    async def send(self, request: Request) -> Response:
        """Send `request`; the response once its head arrived (its body streams after).

        Raises StreamResetError if the stream was reset or the connection failed before the
        response head came. Cancelling resets the stream.
        """
        if not self.usable:
            raise StreamResetError(0, h2.errors.ErrorCodes.REFUSED_STREAM)
        assert self._nursery is not None
        self.requests_sent += 1
        stream_id = self._h2.get_next_available_stream_id()
        st = self._streams[stream_id] = _StreamState(stream_id)
        headers: list[tuple[str, str]] = [
            (":method", request.method),
            (":scheme", request.scheme),
            (":authority", request.authority),
            (":path", request.target),
            *without_hop_by_hop(request.headers),
        ]
        if (request.header("content-type") or "").startswith("application/grpc"):
            headers.append(("te", "trailers"))  # gRPC servers require it; hop-by-hop otherwise
        try:
            self._h2.send_headers(stream_id, _encode(headers))
        except h2.exceptions.ProtocolError as exc:  # the connection is closing under us
            self._streams.pop(stream_id, None)
            raise StreamResetError(stream_id, None) from exc
        self._wake()
        self._nursery.start_soon(self._pump, st, request.body)
        try:
            while st.headers is None:
                if st.reset_code is not None or self._dead:
                    raise StreamResetError(stream_id, st.reset_code)
                st.readable = trio.Event()
                await st.readable.wait()
        except BaseException:
            self._release(st)
            raise
        status = 0
        response_headers: list[tuple[str, str]] = []
        for name, value in st.headers:
            if name == ":status":
                status = int(value)
            elif not name.startswith(":"):
                response_headers.append((name, value))
        return Response(status, without_hop_by_hop(tuple(response_headers)), _ClientBody(self, st))

    async def _pump(self, st: _StreamState, body: Body) -> None:
        """Send a request body in the background; a broken body resets the stream."""
        try:
            await self._send_body(st, body)
        except (BodyError, trio.BrokenResourceError, h2.exceptions.StreamClosedError):
            self._reset(st)

    async def aclose(self) -> None:
        """Close the connection (its open requests fail)."""
        self._mark_dead()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        await trio.lowlevel.checkpoint()


class _ClientBody(_StreamBody):
    """A response body; `aclose()` resets the stream if it was not read to its end."""

    def __init__(self, connection: Http2ClientConnection, st: _StreamState) -> None:
        super().__init__(connection, st, None, on_done=lambda: connection._release(st))

    async def read(self) -> bytes:
        try:
            return await super().read()
        except BodyError:
            self._peer._release(self._st)
            raise

    async def aclose(self) -> None:
        self._peer._release(self._st)
        await trio.lowlevel.checkpoint()


def _encode(headers) -> list[tuple[bytes, bytes]]:  # type: ignore[no-untyped-def]
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]


def _code_name(code: int | None) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)
