"""The plain HTTP/1.1 parser and writers (waypoint.http1_wire), sans-IO.

A head the plain path takes must mean exactly what h11 would have made of it; every head
it is not sure about must give None, so that h11 answers it (or refuses it) as before.
What the writers put on the wire must never carry a header the caller did not ask for.
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from waypoint.http1_wire import (
    HEAD_END,
    LAST_CHUNK,
    chunk,
    content_length,
    last_chunk,
    parse_request_head,
    parse_response_head,
    request_head,
    response_head,
)
from waypoint.messages import without_hop_by_hop

# --- request heads ---


def test_plain_request_head_is_parsed_with_lower_case_names_and_stripped_values():
    head = parse_request_head(
        b"POST /a/b?x=1&y=%20 HTTP/1.1\r\nHost: svc.ns:8080\r\nX-Test:  one two \t\r\nContent-Length: 5\r\nAccept:\r\n\r\n"
    )
    assert head is not None
    assert (head.method, head.target, head.host, head.content_length) == ("POST", "/a/b?x=1&y=%20", "svc.ns:8080", 5)
    assert head.headers == (("x-test", "one two"), ("content-length", "5"), ("accept", ""))


def test_request_without_content_length_has_an_empty_body():
    head = parse_request_head(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
    assert head is not None
    assert head.content_length == 0
    assert head.headers == ()


def test_hop_by_hop_headers_and_those_named_by_connection_keep_alive_are_removed():
    head = parse_request_head(
        b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: Keep-Alive\r\nKeep-Alive: timeout=5\r\n"
        b"TE: trailers\r\nProxy-Connection: keep-alive\r\nX-Kept: yes\r\n\r\n"
    )
    assert head is not None
    assert head.headers == (("x-kept", "yes"),)


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 5x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: +5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: \xb2\r\n\r\n",  # latin-1 superscript two
        b"POST / HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: svc\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, x-private\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Test: one\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: svc\r\nHost: other\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: svc\r\n\r\n",
        b"GET http://svc/ HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\n\r\n",
        b"CONNECT / HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: svc\r\nX-Test: one\r\n two\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: svc\r\nX-Test: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: svc\r\nX-Test: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: svc\r\nX-Test: a\x0bb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: svc\r\nX-Test\t: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : svc\r\n\r\n",
        b"GET / HTTP/1.1\r\n Host: svc\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"GET /caf\xe9 HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: svc\r\n\r\n",
    ],
    ids=[
        "transfer-encoding",
        "two-content-lengths",
        "content-length-not-a-number",
        "content-length-signed",
        "content-length-non-ascii-digit",
        "expect",
        "upgrade",
        "connection-close",
        "connection-names-a-header",
        "no-host",
        "two-hosts",
        "http-1.0",
        "absolute-form",
        "asterisk-form",
        "connect-authority-form",
        "connect-origin-form",
        "obs-fold",
        "nul-in-value",
        "bare-cr-in-value",
        "vertical-tab-in-value",
        "whitespace-before-colon",
        "space-before-colon",
        "line-starting-with-space",
        "space-in-target",
        "non-ascii-target",
        "two-spaces-in-request-line",
    ],
)
def test_heads_that_are_not_plain_are_left_to_h11(head):
    assert parse_request_head(head) is None


# --- response heads ---


def test_plain_response_with_content_length():
    head = parse_response_head(
        b"HTTP/1.1 201 Created\r\nContent-Length: 12\r\nX-Served: yes\r\nKeep-Alive: timeout=5\r\n\r\n", head_request=False
    )
    assert head is not None
    assert (head.status, head.content_length, head.close) == (201, 12, False)
    assert head.headers == (("content-length", "12"), ("x-served", "yes"))


def test_response_without_a_reason_phrase_is_plain():
    head = parse_response_head(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", head_request=False)
    assert head is not None
    assert (head.status, head.content_length) == (200, 0)


def test_connection_close_is_reported_and_not_forwarded():
    head = parse_response_head(b"HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 2\r\n\r\n", head_request=False)
    assert head is not None
    assert head.close
    assert head.headers == (("content-length", "2"),)


def test_close_in_any_of_two_connection_headers_counts():
    head = parse_response_head(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", head_request=False
    )
    assert head is None or head.close


@pytest.mark.parametrize(
    ("head", "head_request"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\n\r\n", True),  # no length needed for a HEAD answer
        (b"HTTP/1.1 204 No Content\r\n\r\n", False),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", False),
    ],
    ids=["head-with-length", "head-without-length", "204", "304-with-length"],
)
def test_bodiless_responses_have_length_zero(head, head_request):
    parsed = parse_response_head(head, head_request=head_request)
    assert parsed is not None
    assert parsed.content_length == 0


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Served: yes\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: three\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: upgrade\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: x-private\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Test: a\r\n b\r\n\r\n",
        b"HTTP/1.1 20 OK\r\nContent-Length: 3\r\n\r\n",
    ],
    ids=[
        "100-continue",
        "103",
        "chunked",
        "length-and-chunked",
        "read-until-close",
        "http-1.0",
        "two-lengths",
        "length-not-a-number",
        "connection-upgrade",
        "connection-names-a-header",
        "obs-fold",
        "two-digit-status",
    ],
)
def test_responses_that_are_not_plain_are_left_to_h11(head):
    assert parse_response_head(head, head_request=False) is None


# --- writers ---


@pytest.mark.parametrize(
    "headers",
    [
        (("x-test", "a\r\nx-injected: 1"),),
        (("x-test", "a\nx-injected: 1"),),
        (("x-test", "a\r"),),
        (("x-test", "a\x00b"),),
        (("x test", "a"),),
        (("x-test:", "a"),),
        (("x:y", "a"),),
        (("", "a"),),
        (("x-test", "caf\u20ac"),),
        (("x-t\u00e9st", "a"),),
    ],
    ids=[
        "crlf",
        "lf",
        "bare-cr",
        "nul",
        "space-in-name",
        "colon-ending-name",
        "colon-in-name",
        "empty-name",
        "non-latin-1-value",
        "non-token-name",
    ],
)
def test_writers_refuse_headers_that_would_break_the_framing(headers):
    with pytest.raises(ValueError):
        request_head("GET", "/", (("host", "svc"), *headers), chunked=False)
    with pytest.raises(ValueError):
        response_head(200, headers, chunked=False, close=False)
    with pytest.raises(ValueError):
        last_chunk(headers)


@pytest.mark.parametrize(("method", "target"), [("GET", "/a b"), ("GET", "http://svc/"), ("G T", "/"), ("GET", "/\r\nx: 1")])
def test_request_line_that_is_not_origin_form_http_1_1_is_refused(method, target):
    with pytest.raises(ValueError):
        request_head(method, target, (("host", "svc"),), chunked=False)


def test_request_target_outside_latin_1_is_refused_not_altered():
    with pytest.raises(ValueError):
        request_head("GET", "/caf\u20ac", (("host", "svc"),), chunked=False)


@pytest.mark.parametrize("status", [100, 101, 199, 1000])
def test_response_head_refuses_non_final_statuses(status):
    with pytest.raises(ValueError):
        response_head(status, (), chunked=False, close=False)


def test_written_request_head_parses_back_to_what_was_written():
    headers = (("host", "svc.ns:80"), ("x-test", "one two"), ("content-length", "5"))
    written = request_head("PUT", "/r?q=1", headers, chunked=False)
    assert written.startswith(b"PUT /r?q=1 HTTP/1.1\r\n")
    parsed = parse_request_head(written)
    assert parsed is not None
    assert (parsed.method, parsed.target, parsed.host, parsed.content_length) == ("PUT", "/r?q=1", "svc.ns:80", 5)
    assert parsed.headers == headers[1:]


def test_written_chunked_request_head_is_framed_chunked():
    written = request_head("POST", "/", (("host", "svc"),), chunked=True)
    assert written == b"POST / HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n"


def test_written_response_head_parses_back_to_what_was_written():
    written = response_head(404, (("content-length", "3"), ("x-served", "yes")), chunked=False, close=True)
    assert written.startswith(b"HTTP/1.1 404 Not Found\r\n")
    parsed = parse_response_head(written, head_request=False)
    assert parsed is not None
    assert (parsed.status, parsed.content_length, parsed.close) == (404, 3, True)
    assert parsed.headers == (("content-length", "3"), ("x-served", "yes"))


def test_written_chunked_response_head_is_framed_chunked():
    written = response_head(200, (), chunked=True, close=False)
    assert written == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


def test_response_head_with_an_unknown_status_parses_back():
    parsed = parse_response_head(response_head(299, (("content-length", "0"),), chunked=False, close=False), head_request=False)
    assert parsed is not None
    assert parsed.status == 299


def test_chunk_framing():
    assert chunk(b"hello world, 17 b") == b"11\r\nhello world, 17 b\r\n"
    assert chunk(b"\r\n") == b"2\r\n\r\n\r\n"


def test_last_chunk_carries_trailers():
    assert last_chunk(()) == LAST_CHUNK == b"0\r\n\r\n"
    assert last_chunk((("grpc-status", "0"), ("grpc-message", "ok"))) == b"0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [((), None), ((("x-test", "1"),), None), ((("content-length", "42"),), 42), ((("content-length", " 7 "),), 7)],
)
def test_content_length_of_headers(headers, expected):
    assert content_length(headers) == expected


@pytest.mark.parametrize(
    "headers",
    [(("content-length", "4x"),), (("content-length", "-1"),), (("content-length", "1"), ("content-length", "1"))],
)
def test_unusable_content_length_is_an_error(headers):
    with pytest.raises(ValueError):
        content_length(headers)


# --- h11 as the oracle: what the plain path takes, h11 reads the same ---

_COMMON_LINES = st.sampled_from(
    ["Content-Length: 5", "Content-Length: 0", "content-length:05", "Connection: close", "Connection: keep-alive",
     "Connection: Keep-Alive, Close", "Keep-Alive: timeout=5", "TE: trailers", "X-Test: a b", "X-Test:\t a\x01b \t",
     "Accept:", "Transfer-Encoding: chunked", "Expect: 100-continue", "Host: other"]
)  # fmt: skip
_ODD_LINES = st.builds(
    "{}{}{}".format,
    st.sampled_from(["Host", "Content-Length", "Connection", "X-Test"]) | st.text("abcxyz-:; \t\x00\r\n", max_size=6),
    st.sampled_from([":", ": ", ":\t", " :", ":  "]),
    st.sampled_from(["5", " 5 ", "+5", "5, 5", "close, x-test", "upgrade", ""])
    | st.binary(max_size=8).map(lambda raw: raw.decode("latin-1")),
)


@st.composite
def _header_lines(draw) -> bytes:
    """Mostly common header lines, sometimes an odd one."""
    lines = draw(st.lists(st.integers(0, 9).flatmap(lambda n: _ODD_LINES if n == 0 else _COMMON_LINES), max_size=4))
    return b"".join(f"{line}\r\n".encode("latin-1") for line in lines)


def _whole_head(raw: bytes) -> bytes:
    """The head as the server cuts it: up to the first blank line."""
    return raw[: raw.index(HEAD_END) + len(HEAD_END)]


_REQUEST_LINES = st.sampled_from(
    [b"GET / HTTP/1.1", b"POST /a?b=1 HTTP/1.1", b"HEAD /h HTTP/1.1", b"get /x HTTP/1.1", b"PUT /%20?q HTTP/1.1", b"GET / HTTP/1.0",
     b"CONNECT svc:443 HTTP/1.1", b"GET http://svc/ HTTP/1.1", b"GET /a\xe9 HTTP/1.1", b"GET /a b HTTP/1.1"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(line=_REQUEST_LINES, lines=_header_lines())
def test_a_request_head_the_plain_path_takes_means_the_same_to_h11(line, lines):
    head = _whole_head(line + b"\r\nHost: svc\r\n" + lines + b"\r\n")
    parsed = parse_request_head(head)
    if parsed is None:
        return  # h11 decides
    server = h11.Connection(h11.SERVER)
    server.receive_data(head)
    event = server.next_event()  # a RemoteProtocolError here: the plain path took what h11 refuses
    assert isinstance(event, h11.Request)
    assert event.http_version == b"1.1"
    fields = tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers)
    assert (parsed.method, parsed.target) == (event.method.decode(), event.target.decode())
    assert parsed.host == dict(fields)["host"]
    assert parsed.headers == without_hop_by_hop(tuple(field for field in fields if field[0] != "host"))
    # Same framing: h11 reads exactly content_length body bytes, then the message ends.
    server.receive_data(b"b" * parsed.content_length)
    body = b""
    while not isinstance(event := server.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data)
        body += event.data
    assert len(body) == parsed.content_length
    assert server.their_state is h11.DONE  # h11 would keep the connection too


_STATUS_LINES = st.sampled_from(
    [b"HTTP/1.1 200 OK", b"HTTP/1.1 201", b"HTTP/1.1 503 Service  Unavailable ", b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 404 Not \xe9",
     b"HTTP/1.1 100 Continue", b"HTTP/1.0 200 OK", b"HTTP/1.1 999 x", b"HTTP/1.1 20 OK"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(line=_STATUS_LINES, lines=_header_lines(), head_request=st.booleans())
def test_a_response_head_the_plain_path_takes_means_the_same_to_h11(line, lines, head_request):
    assume(lines.lower().count(b"connection:") <= 1)  # two: test_close_in_any_of_two_connection_headers_counts
    head = _whole_head(line + b"\r\n" + lines + b"\r\n")
    parsed = parse_response_head(head, head_request=head_request)
    if parsed is None:
        return  # h11 decides
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="HEAD" if head_request else "GET", target="/", headers=[("host", "svc")]))
    client.send(h11.EndOfMessage())
    client.receive_data(head + b"b" * parsed.content_length)
    event = client.next_event()
    assert isinstance(event, h11.Response)
    fields = tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers)
    assert parsed.status == event.status_code
    assert parsed.headers == without_hop_by_hop(fields)
    body = b""
    while not isinstance(event := client.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data)
        body += event.data
    assert len(body) == parsed.content_length
    assert parsed.close == (client.their_state is h11.MUST_CLOSE)


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(
        st.tuples(st.text("abcX-_.: \t\r\n\x00\xe9\u20ac", min_size=0, max_size=5), st.text("ab :\t\r\n\x00\x7f\xe9\u20ac", max_size=6)),
        max_size=4,
    )
)
def test_a_written_head_carries_exactly_the_headers_given_or_is_refused(headers):
    try:
        written = response_head(200, (*headers, ("content-length", "0")), chunked=False, close=False)
    except ValueError:
        return
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "svc")]))
    client.send(h11.EndOfMessage())
    client.receive_data(written)
    event = client.next_event()
    assert isinstance(event, h11.Response)
    received = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers]
    assert received == [(name.lower(), value.strip(" \t")) for name, value in headers] + [("content-length", "0")]
