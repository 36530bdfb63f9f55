"""The small HTTP/1.1 servers every proxy runs: metrics (15020), readiness (15021), admin (15000).

`serve_http` is an h11-over-trio server (after h11's examples/trio-server.py) that maps a
request path to an async handler. It keeps connections alive, bounds header size, request
body size and the time a client may take to send a request or a handler to answer, answers
malformed requests with h11's suggested status (400, 431, ...), unknown paths with 404 and
failing handlers with 500. None of that stops it serving the next request.

A handler may instead return a `StreamingResponse` (live feeds such as `/debug/flows?follow=1`):
its body is sent chunk by chunk, with no time limit, until it ends or the client leaves; then
the connection closes.

    readiness = Readiness(pending=("state", "certificates", "proxy"))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_http, ("0.0.0.0", 15021), readiness_routes(readiness))
        await nursery.start(serve_http, ("0.0.0.0", 15020), metrics_routes(registry))
        await nursery.start(serve_http, ("127.0.0.1", 15000), admin_routes(dump, drain))
        ...
        readiness.mark_ready("state")
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qsl, urlsplit

import h11
import prometheus_client
import trio

from meshcore import log
from meshcore.drain import Drain

# Limits for a plaintext control endpoint that nobody should send much to.
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
_RECEIVE_CHUNK = 64 * 1024
# How long a client may take to send one request (this also closes idle keep-alive
# connections); Prometheus reconnects at its next scrape.
REQUEST_TIMEOUT_SECONDS = 10.0
# How long a handler may take; config_dump of a large mesh is the slowest one.
HANDLER_TIMEOUT_SECONDS = 10.0
# After the last response on a connection, how long to read and discard what the client still
# sends, so closing does not reset the connection before the client has read the response.
_CLOSE_LINGER_SECONDS = 1.0

_log = log.get_logger("admin")


@dataclass(frozen=True)
class Request:
    """A request as handlers see it: path and query split, the body already discarded."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Response:
    """A complete response; Content-Length is computed by the server."""

    status: int
    body: bytes
    content_type: str = "text/plain"

    def __post_init__(self) -> None:
        # Checked here so a handler's mistake becomes its own 500, not a broken connection.
        if not 200 <= self.status <= 599:
            raise ValueError(f"response status must be 200-599, got {self.status!r}")
        if not isinstance(self.body, bytes):
            raise TypeError(f"response body must be bytes, got {type(self.body).__name__}")


class StreamingBody(AsyncIterator[bytes]):
    """A body produced as it goes; the server always ends it with `aclose()`."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release what the body holds (called once, also when it was never read)."""


@dataclass(frozen=True)
class StreamingResponse:
    """A response sent chunked as `body` yields; the connection closes after it."""

    status: int
    body: StreamingBody
    content_type: str = "text/plain"


HttpHandler = Callable[[Request], Awaitable[Response | StreamingResponse]]


class Readiness:
    """Which startup tasks are still pending; ready once none are."""

    def __init__(self, pending: Iterable[str]) -> None:
        self._pending = dict.fromkeys(pending)
        self._tasks = frozenset(self._pending)

    def mark_ready(self, name: str) -> None:
        """Mark one task done; repeating it is harmless, an unknown name is a bug (ValueError)."""
        if name not in self._tasks:
            known = ", ".join(sorted(self._tasks))
            raise ValueError(f"unknown readiness task {name!r}: expected one of {known}")
        if name in self._pending:
            del self._pending[name]
            _log.info("task ready", task=name, still_pending=list(self._pending))

    @property
    def ready(self) -> bool:
        return not self._pending

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(self._pending)


# --- Server ---


