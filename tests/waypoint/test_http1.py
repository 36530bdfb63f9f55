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


# --- the plain path (waypoint.http1_wire) and h11 taking over from it ---


class PiecesBody:
    """A body read in the pieces given."""

    def __init__(self, *pieces: bytes, trailers=()) -> None:
        self._pieces = list(pieces)
        self.trailers = trailers

    async def read(self) -> bytes:
        return self._pieces.pop(0) if self._pieces else b""

    async def aclose(self) -> None:
        self._pieces.clear()


async def ask(handler, raw: bytes, methods: list[bytes]) -> tuple[list[tuple[int, dict, bytes]], bytes, bool]:
    """Send `raw` to a server running `handler`, then read_responses for `methods`."""
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_then_close, server, handler)
            await client.send_all(raw)
            answer = await read_responses(client, methods)
            nursery.cancel_scope.cancel()
    return answer


async def read_responses(stream, methods: list[bytes]) -> tuple[list[tuple[int, dict, bytes]], bytes, bool]:
    """One (status, headers, body) per method as h11 reads them, stopping early if the server
    closes; also every byte received and whether the server closed."""
    parser = h11.Connection(h11.CLIENT)
    received = b""
    responses: list[tuple[int, dict, bytes]] = []
    for method in methods:
        parser.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        parser.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                received += data
                if not data:
                    return responses, received, True
                parser.receive_data(data)
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, {n.decode(): v.decode() for n, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        responses.append((status, headers, body))
        if parser.our_state is not h11.DONE or parser.their_state is not h11.DONE:
            break
        parser.start_next_cycle()
    return responses, received, False


async def read_to_close(stream) -> bytes:
    received = b""
    while data := await stream.receive_some(65536):
        received += data
    return received


async def two_pipelined_requests(handler) -> bytes:
    """Everything the server writes for two pipelined GETs, until it closes."""
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_then_close, server, handler)
            await client.send_all(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\nGET /next HTTP/1.1\r\nHost: svc\r\n\r\n")
            return await read_to_close(client)


@pytest.mark.parametrize("pipelined", [False, True], ids=["in-turn", "pipelined"])
async def test_h11_takes_over_at_a_chunked_request_and_serves_the_rest(pipelined):
    requests = [
        b"POST /one HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc",
        b"POST /two HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n1\r\nf\r\n0\r\n\r\n",
        b"GET /three HTTP/1.1\r\nHost: svc\r\nX-Test: t\r\n\r\n",
    ]
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_then_close, server, echo)
            if pipelined:
                await client.send_all(b"".join(requests))
                responses, _, closed = await read_responses(client, [b"POST", b"POST", b"GET"])
            else:
                responses, closed = [], False
                for raw, method in zip(requests, [b"POST", b"POST", b"GET"]):
                    await client.send_all(raw)
                    answered, _, closed = await read_responses(client, [method])
                    responses += answered
            nursery.cancel_scope.cancel()
    assert [(status, body) for status, _, body in responses] == [
        (200, b"POST svc /one - abc"),
        (200, b"POST svc /two - def"),
        (200, b"GET svc /three t "),
    ]
    assert not closed


async def test_pipelined_plain_requests_are_answered_in_order_and_the_connection_kept():
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_then_close, server, echo)
            await client.send_all(
                b"PUT /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nhi"
                b"GET /b HTTP/1.1\r\nHost: svc\r\nX-Test: second\r\n\r\n"
            )
            first, _, _ = await read_responses(client, [b"PUT", b"GET"])
            await client.send_all(b"GET /c HTTP/1.1\r\nHost: svc\r\n\r\n")
            then, _, closed = await read_responses(client, [b"GET"])
            nursery.cancel_scope.cancel()
    assert [body for _, _, body in first + then] == [b"PUT svc /a - hi", b"GET svc /b second ", b"GET svc /c - "]
    assert first[0][1]["x-served"] == "yes"
    assert not closed


