"""The waypoint's HTTP/2 server and upstream client over in-memory streams: multiplexing,
gRPC-style trailers and bidirectional streaming, 431 for oversized heads, and the rapid-reset
flood guard."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio
import trio.testing

from waypoint.http2 import Http2ClientConnection, serve_http2
from waypoint.messages import BodyError, BufferedBody, Request, Response
from waypoint.settings import HttpLimits

LIMITS = HttpLimits(max_header_bytes=4096, max_body_bytes=100_000, rapid_reset_limit=20, rapid_reset_window=10.0)


class QueueBody:
    """A body fed chunk by chunk by the test (a streaming client)."""

    def __init__(self) -> None:
        self.send, self._receive = trio.open_memory_channel[bytes](10)

    async def read(self) -> bytes:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            return b""

    @property
    def trailers(self):
        return ()

    async def aclose(self) -> None:
        pass


async def handler(request: Request, respond) -> None:
    if request.path == "/grpc":  # echo every message as it arrives, then trailers
        await respond(Response(200, (("content-type", "application/grpc"),), EchoBody(request.body)))
        return
    if request.path == "/slow":
        await trio.sleep_forever()
    body = b""
    try:
        while chunk := await request.body.read():
            body += chunk
    except BodyError as exc:
        await respond(Response(exc.status, (), BufferedBody()))
        return
    await respond(Response(200, (("x-method", request.method),), BufferedBody(request.authority.encode() + b" " + body)))


class EchoBody:
    def __init__(self, source) -> None:
        self._source = source

    async def read(self) -> bytes:
        return await self._source.read()

    @property
    def trailers(self):
        return (("grpc-status", "0"), ("grpc-message", "done"))

    async def aclose(self) -> None:
        pass


async def read_all(response: Response) -> bytes:
    data = b""
    while chunk := await response.body.read():
        data += chunk
    return data


async def test_requests_multiplex_over_one_connection():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http2, server_stream, handler, LIMITS)
        connection = Http2ClientConnection(client_stream)
        await nursery.start(connection.run)
        results: dict[int, tuple[int, bytes]] = {}

        async def one(n: int) -> None:
            response = await connection.send(Request("POST", "svc:9080", f"/{n}", (), BufferedBody(b"x" * n), "HTTP/2"))
            results[n] = (response.status, await read_all(response))

        async with trio.open_nursery() as requests:
            for n in range(20):
                requests.start_soon(one, n)
        assert results == {n: (200, b"svc:9080 " + b"x" * n) for n in range(20)}
        assert connection.requests_sent == 20 and connection.active_requests == 0
        nursery.cancel_scope.cancel()


async def test_bidirectional_stream_with_trailers():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http2, server_stream, handler, LIMITS)
        connection = Http2ClientConnection(client_stream)
        await nursery.start(connection.run)
        body = QueueBody()
        request = Request("POST", "grpc:50051", "/grpc", (("content-type", "application/grpc"),), body, "HTTP/2")
        await body.send.send(b"first")
        response = await connection.send(request)
        assert response.status == 200
        assert await response.body.read() == b"first"  # answered while the request still streams
        await body.send.send(b"second")
        assert await response.body.read() == b"second"
        await body.send.aclose()
        assert await response.body.read() == b""
        assert dict(response.body.trailers) == {"grpc-status": "0", "grpc-message": "done"}
        nursery.cancel_scope.cancel()


async def test_large_bodies_flow_under_flow_control():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    payload = bytes(range(256)) * 300  # 76,800 bytes: more than the initial 64 KiB window
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http2, server_stream, handler, LIMITS)
        connection = Http2ClientConnection(client_stream)
        await nursery.start(connection.run)
        response = await connection.send(Request("PUT", "svc", "/big", (), BufferedBody(payload), "HTTP/2"))
        assert await read_all(response) == b"svc " + payload
        nursery.cancel_scope.cancel()


async def test_oversized_headers_get_431_and_the_connection_keeps_serving():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http2, server_stream, handler, LIMITS)
        connection = Http2ClientConnection(client_stream)
        await nursery.start(connection.run)
        big = Request("GET", "svc", "/", (("x-big", "a" * 5000),), BufferedBody(), "HTTP/2")
        assert (await connection.send(big)).status == 431
        ok = await connection.send(Request("GET", "svc", "/", (), BufferedBody(), "HTTP/2"))
        assert ok.status == 200
        nursery.cancel_scope.cancel()


async def test_body_over_the_limit_fails_the_read_with_413():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http2, server_stream, handler, LIMITS)
        connection = Http2ClientConnection(client_stream)
        await nursery.start(connection.run)
        response = await connection.send(Request("POST", "svc", "/", (), BufferedBody(b"x" * 150_000), "HTTP/2"))
        assert response.status == 413
        nursery.cancel_scope.cancel()


class RawClient:
    """A bare h2 client driving the server frame by frame."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()

    async def flush(self) -> None:
        await self.stream.send_all(self.h2.data_to_send())

    async def events(self) -> list:
        data = await self.stream.receive_some(65536)
        if not data:
            return [None]
        events = self.h2.receive_data(data)
        await self.flush()
        return events

    def start(self, path: str = "/slow") -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, [(":method", "GET"), (":scheme", "http"), (":authority", "svc"), (":path", path)], end_stream=True)
        return stream_id


