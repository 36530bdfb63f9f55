"""waypoint/http1: HTTP/1.1 inside a tunnel - the downstream server and the upstream client.

Plain messages (waypoint.http1_wire: HTTP/1.1, Content-Length or no body, nothing unusual)
are parsed and written here; a connection goes over to h11 for good at its first message
that is not plain, so every oddity and error is answered by h11 as before.

Server (after h11's examples/trio-server.py): one request at a time per connection,
keep-alive between them. `handler(request, respond)` gets each request with a streaming body
and answers by awaiting `respond(response)` once; the response body streams out as it is
read. What a client can get wrong costs that client only:

- an idle connection is closed quietly after `idle_timeout`; once a request's first byte has
  arrived its head must be complete within `header_timeout`, else 408 and close (slow loris);
- a head larger than `max_header_bytes` gets 431; malformed requests get h11's status (400,
  505); Content-Length together with Transfer-Encoding gets 400 (request smuggling: h11
  would silently prefer chunked, a backend might not);
- a body larger than `max_body_bytes` fails the body read with 413;
- a request body the handler did not read is drained (bounded) so the connection can be
  reused, or the connection is closed.

Client: `Http1ClientConnection` sends one request at a time over an upstream stream and
reports, once a response body has been read to its end, whether the connection can carry
another request (both sides done, no `Connection: close`).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import h11
import trio

from meshcore.log import get_logger
from waypoint import http1_wire
from waypoint.messages import (
    Body,
    BodyError,
    Headers,
    Request,
    Response,
    local_reply,
    without_hop_by_hop,
)
from waypoint.settings import HttpLimits

RECEIVE_SIZE = 64 * 1024
# After the response, how much of an unread request body we read and discard to keep the
# connection, and for how long; beyond that closing is cheaper.
DRAIN_LIMIT_BYTES = 256 * 1024
DRAIN_SECONDS = 1.0
# After an error response, how long we read and discard what the client still sends, so
# that closing does not reset the connection before the client has read our answer.
CLOSE_LINGER_SECONDS = 1.0

Respond = Callable[[Response], Awaitable[None]]
Handler = Callable[[Request, Respond], Awaitable[None]]

_log = get_logger("http1")


class _HeadTimeout(Exception):
    """A request head started but did not complete within header_timeout."""


# --- server ---


async def serve_http1(stream: trio.abc.Stream, handler: Handler, limits: HttpLimits, *, initial: bytes = b"") -> None:
    """Serve HTTP/1.1 requests on `stream` until the client or an error closes it.

    `initial` is data already read from the stream (by protocol detection). Never raises for
    what the client does; closes nothing but leaves `stream` for the caller to close.
    Plain requests are served without h11 (waypoint.http1_wire); from the first one that is
    not, h11 serves the connection.
    """
    server = _PlainServer(stream, limits, initial)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.watch)
        try:
            with server.timer:
                while True:
                    head = await server.receive_head()
                    if head is None:
                        break
                    exchange = _PlainExchange(stream, server.buffer, head, limits)
                    if not await _serve_exchange(exchange, handler) or not await exchange.finish():
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away mid-exchange
        finally:
            nursery.cancel_scope.cancel()
    if server.timer.cancelled_caught:
        if server.head_since is not None:
            await _refuse(stream, h11.Connection(h11.SERVER), 408, f"request headers not received within {limits.header_timeout:g} s")
        return  # else an idle keep-alive connection
    if not server.client_closed:
        await _serve_with_h11(stream, handler, limits, bytes(server.buffer))


async def _serve_exchange(exchange: _PlainExchange | _ServerExchange, handler: Handler) -> bool:
    """Run the handler for one request; True if the response went out whole."""
    try:
        await handler(exchange.request, exchange.respond)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    except Exception:
        _log.exception("http handler failed", method=exchange.request.method, target=exchange.request.target)
        if exchange.started:
            return False  # half a response went out: only closing tells the client
        await exchange.respond(local_reply(500, "internal error, see the waypoint log\n"))
    if not exchange.started:
        await exchange.respond(local_reply(500, "no response was produced\n"))
    return exchange.completed


class _PlainServer:
    """Reads plain request heads, and times idleness between requests and heads that stall.

    The timing is a watchdog task per connection that cancels `timer` at the deadline:
    entering a cancel scope or moving its deadline per request cost more CPU than routing
    the request."""

    def __init__(self, stream: trio.abc.Stream, limits: HttpLimits, initial: bytes) -> None:
        self._stream = stream
        self._limits = limits
        self.buffer = bytearray(initial)
        self.timer = trio.CancelScope()
        self.idle_since: float | None = trio.current_time()  # waiting for a request since
        self.head_since: float | None = None  # a head began arriving at (header timeout)
        self.client_closed = False

    async def watch(self) -> None:
        limits = self._limits
        while True:
            now = trio.current_time()
            if self.head_since is not None:
                deadline = self.head_since + limits.header_timeout
            elif self.idle_since is not None:
                deadline = self.idle_since + limits.idle_timeout
            else:  # a request is being served: no deadline of ours
                deadline = math.inf
            if deadline <= now:
                self.timer.cancel()
                return
            # A head may start while we sleep: look again within a header timeout.
            await trio.sleep_until(min(deadline, now + limits.header_timeout))

    async def receive_head(self) -> http1_wire.RequestHead | None:
        """The next plain request head; None when the client closed between requests
        (`client_closed`) or the head is not plain (h11 takes the buffer)."""
        buffer = self.buffer
        end = buffer.find(http1_wire.HEAD_END)
        if end < 0:
            receive = self._stream.receive_some
            if not buffer:
                self.idle_since = trio.current_time()
                data = await receive(RECEIVE_SIZE)
                self.idle_since = None
                if not data:
                    self.client_closed = True
                    return None
                buffer += data
            searched = 0  # a head trickling in byte by byte is searched once, not again per byte
            while (end := buffer.find(http1_wire.HEAD_END, searched)) < 0:
                if self.head_since is None:
                    self.head_since = trio.current_time()
                if len(buffer) > self._limits.max_header_bytes:
                    return None  # h11 answers 431
                searched = max(0, len(buffer) - len(http1_wire.HEAD_END) + 1)
                data = await receive(RECEIVE_SIZE)
                if not data:
                    return None  # h11 sees a head cut short
                buffer += data
            self.head_since = None
        self.idle_since = None
        size = end + len(http1_wire.HEAD_END)
        head = http1_wire.parse_request_head(bytes(buffer[:size])) if size <= self._limits.max_header_bytes else None
        if head is not None:
            del buffer[:size]
        return head


class _PlainRequestBody:
    """A Content-Length request body, read from the connection as the pipeline asks."""

    def __init__(self, stream: trio.abc.Stream, buffer: bytearray, length: int, limits: HttpLimits) -> None:
        self._stream = stream
        self._buffer = buffer
        self.remaining = length
        self._too_large = length > limits.max_body_bytes
        self._limit = limits.max_body_bytes
        self.broken = False  # malformed or over the limit: the connection is not reused
        self.trailers: Headers = ()

    async def read(self) -> bytes:
        if self._too_large:
            self.broken = True
            raise BodyError(f"request body larger than {self._limit} bytes", status=413)
        return await self.take()

    async def take(self) -> bytes:
        """The next piece of the body, whatever its size."""
        if not self.remaining:
            return b""
        buffer = self._buffer
        if not buffer:
            data = await self._stream.receive_some(RECEIVE_SIZE)
            if not data:
                self.broken = True
                raise BodyError(f"malformed request body: the client closed it {self.remaining} bytes short", status=400)
            buffer += data
        size = min(len(buffer), self.remaining)
        data = bytes(buffer[:size])
        del buffer[:size]
        self.remaining -= size
        return data

    async def aclose(self) -> None:
        """Nothing to do: what the handler left unread is drained after the response."""


class _PlainExchange:
    """One plain request and the single response to it."""

    def __init__(self, stream: trio.abc.Stream, buffer: bytearray, head: http1_wire.RequestHead, limits: HttpLimits) -> None:
        self._stream = stream
        self._body = _PlainRequestBody(stream, buffer, head.content_length, limits)
        self.request = Request(
            method=head.method,
            authority=head.host,
            target=head.target,
            headers=head.headers,
            body=self._body,
            protocol="HTTP/1.1",
        )
        self.started = False
        self.completed = False

    async def respond(self, response: Response) -> None:
        """Write `response`; raises BodyError if its body broke or does not match its
        framing (the connection is then unusable), trio.BrokenResourceError if the client
        went away."""
        if self.started:
            raise RuntimeError("respond() called twice for one request")
        self.started = True
        headers = without_hop_by_hop(response.headers)
        bodiless = http1_wire.has_no_body(response.status)
        try:
            length = http1_wire.content_length(headers)
            chunked = length is None and not bodiless
            head = http1_wire.response_head(response.status, headers, chunked=chunked, close=self._body.broken)
        except ValueError as exc:
            raise BodyError(f"response does not match its own framing: {exc}", status=502) from exc
        send, body = self._stream.send_all, response.body
        await send(head)
        sent = 0
        while chunk := await body.read():
            if self.request.method == "HEAD":
                continue
            sent += len(chunk)
            if bodiless or (length is not None and sent > length):
                raise BodyError("response does not match its own framing: body longer than declared", status=502)
            await send(http1_wire.chunk(chunk) if chunked else chunk)
        if chunked and self.request.method != "HEAD":
            try:
                await send(http1_wire.last_chunk(body.trailers))
            except ValueError as exc:
                raise BodyError(f"response trailers are not valid HTTP/1.1: {exc}", status=502) from exc
        elif length is not None and sent < length and self.request.method != "HEAD":
            raise BodyError(f"response does not match its own framing: body {length - sent} bytes shorter than declared", status=502)
        self.completed = not self._body.broken

    async def finish(self) -> bool:
        """Read away what the handler left of the request body; True if the connection can
        carry another request."""
        body = self._body
        if body.broken or body.remaining > DRAIN_LIMIT_BYTES:
            return False
        if not body.remaining:
            return True
        with trio.move_on_after(DRAIN_SECONDS):
            try:
                while await body.take():
                    pass
            except BodyError:
                return False
            return True
        return False


# --- server with h11: whatever is not plain ---


async def _serve_with_h11(stream: trio.abc.Stream, handler: Handler, limits: HttpLimits, initial: bytes) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
    if initial:
        conn.receive_data(initial)
    try:
        while True:
            try:
                head = await _receive_head(stream, conn, limits)
            except _HeadTimeout:
                await _refuse(stream, conn, 408, f"request headers not received within {limits.header_timeout:g} s")
                return
            except h11.RemoteProtocolError as exc:
                await _refuse(stream, conn, exc.error_status_hint, f"bad request: {exc}")
                return
            if head is None:
                return
            problem = _framing_problem(head, limits)
            if problem is not None:
                await _refuse(stream, conn, *problem)
                return
            exchange = _ServerExchange(stream, conn, head, limits)
            if not await _serve_exchange(exchange, handler) or not await _drain_request(stream, conn):
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return  # the client went away mid-exchange


async def _receive_head(stream: trio.abc.Stream, conn: h11.Connection, limits: HttpLimits) -> h11.Request | None:
    """The next request head; None when the client closed or idled out between requests."""
    deadline: float | None = None
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Request):
            return event
        if isinstance(event, h11.ConnectionClosed):
            return None
        if event is not h11.NEED_DATA:
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} before a request", error_status_hint=400)
        if deadline is None and not conn.trailing_data[0]:
            with trio.move_on_after(limits.idle_timeout):
                data = await stream.receive_some(RECEIVE_SIZE)
                conn.receive_data(data)
                deadline = trio.current_time() + limits.header_timeout
                continue
            return None  # idle keep-alive connection
        if deadline is None:
            deadline = trio.current_time() + limits.header_timeout
        with trio.move_on_at(deadline):
            conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
            continue
        raise _HeadTimeout()


def _framing_problem(head: h11.Request, limits: HttpLimits) -> tuple[int, str] | None:
    """(status, reason) for a head we refuse although h11 parsed it."""
    names = {name for name, _ in head.headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        return 400, "bad request: both Content-Length and Transfer-Encoding are set"
    # h11 bounds only heads that arrive in pieces; one that came in a single read is checked here.
    size = len(head.method) + len(head.target) + sum(len(n) + len(v) + 4 for n, v in head.headers)
    if size > limits.max_header_bytes:
        return 431, f"request headers larger than {limits.max_header_bytes} bytes"
    return None


def _request_from_head(head: h11.Request) -> tuple[str, str, str, Headers]:
    """(authority, target, scheme, headers) of an h11 request head."""
    target = head.target.decode("latin-1")
    host = ""
    headers: list[tuple[str, str]] = []
    for name, value in head.headers:
        key = name.decode("latin-1")
        if key == "host":
            host = host or value.decode("latin-1")
        elif key != "expect":  # we answer 100-continue ourselves
            headers.append((key, value.decode("latin-1")))
    scheme = "http"
    for prefix in ("http://", "https://"):
        if target.lower().startswith(prefix):  # absolute-form: the target names the authority
            scheme = prefix[:-3]
            authority, slash, rest = target[len(prefix) :].partition("/")
            host, target = authority or host, slash + rest or "/"
            break
    return host, target, scheme, without_hop_by_hop(tuple(headers))


class _ServerRequestBody:
    """The request body, read from the connection as the pipeline asks for it."""

    def __init__(self, stream: trio.abc.Stream, conn: h11.Connection, limits: HttpLimits) -> None:
        self._stream = stream
        self._conn = conn
        self._limit = limits.max_body_bytes
        self._received = 0
        self._trailers: Headers = ()
        self._ended = False
        self.broken = False  # malformed or over the limit: the connection is not reused

    @property
    def trailers(self) -> Headers:
        return self._trailers

    async def read(self) -> bytes:
        try:
            return await self._read()
        except BodyError:
            self.broken = True
            raise

    async def _read(self) -> bytes:
        conn = self._conn
        while not self._ended:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise BodyError(f"malformed request body: {exc}", status=400) from exc
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    await self._stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                conn.receive_data(await self._stream.receive_some(RECEIVE_SIZE))
            elif isinstance(event, h11.Data):
                self._received += len(event.data)
                if self._received > self._limit:
                    raise BodyError(f"request body larger than {self._limit} bytes", status=413)
                if event.data:
                    return bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._ended = True
                self._trailers = tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers)
            else:  # ConnectionClosed mid-body is reported by h11 as an error; anything else is a bug
                raise BodyError(f"request body ended by {type(event).__name__}", status=400)
        return b""

    async def aclose(self) -> None:
        """Nothing to do: what the handler left unread is drained after the response."""


class _ServerExchange:
    """One request and the single response to it."""

    def __init__(self, stream: trio.abc.Stream, conn: h11.Connection, head: h11.Request, limits: HttpLimits) -> None:
        self._stream = stream
        self._conn = conn
        authority, target, scheme, headers = _request_from_head(head)
        self._body = _ServerRequestBody(stream, conn, limits)
        self.request = Request(
            method=head.method.decode("latin-1"),
            authority=authority,
            target=target,
            headers=headers,
            body=self._body,
            protocol=f"HTTP/{head.http_version.decode('latin-1')}",
            scheme=scheme,
        )
        self.started = False
        self.completed = False

    async def respond(self, response: Response) -> None:
        """Write `response`; raises BodyError if its body broke (the connection is then
        unusable), trio.BrokenResourceError if the client went away."""
        if self.started:
            raise RuntimeError("respond() called twice for one request")
        self.started = True
        conn, stream = self._conn, self._stream
        headers = without_hop_by_hop(response.headers)
        if self._body.broken:
            headers += (("connection", "close"),)
        chunked = not any(name == "content-length" for name, _ in headers)
        try:
            await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=list(headers), reason=_reason(response.status))))
            body = response.body
            while chunk := await body.read():
                if self.request.method != "HEAD":
                    await stream.send_all(conn.send(h11.Data(data=chunk)))
            # Trailers exist only in chunked framing; a length-framed response drops them.
            trailers = list(body.trailers) if chunked and conn.our_state is h11.SEND_BODY else []
            await stream.send_all(conn.send(h11.EndOfMessage(headers=trailers)))
        except h11.LocalProtocolError as exc:  # e.g. a body shorter than its Content-Length
            raise BodyError(f"response does not match its own framing: {exc}", status=502) from exc
        self.completed = conn.our_state is h11.DONE


async def _drain_request(stream: trio.abc.Stream, conn: h11.Connection) -> bool:
    """Read away what is left of the request; True if the connection can be reused."""
    if conn.our_state is not h11.DONE:
        return False
    discarded = 0
    with trio.move_on_after(DRAIN_SECONDS):
        while conn.their_state is h11.SEND_BODY:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return False
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    return False  # the client will not send a body we did not ask for
                data = await stream.receive_some(RECEIVE_SIZE)
                discarded += len(data)
                if discarded > DRAIN_LIMIT_BYTES:
                    return False
                conn.receive_data(data)
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _refuse(stream: trio.abc.Stream, conn: h11.Connection, status: int, reason: str) -> None:
    """Answer a request we will not serve, then close the connection."""
    _log.info("http request refused", status=status, reason=reason)
    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
        body = f"{reason}\n".encode()
        try:
            data = conn.send(
                h11.Response(
                    status_code=status,
                    reason=_reason(status),
                    headers=[("content-type", "text/plain"), ("content-length", str(len(body))), ("connection", "close")],
                )
            )
            data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
    await close_gracefully(stream)


async def close_gracefully(stream: trio.abc.Stream) -> None:
    """Half-close and read away what the peer still sends, briefly, so it sees our answer."""
    with trio.move_on_after(CLOSE_LINGER_SECONDS):
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            while await stream.receive_some(RECEIVE_SIZE):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _reason(status: int) -> bytes:
    return http1_wire.reason(status)


# --- client ---


class Http1ClientConnection:
    """One upstream HTTP/1.1 connection carrying one request at a time.

    `on_idle(self)` is called when a response has been read to its end and the connection
    can carry another request; otherwise the connection closes itself, and `on_close()` is
    called once it has. Plain messages go without h11 (waypoint.http1_wire); from the first
    that is not, h11 runs the connection.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_header_bytes: int = 64 * 1024,
        on_idle: Callable[[Http1ClientConnection], None] = lambda conn: None,
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        self._stream = stream
        self._on_close = on_close  # called once, when the connection has closed
        self._max_header_bytes = max_header_bytes
        self._conn: h11.Connection | None = None  # once h11 has taken over
        self._buffer = bytearray()  # received, not yet parsed (plain mode)
        self._on_idle = on_idle
        self.requests_sent = 0
        self.closed = False

    async def send(self, request: Request) -> Response:
        """Send `request` (its body streamed), return the response once its head arrived.

        Raises trio.BrokenResourceError / ClosedResourceError if the connection failed,
        h11.ProtocolError for a malformed response, BodyError if the request body broke.
        """
        self.requests_sent += 1
        try:
            headers = (("host", request.authority), *without_hop_by_hop(request.headers))
            # A body of unknown length needs chunked framing; peeking tells "no body" apart.
            first = await request.body.read()
            if self._conn is None:
                try:
                    length = http1_wire.content_length(headers)
                    head = http1_wire.request_head(request.method, request.target, headers, chunked=bool(first) and length is None)
                except ValueError:
                    self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_header_bytes)
                else:
                    await self._send_plain(head, first, request.body, length)
                    response = await self._receive_plain(request)
                    if response is not None:
                        return response
            if self._conn.our_state is h11.IDLE:
                await self._send_with_h11(headers, first, request)
            event = await self._receive_with_h11()
        except BaseException:
            await self.aclose()
            raise
        headers_out = tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers)
        return Response(event.status_code, without_hop_by_hop(headers_out), _ClientResponseBody(self))

    async def _send_plain(self, head: bytes, first: bytes, body: Body, length: int | None) -> None:
        send = self._stream.send_all
        if not first:
            if length:
                raise h11.LocalProtocolError("request body shorter than its Content-Length")
            await send(head)
            return
        if length is not None and len(first) > length:
            raise h11.LocalProtocolError("request body longer than its Content-Length")
        await send(head + (first if length is not None else http1_wire.chunk(first)))
        sent = len(first)
        while chunk := await body.read():
            sent += len(chunk)
            if length is not None and sent > length:
                raise h11.LocalProtocolError("request body longer than its Content-Length")
            await send(chunk if length is not None else http1_wire.chunk(chunk))
        if length is None:
            await send(http1_wire.LAST_CHUNK)
        elif sent < length:
            raise h11.LocalProtocolError("request body shorter than its Content-Length")

    async def _receive_plain(self, request: Request) -> Response | None:
        """The response, once its head arrived; None when h11 has to read it."""
        buffer = self._buffer
        searched = 0
        while (end := buffer.find(http1_wire.HEAD_END, searched)) < 0 and len(buffer) <= self._max_header_bytes:
            searched = max(0, len(buffer) - len(http1_wire.HEAD_END) + 1)
            data = await self._stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise h11.RemoteProtocolError("upstream closed the connection before its response head ended", error_status_hint=502)
            buffer += data
        size = end + len(http1_wire.HEAD_END)
        if size > self._max_header_bytes:
            raise h11.RemoteProtocolError(f"response head larger than {self._max_header_bytes} bytes", error_status_hint=502)
        head = http1_wire.parse_response_head(bytes(buffer[:size]), head_request=request.method == "HEAD") if end >= 0 else None
        if head is None:
            # h11 takes over, told what was asked so that it frames the response the same.
            conn = self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_header_bytes)
            conn.send(h11.Request(method=request.method, target=request.target, headers=[("host", request.authority)]))
            conn.send(h11.EndOfMessage())
            conn.receive_data(bytes(buffer))
            buffer.clear()
            return None
        del buffer[:size]
        return Response(head.status, head.headers, _PlainResponseBody(self, head.content_length, head.close))

    async def _end_plain_response(self, close: bool) -> None:
        if close or self._buffer:  # bytes past the response: the server is out of step
            await self.aclose()
        else:
            self._on_idle(self)

    async def _send_with_h11(self, headers: Headers, first: bytes, request: Request) -> None:
        conn = self._conn
        assert conn is not None
        framing = list(headers)
        if first and not any(name == "content-length" for name, _ in headers):
            framing.append(("transfer-encoding", "chunked"))
        try:
            message = h11.Request(method=request.method, target=request.target, headers=framing)
        except UnicodeEncodeError as exc:  # h11 takes str as ASCII
            raise h11.LocalProtocolError(f"request not sendable as HTTP/1.1: {exc}") from exc
        await self._stream.send_all(conn.send(message))
        chunk = first
        while chunk:
            await self._stream.send_all(conn.send(h11.Data(data=chunk)))
            chunk = await request.body.read()
        await self._stream.send_all(conn.send(h11.EndOfMessage()))

    async def _receive_with_h11(self) -> h11.Response:
        conn = self._conn
        assert conn is not None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self._stream.receive_some(RECEIVE_SIZE))
            elif isinstance(event, h11.Response):
                return event
            elif isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and friends: the final answer follows
            else:
                raise h11.RemoteProtocolError(f"upstream sent {type(event).__name__} instead of a response", error_status_hint=502)

    async def _read_body(self) -> bytes | h11.EndOfMessage:
        conn = self._conn
        assert conn is not None
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await self._stream.receive_some(RECEIVE_SIZE))
                elif isinstance(event, h11.Data):
                    if event.data:
                        return bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    # Bytes past the response: the server is out of step, do not reuse.
                    if conn.our_state is h11.DONE and conn.their_state is h11.DONE and not conn.trailing_data[0]:
                        conn.start_next_cycle()
                        self._on_idle(self)
                    else:  # Connection: close, or an HTTP/1.0 peer
                        await self.aclose()
                    return event
                else:
                    raise BodyError(f"upstream response body ended by {type(event).__name__}")
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await self.aclose()
            raise BodyError(f"upstream response body broke: {exc}") from exc
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(self._stream)
            finally:
                self._on_close()