async def test_plain_request_head_and_body_arriving_in_pieces_are_put_together():
    pieces = [b"POST /p HTTP/1.1\r\nHo", b"st: svc\r\nContent-Len", b"gth: 11\r\n\r\nhel", b"lo ", b"world"]
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_then_close, server, echo)
            for piece in pieces:
                await client.send_all(piece)
                await trio.testing.wait_all_tasks_blocked()
            responses, _, _ = await read_responses(client, [b"POST"])
            nursery.cancel_scope.cancel()
    assert [(status, body) for status, _, body in responses] == [(200, b"POST svc /p - hello world")]


async def test_plain_request_body_cut_short_by_the_client_gets_400_and_close():
    events, closed = await exchange(echo, b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\nabc", close_after_send=True)
    assert statuses(events) == [400]
    assert closed


@pytest.mark.parametrize(
    "response",
    [
        Response(200, (("x-test", "a\r\nx-injected: 1"), ("content-length", "0")), BufferedBody()),
        Response(200, (("x-test", "a\nx-injected: 1"), ("content-length", "0")), BufferedBody()),
        Response(200, (("x-test: a\r\nx-injected", "1"), ("content-length", "0")), BufferedBody()),
        Response(200, (("content-type", "text/plain"),), PiecesBody(b"ok", trailers=(("x-test", "a\r\nx-injected: 1"),))),
    ],
    ids=["crlf-in-value", "lf-in-value", "crlf-in-name", "crlf-in-trailer"],
)
async def test_header_injection_by_the_handler_never_reaches_the_wire(response):
    async def handler(request, respond):
        await respond(response)

    received = await two_pipelined_requests(handler)
    assert b"x-injected" not in received
    assert received.count(b"HTTP/1.1 ") <= 1  # the pipelined request is not answered on a broken connection


@pytest.mark.parametrize(
    ("declared", "pieces"),
    [("10", [b"hello"]), ("3", [b"hello"]), ("3", [b"abc", b"de"]), ("0", [b"x"])],
    ids=["longer-than-body", "shorter-than-body", "shorter-than-body-in-pieces", "zero-with-body"],
)
async def test_response_body_not_matching_its_content_length_closes_the_connection(declared, pieces):
    async def handler(request, respond):
        await respond(Response(200, (("content-length", declared),), PiecesBody(*pieces)))

    # The second request's answer must not be read as the rest of the first body.
    received = await two_pipelined_requests(handler)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert len(body) <= int(declared)  # nothing past the declared length
    assert b"HTTP/1.1" not in body


@pytest.mark.parametrize("length", [None, "11"], ids=["no-length", "with-length"])
async def test_head_request_gets_the_head_only(length):
    async def handler(request, respond):
        headers = (("content-length", length),) if length else ()
        await respond(Response(200, headers, BufferedBody(b"hello world")))

    raw = b"HEAD / HTTP/1.1\r\nHost: svc\r\n\r\nGET / HTTP/1.1\r\nHost: svc\r\n\r\n"
    responses, received, closed = await ask(handler, raw, [b"HEAD", b"GET"])
    assert [(status, body) for status, _, body in responses] == [(200, b""), (200, b"hello world")]
    assert received.count(b"hello world") == 1
    assert not closed


async def test_204_from_the_handler_is_sent_bodiless_and_keeps_the_connection():
    async def handler(request, respond):
        await respond(Response(204, (), BufferedBody()))

    raw = b"DELETE /a HTTP/1.1\r\nHost: svc\r\n\r\nDELETE /b HTTP/1.1\r\nHost: svc\r\n\r\n"
    responses, received, closed = await ask(handler, raw, [b"DELETE", b"DELETE"])
    assert [status for status, _, _ in responses] == [204, 204]
    assert b"transfer-encoding" not in received.lower()
    assert not closed


# --- the client against a peer scripted by hand ---


def get(target: str = "/", method: str = "GET", headers=()) -> Request:
    return Request(method, "svc:80", target, headers, BufferedBody(), "HTTP/1.1")


async def read_body(body) -> bytes:
    data = b""
    while chunk := await body.read():
        data += chunk
    return data


async def receive_request_head(peer) -> bytes:
    """A request head without body, as the peer reads it."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = await peer.receive_some(65536)
        if not piece:
            break
        data += piece
    return data


async def answer(peer, replies: list[list[bytes]], seen: list[bytes], close: bool = False) -> None:
    """For each request, read its head and send the reply's pieces one by one; stops when
    the client closes the connection."""
    for pieces in replies:
        seen.append(await receive_request_head(peer))
        for piece in pieces:
            try:
                await peer.send_all(piece)
            except trio.BrokenResourceError:
                return
            await trio.testing.wait_all_tasks_blocked()
    if close:
        await peer.aclose()


async def test_client_reads_a_plain_response_and_reuses_the_connection():
    client_stream, peer = trio.testing.memory_stream_pair()
    idle: list = []
    seen: list[bytes] = []
    connection = Http1ClientConnection(client_stream, on_idle=idle.append)
    reply = [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Served: yes\r\nKeep-Alive: timeout=5\r\n\r\nhel", b"lo"]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, peer, [reply, reply], seen)
            bodies_read = []
            for n in range(2):
                response = await connection.send(get(f"/r{n}", headers=(("x-test", "t"), ("connection", "close"))))
                bodies_read.append((response.status, response.headers, await read_body(response.body)))
    assert bodies_read == [(200, (("content-length", "5"), ("x-served", "yes")), b"hello")] * 2
    assert idle == [connection, connection]
    assert not connection.closed
    assert seen[1] == b"GET /r1 HTTP/1.1\r\nhost: svc:80\r\nx-test: t\r\n\r\n"  # hop-by-hop not forwarded


async def test_client_lets_h11_read_a_chunked_response_then_keeps_going():
    client_stream, peer = trio.testing.memory_stream_pair()
    idle: list = []
    seen: list[bytes] = []
    connection = Http1ClientConnection(client_stream, on_idle=idle.append)
    chunked = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", b"6\r\n world\r\n0\r\ngrpc-status: 0\r\n\r\n"]
    plain = [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, peer, [chunked, plain], seen)
            first = await connection.send(get("/a"))
            first_body = await read_body(first.body)
            second = await connection.send(get("/b"))
            second_body = await read_body(second.body)
    assert (first.status, first_body, first.body.trailers) == (200, b"hello world", (("grpc-status", "0"),))
    assert dict(first.headers).get("transfer-encoding") is None
    assert (second.status, second_body) == (200, b"next")
    assert idle == [connection, connection]
    assert seen[1].startswith(b"GET /b HTTP/1.1\r\n")


async def test_client_reads_an_http_1_0_response_until_close_and_does_not_reuse():
    client_stream, peer = trio.testing.memory_stream_pair()
    idle: list = []
    connection = Http1ClientConnection(client_stream, on_idle=idle.append)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, peer, [[b"HTTP/1.0 200 OK\r\nX-Served: yes\r\n\r\nsome ", b"body"]], [], True)
            response = await connection.send(get())
            body = await read_body(response.body)
    assert (response.status, body) == (200, b"some body")
    assert idle == []
    assert connection.closed


@pytest.mark.parametrize("together", [False, True], ids=["apart", "together"])
async def test_client_skips_100_continue_to_the_final_response(together):
    client_stream, peer = trio.testing.memory_stream_pair()
    idle: list = []
    connection = Http1ClientConnection(client_stream, on_idle=idle.append)
    pieces = [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, peer, [[b"".join(pieces)] if together else pieces], [])
            response = await connection.send(get())
            body = await read_body(response.body)
    assert (response.status, body) == (201, b"ok")
    assert idle == [connection]


async def test_client_closes_after_a_response_saying_connection_close():
    client_stream, peer = trio.testing.memory_stream_pair()
    idle: list = []
    connection = Http1ClientConnection(client_stream, on_idle=idle.append)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, peer, [[b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"]], [])
            response = await connection.send(get())
            body = await read_body(response.body)
            after = await peer.receive_some(65536)
    assert (response.status, response.headers, body) == (200, (("content-length", "2"),), b"ok")
    assert idle == []
    assert connection.closed
    assert after == b""  # the peer sees the close


async def test_client_head_request_reads_no_body_despite_content_length():
    client_stream, peer = trio.testing.memory_stream_pair()
    idle: list = []
    connection = Http1ClientConnection(client_stream, on_idle=idle.append)
    replies = [[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"], [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, peer, replies, [])
            head = await connection.send(get(method="HEAD"))
            head_body = await read_body(head.body)
            response = await connection.send(get())
            body = await read_body(response.body)
    assert (head.status, head_body, body) == (200, b"", b"ok")
    assert idle == [connection, connection]


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale",
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale",
        ),
    ],
    ids=["plain", "chunked"],
)
async def test_client_does_not_reuse_a_connection_with_bytes_past_the_response(reply):
    client_stream, peer = trio.testing.memory_stream_pair()
    idle: list = []
    connection = Http1ClientConnection(client_stream, on_idle=idle.append)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, peer, [[reply]], [])
            response = await connection.send(get())
            body = await read_body(response.body)
    assert body == b"ok"
    assert idle == []
    assert connection.closed


@pytest.mark.parametrize(
    "pieces",
    [
        [b"HTTP/1.1 200 OK\r\n"] + [b"X-Big: " + b"a" * 1000 + b"\r\n"] * 6 + [b"Content-Length: 0\r\n\r\n"],
        pytest.param(
            [b"HTTP/1.1 200 OK\r\n" + (b"X-Big: " + b"a" * 1000 + b"\r\n") * 6 + b"Content-Length: 0\r\n\r\n"],
        ),
    ],
    ids=["in-pieces", "in-one-read"],
)
async def test_client_refuses_a_response_head_larger_than_the_limit(pieces):
    client_stream, peer = trio.testing.memory_stream_pair()
    idle: list = []
    connection = Http1ClientConnection(client_stream, max_header_bytes=4096, on_idle=idle.append)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, peer, [pieces], [])
            with pytest.raises(h11.RemoteProtocolError):
                await connection.send(get())
    assert connection.closed
    assert idle == []


async def test_client_reports_a_response_body_cut_short():
    client_stream, peer = trio.testing.memory_stream_pair()
    connection = Http1ClientConnection(client_stream)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, peer, [[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"]], [], True)
            response = await connection.send(get())
            with pytest.raises(BodyError):
                await read_body(response.body)
    assert connection.closed


async def test_client_reports_a_peer_that_closes_before_the_response_head():
    client_stream, peer = trio.testing.memory_stream_pair()
    connection = Http1ClientConnection(client_stream)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, peer, [[b"HTTP/1.1 200 OK\r\nContent-Le"]], [], True)
            with pytest.raises(h11.RemoteProtocolError):
                await connection.send(get())
    assert connection.closed


@pytest.mark.parametrize(
    "headers",
    [(("x-test", "a\r\nx-injected: 1"),), (("x-test: a\r\nx-injected", "1"),), (("x-test", "a\x00b"),)],
    ids=["crlf-in-value", "crlf-in-name", "nul-in-value"],
)
async def test_client_refuses_to_send_an_injected_header(headers):
    client_stream, peer = trio.testing.memory_stream_pair()
    connection = Http1ClientConnection(client_stream)
    with trio.fail_after(5):
        with pytest.raises(h11.LocalProtocolError):
            await connection.send(get(headers=headers))
        received = await read_to_close(peer)
    assert b"x-injected" not in received
    assert connection.closed


async def test_client_streams_a_request_body_of_unknown_length_chunked():
    client_stream, peer = trio.testing.memory_stream_pair()
    connection = Http1ClientConnection(client_stream)
    request = Request("POST", "svc:80", "/up", (), PiecesBody(b"abc", b"de"), "HTTP/1.1")

    seen: list[bytes] = []

    async def peer_side() -> None:
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            data += await peer.receive_some(65536)
        seen.append(data)
        await peer.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer_side)
            response = await connection.send(request)
            await read_body(response.body)
    assert seen == [b"POST /up HTTP/1.1\r\nhost: svc:80\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"]
    assert response.status == 200


@pytest.mark.parametrize(
    ("declared", "pieces"),
    [
        ("5", [b"he"]),
        ("2", [b"he", b"llo"]),
        pytest.param(
            "2",
            [b"hello"],
        ),
        pytest.param(
            "5",
            [],
        ),
    ],
    ids=["shorter", "longer-in-pieces", "longer-in-one-piece", "empty"],
)
async def test_client_refuses_a_request_body_not_matching_its_content_length(declared, pieces):
    client_stream, peer = trio.testing.memory_stream_pair()
    connection = Http1ClientConnection(client_stream)
    request = Request("POST", "svc:80", "/", (("content-length", declared),), PiecesBody(*pieces), "HTTP/1.1")
    seen: list[bytes] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, peer, [[b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"]], seen)
            with pytest.raises(h11.LocalProtocolError):
                await connection.send(request)
    assert connection.closed
    assert len(seen[0].partition(b"\r\n\r\n")[2]) <= int(declared)  # nothing past the declared length


@pytest.mark.parametrize(
    "split",
    [0, 10, 58, 61],
    ids=["nothing-sniffed", "part-of-the-head", "head-and-part-of-the-body", "whole-request"],
)
async def test_bytes_already_read_by_protocol_detection_start_the_first_request(split):
    raw = b"POST /sniffed HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello"
    assert len(raw) == 61 and raw.index(b"\r\n\r\n") + 4 == 56
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def serve_sniffed() -> None:
                await serve_http1(server, echo, LIMITS, initial=raw[:split])

            nursery.start_soon(serve_sniffed)
            if raw[split:]:
                await client.send_all(raw[split:])
            responses, _, _ = await read_responses(client, [b"POST"])
            nursery.cancel_scope.cancel()
    assert [(status, body) for status, _, body in responses] == [(200, b"POST svc /sniffed - hello")]


async def test_idle_timeout_counts_from_the_end_of_the_last_exchange(autojump_clock):
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_then_close, server, echo)
        await trio.sleep(LIMITS.idle_timeout - 1)
        await client.send_all(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        responses, _, _ = await read_responses(client, [b"GET"])
        answered_at = trio.current_time()
        closed = await client.receive_some(65536) == b""
        idle_for = trio.current_time() - answered_at
        nursery.cancel_scope.cancel()
    assert [status for status, _, _ in responses] == [200]
    assert closed
    assert idle_for == pytest.approx(LIMITS.idle_timeout, abs=0.1)


async def test_a_slow_handler_is_not_cut_off_by_the_idle_or_header_timeout(autojump_clock):
    async def slow(request, respond):
        await trio.sleep(LIMITS.idle_timeout + LIMITS.header_timeout)
        await echo(request, respond)

    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_then_close, server, slow)
        await client.send_all(b"GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
        responses, _, closed = await read_responses(client, [b"GET"])
        nursery.cancel_scope.cancel()
    assert [(status, body) for status, _, body in responses] == [(200, b"GET svc /slow - ")]
    assert not closed


async def test_a_head_trickling_in_after_a_served_request_gets_408_a_header_timeout_after_its_first_byte(autojump_clock):
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_then_close, server, echo)
        await client.send_all(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        await read_responses(client, [b"GET"])
        await trio.sleep(1)
        started = trio.current_time()

        async def trickle() -> None:
            for byte in b"GET /loris HTTP/1.1\r\nHost: svc\r\n":
                await client.send_all(bytes([byte]))
                await trio.sleep(0.5)

        nursery.start_soon(trickle)
        answer = await client.receive_some(65536)
        elapsed = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert elapsed == pytest.approx(LIMITS.header_timeout, abs=0.6)


async def test_heads_arriving_byte_by_byte_are_found_where_their_end_straddles_two_reads():
    raw = b"GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n"
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_then_close, server, echo)
            for byte in raw:
                await client.send_all(bytes([byte]))
                await trio.testing.wait_all_tasks_blocked()
            responses, _, _ = await read_responses(client, [b"GET"])
            nursery.cancel_scope.cancel()
    assert [(status, body) for status, _, body in responses] == [(200, b"GET svc /slow - ")]

    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    client_stream, peer = trio.testing.memory_stream_pair()
    idle: list = []
    connection = Http1ClientConnection(client_stream, on_idle=idle.append)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, peer, [[bytes([byte]) for byte in reply]], [])
            response = await connection.send(get())
            assert (response.status, await read_body(response.body)) == (200, b"ok")
            nursery.cancel_scope.cancel()
    assert idle == [connection]
