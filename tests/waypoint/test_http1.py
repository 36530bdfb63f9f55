"""The waypoint's HTTP/1.1 server and upstream client over in-memory streams.

What a client can get wrong (oversized or slow heads, smuggling framing, huge bodies) costs
that client a clean error; well-behaved exchanges keep their connection alive.
"""

from __future__ import annotations

import h11
import pytest
import trio
import trio.testing

from waypoint.http1 import Http1ClientConnection, serve_http1
from waypoint.messages import BodyError, BufferedBody, Request, Response
from waypoint.settings import HttpLimits

LIMITS = HttpLimits(max_header_bytes=4096, max_body_bytes=1000, header_timeout=5.0, idle_timeout=30.0)


async def echo(request: Request, respond) -> None:
    """Answers with what it received; a broken request body is answered with its status."""
    body = b""
    try:
        while chunk := await request.body.read():
            body += chunk
    except BodyError as exc:
        await respond(Response(exc.status, (("content-length", "0"),), BufferedBody()))
        return
    text = f"{request.method} {request.authority} {request.target} {dict(request.headers).get('x-test', '-')} ".encode() + body
    await respond(Response(200, (("x-served", "yes"),), BufferedBody(text)))


async def serve_then_close(stream, handler, limits: HttpLimits = LIMITS) -> None:
    """What the listener does: serve, then close the tunnel."""
    await serve_http1(stream, handler, limits)
    await stream.aclose()


async def exchange(server_handler, raw: bytes, *, limits: HttpLimits = LIMITS, close_after_send: bool = False) -> tuple[list, bool]:
    """Send raw bytes to a server; returns the h11 client events seen and whether the server closed."""
    client, server = trio.testing.memory_stream_pair()
    events: list = []
    closed = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_then_close, server, server_handler, limits)
        await client.send_all(raw)
        if close_after_send:
            await client.send_eof()
        parser = h11.Connection(h11.CLIENT)
        # Tell the parser what was asked so it can frame the responses.
        for method in _methods(raw):
            parser.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
            parser.send(h11.EndOfMessage())
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    data = await client.receive_some(65536)
                    if not data:
                        closed = True
                    parser.receive_data(data)
                    if closed:
                        break
                    continue
                events.append(event)
                if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            if closed or parser.our_state is not h11.DONE or parser.their_state is not h11.DONE:
                break
            parser.start_next_cycle()
        if not closed:
            closed = (await client.receive_some(65536)) == b""
        nursery.cancel_scope.cancel()
    return events, closed


def _methods(raw: bytes) -> list[bytes]:
    return [line.split(b" ")[0] for line in raw.split(b"\r\n") if line.endswith(b"HTTP/1.1")]


def statuses(events: list) -> list[int]:
    return [e.status_code for e in events if isinstance(e, h11.Response)]


def bodies(events: list) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data))


async def test_keep_alive_serves_requests_in_turn_and_echoes_bodies():
    raw = (
        b"POST /a?x=1 HTTP/1.1\r\nHost: svc:80\r\nContent-Length: 5\r\nX-Test: one\r\n\r\nhello"
        b"GET /b HTTP/1.1\r\nHost: svc:80\r\nConnection: close\r\n\r\n"
    )
    events, closed = await exchange(echo, raw)
    assert statuses(events) == [200, 200]
    assert bodies(events) == b"POST svc:80 /a?x=1 one helloGET svc:80 /b - "
    assert closed


async def test_chunked_request_body_is_streamed_to_the_handler():
    raw = b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    events, _ = await exchange(echo, raw, close_after_send=True)
    assert statuses(events) == [200]
    assert bodies(events).endswith(b"abcde")


async def test_oversized_headers_get_431_and_close():
    raw = b"GET / HTTP/1.1\r\nHost: svc\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
    events, closed = await exchange(echo, raw)
    assert statuses(events) == [431]
    assert closed


async def test_oversized_headers_arriving_in_pieces_get_431():
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_then_close, server, echo)
        await client.send_all(b"GET / HTTP/1.1\r\nHost: svc\r\nX-Big: ")
        for _ in range(10):
            await client.send_all(b"a" * 1000)
        answer = await client.receive_some(65536)
        nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
    ],
    ids=["cl-and-te", "two-lengths"],
)
async def test_smuggling_framing_gets_400_and_close(framing):
    calls = []

    async def handler(request, respond):
        calls.append(request)
        await echo(request, respond)

    raw = b"POST / HTTP/1.1\r\nHost: svc\r\n" + framing + b"\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: svc\r\n\r\n"
    events, closed = await exchange(handler, raw)
    assert statuses(events) == [400]
    assert closed
    assert calls == []  # neither the outer nor the smuggled request reached the handler


async def test_slow_loris_head_gets_408_after_the_header_timeout(autojump_clock):
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_then_close, server, echo)
        start = trio.current_time()
        await client.send_all(b"GET / HTTP/1.1\r\nHost: svc\r\n")
        answer = await client.receive_some(65536)
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert elapsed == pytest.approx(LIMITS.header_timeout, abs=0.1)


async def test_idle_connection_is_closed_quietly(autojump_clock):
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_then_close, server, echo)
        start = trio.current_time()
        answer = await client.receive_some(65536)
        assert trio.current_time() - start == pytest.approx(LIMITS.idle_timeout, abs=0.1)
        nursery.cancel_scope.cancel()
    assert answer == b""  # closed without a response


async def test_body_over_the_limit_fails_the_read_with_413():
    raw = b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000
    events, closed = await exchange(echo, raw)
    assert statuses(events) == [413]
    assert closed  # 1000 unread bytes are more than the handler took; the connection is not reused


async def test_a_failing_handler_costs_its_request_a_500_only():
    async def handler(request, respond):
        if request.target == "/boom":
            raise RuntimeError("bug")
        await echo(request, respond)

    raw = b"GET /boom HTTP/1.1\r\nHost: svc\r\n\r\nGET /ok HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
    events, _ = await exchange(handler, raw)
    assert statuses(events) == [500, 200]


async def test_unread_request_body_is_drained_to_keep_the_connection():
    async def deny(request, respond):
        await respond(Response(403, (("content-length", "0"),), BufferedBody()))

    raw = (
        b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\n0123456789"
        b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
    )
    events, _ = await exchange(deny, raw)
    assert statuses(events) == [403, 403]


async def test_client_reuses_a_connection_until_the_server_says_close():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    idle: list = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_then_close, server_stream, echo)
        connection = Http1ClientConnection(client_stream, on_idle=idle.append)
        for n in range(2):
            body = BufferedBody(b"ping%d" % n)
            response = await connection.send(Request("PUT", "svc:80", f"/r{n}", (("x-test", "t"),), body, "HTTP/1.1"))
            payload = b""
            while chunk := await response.body.read():
                payload += chunk
            assert response.status == 200
            assert payload == b"PUT svc:80 /r%d t ping%d" % (n, n)
        assert idle == [connection, connection]
        response = await connection.send(Request("GET", "svc:80", "/", (("connection", "close"),), BufferedBody(), "HTTP/1.1"))
        while await response.body.read():
            pass
        nursery.cancel_scope.cancel()
    assert len(idle) == 3  # hop-by-hop Connection: close from the caller is not forwarded