async def test_rapid_reset_flood_gets_goaway_enhance_your_calm():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http2, server_stream, handler, LIMITS)
        raw = RawClient(client_stream)
        for _ in range(LIMITS.rapid_reset_limit):
            stream_id = raw.start()
            raw.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        await raw.flush()
        terminated = None
        while terminated is None:
            for event in await raw.events():
                if event is None or isinstance(event, h2.events.ConnectionTerminated):
                    terminated = event
        assert terminated is not None, "the server closed without GOAWAY"
        assert terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        nursery.cancel_scope.cancel()


async def test_a_few_cancelled_requests_do_not_trip_the_flood_guard():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http2, server_stream, handler, LIMITS)
        raw = RawClient(client_stream)
        for _ in range(LIMITS.rapid_reset_limit - 1):
            raw.h2.reset_stream(raw.start(), h2.errors.ErrorCodes.CANCEL)
        ok = raw.start("/fine")
        await raw.flush()
        status = None
        while status is None:
            for event in await raw.events():
                assert not isinstance(event, h2.events.ConnectionTerminated)
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == ok:
                    status = dict(event.headers)[b":status"]
        assert status == b"200"
        nursery.cancel_scope.cancel()


async def test_client_reset_cancels_only_that_streams_handler():
    cancelled: list[str] = []

    async def tracking(request: Request, respond) -> None:
        try:
            await handler(request, respond)
        except trio.Cancelled:
            cancelled.append(request.path)
            raise

    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http2, server_stream, tracking, LIMITS)
        connection = Http2ClientConnection(client_stream)
        await nursery.start(connection.run)
        with trio.move_on_after(0.2):
            await connection.send(Request("GET", "svc", "/slow", (), BufferedBody(), "HTTP/2"))
        response = await connection.send(Request("GET", "svc", "/after", (), BufferedBody(), "HTTP/2"))
        assert response.status == 200
        await trio.testing.wait_all_tasks_blocked()
        assert cancelled == ["/slow"]
        nursery.cancel_scope.cancel()