async def serve_http(
    address: tuple[str, int],
    routes: Mapping[str, HttpHandler],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `routes` on `address` until cancelled; reports the bound port (port 0 allowed)."""
    host, port = address
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    bound_port: int = listeners[0].socket.getsockname()[1]
    _log.info("http server listening", host=host, port=bound_port, paths=sorted(routes))
    task_status.started(bound_port)

    async def handle(stream: trio.SocketStream) -> None:
        await _serve_connection(stream, routes)

    await trio.serve_listeners(handle, listeners)


async def _serve_connection(stream: trio.SocketStream, routes: Mapping[str, HttpHandler]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    async with stream:
        try:
            while True:
                try:
                    with trio.fail_after(REQUEST_TIMEOUT_SECONDS):
                        request = await _receive_request(stream, conn)
                except trio.TooSlowError:
                    return  # idle keep-alive connection, or a client too slow to send a request
                except h11.RemoteProtocolError as exc:
                    _log.info("bad http request", peer=_peer(stream), error=str(exc))
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        body = f"bad request: {exc}\n".encode()
                        await _send_response(stream, conn, Response(exc.error_status_hint, body))
                    await _close_gracefully(stream)
                    return
                if request is None:
                    return  # the client closed the connection
                response = await _dispatch(routes, request)
                if isinstance(response, StreamingResponse):
                    await _stream_response(stream, conn, response, head_only=request.method == "HEAD")
                    return
                await _send_response(stream, conn, response, head_only=request.method == "HEAD")
                if conn.our_state is h11.MUST_CLOSE:
                    await _close_gracefully(stream)
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away mid-exchange; nothing left to answer


async def _receive_request(stream: trio.SocketStream, conn: h11.Connection) -> Request | None:
    """Read one whole request (discarding its body); None if the client closed first."""
    head: h11.Request | None = None
    body_size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(_RECEIVE_CHUNK))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body_size += len(event.data)
            if body_size > MAX_BODY_BYTES:
                raise h11.RemoteProtocolError(
                    f"request body larger than {MAX_BODY_BYTES} bytes", error_status_hint=413
                )
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None  # h11 never ends a message it has not started
            return _to_request(head)
        elif isinstance(event, h11.ConnectionClosed):
            return None


def _to_request(head: h11.Request) -> Request:
    # latin-1 maps every byte, so an odd target or header never fails to decode.
    target = urlsplit(head.target.decode("latin-1"))
    return Request(
        method=head.method.decode("latin-1"),
        path=target.path,
        query=dict(parse_qsl(target.query)),
        headers=tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in head.headers),
    )


async def _dispatch(routes: Mapping[str, HttpHandler], request: Request) -> Response | StreamingResponse:
    handler = routes.get(request.path)
    if handler is None:
        return Response(404, f"no such endpoint: {request.path}\n".encode())
    try:
        with trio.fail_after(HANDLER_TIMEOUT_SECONDS):
            return await handler(request)
    except trio.TooSlowError:
        _log.error("http handler timed out", path=request.path, timeout=HANDLER_TIMEOUT_SECONDS)
        return Response(500, b"handler timed out\n")
    except Exception:
        _log.exception("http handler failed", path=request.path, method=request.method)
        return Response(500, b"internal error, see the server log\n")


async def _send_response(
    stream: trio.SocketStream, conn: h11.Connection, resp: Response, *, head_only: bool = False
) -> None:
    try:
        reason = HTTPStatus(resp.status).phrase.encode()
    except ValueError:
        reason = b""
    head = h11.Response(
        status_code=resp.status,
        reason=reason,
        headers=[("content-type", resp.content_type), ("content-length", str(len(resp.body)))],
    )
    data = conn.send(head)
    if not head_only:  # a HEAD response announces the body's length but carries no body
        data += conn.send(h11.Data(data=resp.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _stream_response(
    stream: trio.SocketStream, conn: h11.Connection, resp: StreamingResponse, *, head_only: bool
) -> None:
    """Send `resp` as its body yields (h11 chunks it for HTTP/1.1 clients), until the body
    ends or the client closes its side; the body is closed either way."""
    try:
        head = h11.Response(
            status_code=resp.status,
            reason=HTTPStatus(resp.status).phrase.encode(),
            headers=[("content-type", resp.content_type), ("connection", "close")],
        )
        await stream.send_all(conn.send(head))
        if head_only:
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_when_client_leaves, stream, nursery.cancel_scope)
            await _send_body(stream, conn, resp.body)
            nursery.cancel_scope.cancel()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away before the head was sent
    finally:
        with trio.CancelScope(shield=True):
            await resp.body.aclose()


async def _send_body(stream: trio.SocketStream, conn: h11.Connection, body: StreamingBody) -> None:
    # Errors end here, not in the nursery above: an exception group would escape the
    # connection handler and stop the whole server.
    try:
        async for chunk in body:
            await stream.send_all(conn.send(h11.Data(data=chunk)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away while we were sending
    except Exception:
        _log.exception("streaming response failed", peer=_peer(stream))


async def _cancel_when_client_leaves(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    # A follower that is idle on our side is only noticed gone by reading: EOF or reset.
    try:
        while await stream.receive_some(_RECEIVE_CHUNK):
            pass  # nothing may follow a request whose response never ends; ignore it
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


async def _close_gracefully(stream: trio.SocketStream) -> None:
    with trio.move_on_after(_CLOSE_LINGER_SECONDS):
        await stream.send_eof()
        while await stream.receive_some(_RECEIVE_CHUNK):
            pass


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "unknown"
    return f"{host}:{port}"


# --- Routes ---


def readiness_routes(readiness: Readiness) -> dict[str, HttpHandler]:
    """`/healthz/ready`: 200 "ready" once every startup task is done, else 500 naming them."""

    async def ready(request: Request) -> Response:
        if readiness.ready:
            return Response(200, b"ready\n")
        return Response(500, f"not ready, pending: {', '.join(readiness.pending)}\n".encode())

    return {"/healthz/ready": ready}


def metrics_routes(registry: prometheus_client.CollectorRegistry) -> dict[str, HttpHandler]:
    """`/metrics` and Envoy's `/stats/prometheus`: the registry in Prometheus text format."""

    async def scrape(request: Request) -> Response:
        body = prometheus_client.generate_latest(registry)
        return Response(200, body, prometheus_client.CONTENT_TYPE_PLAIN_0_0_4)

    return {"/metrics": scrape, "/stats/prometheus": scrape}


def admin_routes(config_dump: Callable[[], dict], drain: Drain) -> dict[str, HttpHandler]:
    """The loopback-only admin endpoints: `/`, `/config_dump`, `/logging`, `/quitquitquit`."""

    async def dump(request: Request) -> Response:
        body = json.dumps(config_dump(), indent=2, sort_keys=True, default=str) + "\n"
        return Response(200, body.encode(), "application/json")

    async def logging_level(request: Request) -> Response:
        level = request.query.get("level")
        if level is not None:
            try:
                log.set_level(level)
            except ValueError as exc:
                return Response(400, f"{exc}\n".encode())
            _log.info("log level changed", level=log.current_level())
        return Response(200, f"current log level is {log.current_level()}\n".encode())

    async def quitquitquit(request: Request) -> Response:
        if request.method != "POST":
            return Response(405, b"use POST to start draining\n")
        drain.start()
        return Response(200, b"draining\n")

    endpoints = {
        "/config_dump": (dump, "the proxy's current configuration and state (JSON)"),
        "/logging": (logging_level, "show the log level; ?level=debug|info|warn|error changes it"),
        "/quitquitquit": (quitquitquit, "POST: drain connections and exit"),
    }
    index_text = "".join(f"{path}: {text}\n" for path, (_, text) in endpoints.items())

    async def index(request: Request) -> Response:
        return Response(200, index_text.encode())

    return {"/": index, **{path: handler for path, (handler, _) in endpoints.items()}}