class _ClientResponseBody:
    def __init__(self, connection: Http1ClientConnection) -> None:
        self._connection = connection
        self._trailers: Headers = ()
        self._ended = False

    @property
    def trailers(self) -> Headers:
        return self._trailers

    async def read(self) -> bytes:
        if self._ended:
            return b""
        result = await self._connection._read_body()
        if isinstance(result, h11.EndOfMessage):
            self._ended = True
            self._trailers = tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in result.headers)
            return b""
        return result

    async def aclose(self) -> None:
        """A response abandoned before its end leaves the connection mid-message: close it."""
        if not self._ended:
            self._ended = True
            await self._connection.aclose()


class _PlainResponseBody:
    """A Content-Length response body (or none), read from the connection's buffer."""

    def __init__(self, connection: Http1ClientConnection, length: int, close: bool) -> None:
        self._connection = connection
        self._remaining = length
        self._close = close
        self._ended = False
        self.trailers: Headers = ()

    async def read(self) -> bytes:
        if self._ended:
            return b""
        connection = self._connection
        buffer = connection._buffer
        try:
            if self._remaining and not buffer:
                data = await connection._stream.receive_some(RECEIVE_SIZE)
                if not data:
                    raise BodyError(f"upstream response body broke: the connection closed {self._remaining} bytes short")
                buffer += data
            size = min(len(buffer), self._remaining)
            data = bytes(buffer[:size])
            del buffer[:size]
            self._remaining -= size
            if not self._remaining:  # read to its end: the connection is free at once
                self._ended = True
                await connection._end_plain_response(self._close)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await connection.aclose()
            raise BodyError(f"upstream response body broke: {exc}") from exc
        except BaseException:
            await connection.aclose()
            raise
        return data

    async def aclose(self) -> None:
        """A response abandoned before its end leaves the connection mid-message: close it."""
        if not self._ended:
            self._ended = True
            await self._connection.aclose()