async def test_a_reset_cancels_its_own_handler_only_while_workers_serve_stream_after_stream():
    # The server reuses one task per concurrent stream; a reset must still cancel exactly the
    # handler of the stream reset, and the worker it interrupted must go on serving.
    started: list[str] = []
    cancelled: list[str] = []

    async def tracking(request: Request, respond) -> None:
        started.append(request.path)
        try:
            if request.path.startswith("/slow"):
                await trio.sleep_forever()
            await handler(request, respond)
        except trio.Cancelled:
            cancelled.append(request.path)
            raise

    async def fast_requests(connection, count: int) -> None:
        for _ in range(count):
            response = await connection.send(Request("GET", "svc", "/fast", (), BufferedBody(), "HTTP/2"))
            assert response.status == 200
            await response.body.aclose()

    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http2, server_stream, tracking, LIMITS)
        connection = Http2ClientConnection(client_stream)
        await nursery.start(connection.run)
        slow = {}
        for name in ("/slow-1", "/slow-2"):
            slow[name] = trio.CancelScope()
            nursery.start_soon(_send_within, slow[name], connection, name)
        await trio.testing.wait_all_tasks_blocked()
        await fast_requests(connection, 5)
        slow["/slow-1"].cancel()  # the client gives up: RST_STREAM
        await trio.testing.wait_all_tasks_blocked()
        assert cancelled == ["/slow-1"]
        # the next stream goes to the worker just interrupted: its reset must reach it too
        slow["/slow-3"] = trio.CancelScope()
        nursery.start_soon(_send_within, slow["/slow-3"], connection, "/slow-3")
        await trio.testing.wait_all_tasks_blocked()
        slow["/slow-3"].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert cancelled == ["/slow-1", "/slow-3"]
        await fast_requests(connection, 5)
        await trio.testing.wait_all_tasks_blocked()
        assert cancelled == ["/slow-1", "/slow-3"]  # /slow-2 still waits; nothing else was hit
        slow["/slow-2"].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert cancelled == ["/slow-1", "/slow-3", "/slow-2"]
        await fast_requests(connection, 2)
        nursery.cancel_scope.cancel()
    assert started.count("/fast") == 12


async def _send_within(scope: trio.CancelScope, connection: Http2ClientConnection, path: str) -> None:
    with scope:
        await connection.send(Request("GET", "svc", path, (), BufferedBody(), "HTTP/2"))


async def _until_goaway(raw: RawClient) -> float:
    """When (trio time) the server ended the connection: GOAWAY, or the stream closing."""
    while True:
        for event in await raw.events():
            if event is None or isinstance(event, h2.events.ConnectionTerminated):
                return trio.current_time()


async def test_a_connection_without_streams_is_closed_after_the_idle_timeout(autojump_clock):
    limits = HttpLimits(idle_timeout=30.0)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http2, server_stream, handler, limits)
        raw = RawClient(client_stream)
        raw.start("/")
        await raw.flush()
        ended = False
        while not ended:  # the response, then nothing: the idle time starts there
            ended = any(isinstance(event, h2.events.StreamEnded) for event in await raw.events())
        answered = trio.current_time()
        await trio.sleep(20)  # a second request within the timeout starts it again
        raw.start("/")
        await raw.flush()
        again = trio.current_time()
        closed = await _until_goaway(raw)
        nursery.cancel_scope.cancel()
    assert answered < again
    assert closed - again == pytest.approx(limits.idle_timeout, abs=0.5)


async def test_a_connection_with_a_stream_open_outlives_the_idle_timeout(autojump_clock):
    limits = HttpLimits(idle_timeout=30.0)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http2, server_stream, handler, limits)
        raw = RawClient(client_stream)
        slow = raw.start("/slow")  # the handler never answers
        await raw.flush()
        with trio.move_on_after(100) as waited:
            await _until_goaway(raw)
        assert waited.cancelled_caught, "the connection was closed while a stream was open"
        raw.h2.reset_stream(slow, h2.errors.ErrorCodes.CANCEL)  # now nothing is open
        await raw.flush()
        reset_at = trio.current_time()
        closed = await _until_goaway(raw)
        nursery.cancel_scope.cancel()
    assert closed - reset_at == pytest.approx(limits.idle_timeout, abs=0.5)
