"""The waypoint's own HTTP/2 server connection (waypoint.http2_wire), byte for byte, no sockets.

Three kinds of test:

- an h2 *client* is the peer: bytes are pumped between it and `H2ServerConnection` in-process,
  so whatever the server writes must be what a real client understands, and the reverse;
- raw frames, built here with `struct`, for what no conforming client sends: each must cost
  exactly the connection (ProtocolError with its code, GOAWAY queued) or exactly one stream
  (RST_STREAM with its code) that RFC 9113 says it costs;
- hypothesis properties: for valid random request sequences the server reports what h2's own
  server reports for the same bytes, and random frames never raise anything but ProtocolError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from waypoint.http2_wire import (
    MAX_HEADER_FRAGMENTS,
    MAX_PENDING_CONTROL_FRAMES,
    PREFACE,
    H2ServerConnection,
)

Codes = h2.errors.ErrorCodes
SettingCodes = h2.settings.SettingCodes

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

SERVER_DEFAULTS = dict(max_concurrent_streams=100, stream_window=65_535, connection_window=65_535, max_header_list_size=65_536)
GET = [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "svc")]
POST = [(":method", "POST"), (":scheme", "https"), (":path", "/upload"), (":authority", "svc")]


def server(**overrides: int) -> H2ServerConnection:
    return H2ServerConnection(**{**SERVER_DEFAULTS, **overrides})


# --- frames on the wire ---


@dataclass(frozen=True)
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes

    @property
    def code(self) -> int:
        """The error code of a RST_STREAM or GOAWAY frame."""
        return struct.unpack_from(">L", self.payload, 4 if self.type == GOAWAY else 0)[0]


def frame(frame_type: int, flags: int = 0, stream_id: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">BHBBL", len(payload) >> 16, len(payload) & 0xFFFF, frame_type, flags, stream_id) + payload


def settings_frame(*pairs: tuple[int, int], flags: int = 0, stream_id: int = 0) -> bytes:
    return frame(SETTINGS, flags, stream_id, b"".join(struct.pack(">HL", code, value) for code, value in pairs))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">L", increment))


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, struct.pack(">L", code))


def padded(payload: bytes, padding: int) -> bytes:
    return bytes((padding,)) + payload + b"\0" * padding


def parse_frames(data: bytes) -> list[Frame]:
    frames = []
    while data:
        high, low, frame_type, flags, stream_id = struct.unpack_from(">BHBBL", data)
        end = 9 + (high << 16 | low)
        frames.append(Frame(frame_type, flags, stream_id & 0x7FFFFFFF, data[9:end]))
        data = data[end:]
    return frames


def of_type(events: list, kind: type) -> list:
    return [event for event in events if isinstance(event, kind)]


# --- a raw client: frames built by hand, HPACK from hpack's encoder ---


class RawClient:
    """Past the preface and SETTINGS exchange; `send` frames, read back the server's `output`."""

    def __init__(self, **overrides: int) -> None:
        self.server = server(**overrides)
        self.encoder = hpack.Encoder()
        self.server.initiate_connection()
        assert self.server.receive_data(PREFACE + settings_frame()) == []
        assert [(f.type, f.flags) for f in self.output()] == [(SETTINGS, 0), (SETTINGS, ACK)]
        self.next_stream_id = 1

    def block(self, headers) -> bytes:
        """An HPACK block for `headers` (str as latin-1), from this connection's encoder."""
        return self.encoder.encode([(_latin1(name), _latin1(value)) for name, value in headers])

    def headers(self, stream_id: int, headers=GET, end_stream: bool = True) -> bytes:
        return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream_id, self.block(headers))

    def send(self, *frames: bytes) -> list:
        return self.server.receive_data(b"".join(frames))

    def output(self) -> list[Frame]:
        return parse_frames(self.server.data_to_send())

    def open(self, headers=GET, end_stream: bool = False) -> int:
        """A new valid request; its stream id."""
        stream_id = self.next_stream_id
        self.next_stream_id += 2
        events = self.send(self.headers(stream_id, headers, end_stream))
        assert [type(event) for event in events] == [h2.events.RequestReceived]
        return stream_id

    def still_serves(self) -> None:
        """A following valid request is served normally, and the server answers it."""
        stream_id = max(self.next_stream_id, self.server._highest_stream_id + 1) | 1
        self.next_stream_id = stream_id + 2
        events = self.send(self.headers(stream_id, GET))
        assert [type(event) for event in events] == [h2.events.RequestReceived]
        assert events[0].headers == tuple(GET)
        self.server.send_headers(stream_id, [(":status", "200")], end_stream=True)
        assert [(f.type, f.stream_id) for f in self.output()] == [(HEADERS, stream_id)]


def _latin1(text: str | bytes) -> bytes:
    return text.encode("latin-1") if isinstance(text, str) else text


def expect_connection_error(client: RawClient, data: bytes, code: int) -> None:
    with pytest.raises(h2.exceptions.ProtocolError) as info:
        client.server.receive_data(data)
    assert info.value.error_code == code
    goaways = [f for f in client.output() if f.type == GOAWAY]
    assert [f.code for f in goaways] == [code]
    # the connection is over: nothing more is read from it
    assert client.server.receive_data(client.headers(101)) == []
    assert client.server.data_to_send() == b""


def expect_stream_error(client: RawClient, data: bytes, stream_id: int, code: int, *, was_open: bool) -> list:
    events = client.send(data)
    resets = of_type(events, h2.events.StreamReset)
    expected = [h2.events.StreamReset(stream_id=stream_id, error_code=code, remote_reset=False)] if was_open else []
    assert resets == expected
    assert [(f.type, f.stream_id, f.code) for f in client.output() if f.type in (RST_STREAM, GOAWAY)] == [(RST_STREAM, stream_id, code)]
    client.still_serves()
    return events


# --- an h2 client as the peer ---


class Pair:
    """An h2 client and our server, bytes pumped between them in-process."""

    def __init__(self, client_settings: dict | None = None, **overrides: int) -> None:
        self.server = server(**overrides)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="latin-1"))
        if client_settings:
            self.client.local_settings = h2.settings.Settings(client=True, initial_values=client_settings)

    def handshake(self) -> tuple[list, list]:
        self.client.initiate_connection()
        self.server.initiate_connection()
        return self.pump()

    def pump(self) -> tuple[list, list]:
        """Move bytes both ways until neither side has more; the (server, client) events."""
        server_events: list = []
        client_events: list = []
        while True:
            to_server = self.client.data_to_send()
            if to_server:
                server_events += self.server.receive_data(to_server)
            to_client = self.server.data_to_send()
            if to_client:
                client_events += self.client.receive_data(to_client)
            if not to_server and not to_client:
                return server_events, client_events

    def request(self, headers=GET, body: bytes = b"", chunk: int = 16_384) -> tuple[int, list]:
        """Send a request (END_STREAM on its last frame); its stream id and the server's events."""
        stream_id = self.client.get_next_available_stream_id()
        self.client.send_headers(stream_id, headers, end_stream=not body)
        for start in range(0, len(body), chunk):
            self.client.send_data(stream_id, body[start : start + chunk], end_stream=start + chunk >= len(body))
        return stream_id, self.pump()[0]

    def respond(self, stream_id: int, headers=((":status", "200"),), body: bytes = b"", trailers=None) -> list:
        """Answer a stream; the client's events."""
        self.server.send_headers(stream_id, headers, end_stream=not body and not trailers)
        if body:
            self.server.send_data(stream_id, body, end_stream=not trailers)
        if trailers:
            self.server.send_headers(stream_id, trailers, end_stream=True)
        return self.pump()[1]


def received_body(events: list, stream_id: int) -> bytes:
    return b"".join(event.data for event in of_type(events, h2.events.DataReceived) if event.stream_id == stream_id)


# ===================== 1. against an h2 client =====================


def test_handshake_exchanges_settings_and_both_sides_acknowledge():
    pair = Pair(connection_window=1 << 20, stream_window=1 << 18, max_concurrent_streams=7)
    pair.client.initiate_connection()
    pair.server.initiate_connection()
    server_out = parse_frames(pair.server.data_to_send())
    assert [f.type for f in server_out] == [SETTINGS, WINDOW_UPDATE]
    assert server_out[1].stream_id == 0 and struct.unpack(">L", server_out[1].payload)[0] == (1 << 20) - 65_535
    client_events = pair.client.receive_data(b"".join(frame(f.type, f.flags, f.stream_id, f.payload) for f in server_out))
    client_out = pair.client.data_to_send()
    assert client_out.startswith(PREFACE)
    # the client took our SETTINGS and acknowledged them...
    assert of_type(client_events, h2.events.RemoteSettingsChanged)
    assert [(f.type, f.flags) for f in parse_frames(client_out[len(PREFACE) :])] == [(SETTINGS, 0), (SETTINGS, ACK)]
    assert pair.server.receive_data(client_out) == []
    # ...and we acknowledge the client's
    server_ack = pair.server.data_to_send()
    assert [(f.type, f.flags) for f in parse_frames(server_ack)] == [(SETTINGS, ACK)]
    assert of_type(pair.client.receive_data(server_ack), h2.events.SettingsAcknowledged)
    remote = pair.client.remote_settings
    assert (remote.enable_push, remote.max_concurrent_streams, remote.initial_window_size) == (0, 7, 1 << 18)
    assert pair.client.outbound_flow_control_window == 1 << 20


def test_get_with_end_stream_is_one_request_event_and_the_response_reaches_the_client():
    pair = Pair()
    pair.handshake()
    stream_id, events = pair.request(GET + [("accept", "*/*")])
    assert len(events) == 1
    (request,) = events
    assert isinstance(request, h2.events.RequestReceived)
    assert request.stream_id == stream_id == 1
    assert request.headers == (*GET, ("accept", "*/*"))
    assert all(isinstance(name, str) and isinstance(value, str) for name, value in request.headers)
    assert request.stream_ended == h2.events.StreamEnded(stream_id=1)
    client_events = pair.respond(1, [(":status", "200"), ("content-type", "text/plain")], body=b"hello")
    (response,) = of_type(client_events, h2.events.ResponseReceived)
    assert response.headers == [(":status", "200"), ("content-type", "text/plain")]
    assert received_body(client_events, 1) == b"hello"
    assert of_type(client_events, h2.events.StreamEnded) == [h2.events.StreamEnded(stream_id=1)]
    # both halves closed: the stream is gone
    with pytest.raises(h2.exceptions.StreamClosedError):
        pair.server.local_flow_control_window(1)


def test_ending_a_stream_right_after_its_data_sets_end_stream_on_that_frame():
    client = RawClient()
    first = client.open(GET, end_stream=True)
    second = client.open(GET, end_stream=True)
    client.server.send_headers(first, [(":status", "200")])
    client.server.send_data(first, b"body")
    client.server.end_stream(first)
    assert [(f.type, f.flags, f.payload) for f in client.output()] == [(HEADERS, END_HEADERS, b"\x20\x88"), (DATA, END_STREAM, b"body")]
    # another frame in between, or the DATA already handed out: an empty END_STREAM frame
    client.server.send_headers(second, [(":status", "200")])
    client.server.send_data(second, b"a")
    client.server.data_to_send()
    client.server.end_stream(second)
    assert [(f.type, f.flags, f.payload) for f in client.output()] == [(DATA, END_STREAM, b"")]
    client.still_serves()


def test_post_body_in_several_data_frames_arrives_in_order_and_acknowledged_bytes_reopen_the_client_window():
    pair = Pair()
    pair.handshake()
    body = bytes(range(256)) * 192  # 49152 bytes: three full frames
    stream_id, events = pair.request(POST, body=body)
    data = of_type(events, h2.events.DataReceived)
    assert [len(event.data) for event in data] == [16_384] * 3
    assert b"".join(event.data for event in data) == body
    assert [event.stream_ended is not None for event in data] == [False, False, True]
    assert pair.client.outbound_flow_control_window == 65_535 - len(body)
    # the shell reads the body: the connection's credit goes back once half a window is read
    for event in data:
        pair.server.acknowledge_received_data(event.flow_controlled_length, stream_id)
    _, client_events = pair.pump()
    assert of_type(client_events, h2.events.WindowUpdated) == [h2.events.WindowUpdated(stream_id=0, delta=32_768)]
    assert pair.client.outbound_flow_control_window == 65_535 - 16_384
    # (the stream is closed on the client's side: no stream credit was sent for it)
    assert not any(f.type == WINDOW_UPDATE and f.stream_id for f in parse_frames(pair.server.data_to_send()))


def test_open_stream_windows_are_credited_back_in_half_window_batches():
    pair = Pair()
    pair.handshake()
    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_headers(stream_id, POST)
    for size in (16_000, 16_384, 1_000):
        pair.client.send_data(stream_id, b"x" * size)
    events, _ = pair.pump()
    first, second, third = of_type(events, h2.events.DataReceived)
    pair.server.acknowledge_received_data(first.flow_controlled_length, stream_id)
    pair.server.acknowledge_received_data(second.flow_controlled_length, stream_id)
    assert pair.server.data_to_send() == b""  # 32384 < half of 65535: not worth a frame yet
    pair.server.acknowledge_received_data(third.flow_controlled_length, stream_id)
    _, client_events = pair.pump()
    updates = sorted((event.stream_id, event.delta) for event in of_type(client_events, h2.events.WindowUpdated))
    assert updates == [(0, 33_384), (stream_id, 33_384)]
    assert pair.client.local_flow_control_window(stream_id) == 65_535


def test_response_larger_than_the_client_window_waits_for_window_update():
    pair = Pair(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 1_000})
    pair.handshake()
    stream_id, _ = pair.request(GET)
    pair.server.send_headers(stream_id, [(":status", "200")])
    assert pair.server.local_flow_control_window(stream_id) == 1_000
    pair.server.send_data(stream_id, b"a" * 1_000)
    assert pair.server.local_flow_control_window(stream_id) == 0
    with pytest.raises(h2.exceptions.FlowControlError):
        pair.server.send_data(stream_id, b"b")
    _, client_events = pair.pump()
    assert received_body(client_events, stream_id) == b"a" * 1_000
    pair.client.increment_flow_control_window(5_000, stream_id=stream_id)
    server_events, _ = pair.pump()
    assert server_events == [h2.events.WindowUpdated(stream_id=stream_id, delta=5_000)]
    assert pair.server.local_flow_control_window(stream_id) == 5_000
    pair.server.send_data(stream_id, b"b" * 5_000, end_stream=True)
    _, client_events = pair.pump()
    assert received_body(client_events, stream_id) == b"b" * 5_000
    assert of_type(client_events, h2.events.StreamEnded)


def test_response_is_limited_by_the_connection_window_too():
    pair = Pair(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 100_000})
    pair.handshake()
    stream_id, _ = pair.request(GET)
    pair.server.send_headers(stream_id, [(":status", "200")])
    assert pair.server.local_flow_control_window(stream_id) == 65_535  # the connection's, not the stream's
    for _ in range(3):
        pair.server.send_data(stream_id, b"z" * 16_384)
    assert pair.server.local_flow_control_window(stream_id) == 65_535 - 3 * 16_384
    pair.client.increment_flow_control_window(50_000)
    server_events, _ = pair.pump()
    assert h2.events.WindowUpdated(stream_id=0, delta=50_000) in server_events
    # now the stream's window (100000 - 49152) is the smaller one
    assert pair.server.local_flow_control_window(stream_id) == 100_000 - 3 * 16_384


def test_request_trailers_arrive_as_trailers_received_and_end_the_stream():
    pair = Pair()
    pair.handshake()
    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_headers(stream_id, POST + [("te", "trailers")])
    pair.client.send_data(stream_id, b"body")
    pair.client.send_headers(stream_id, [("grpc-status", "0"), ("x-checksum", "abc")], end_stream=True)
    events, _ = pair.pump()
    assert [type(event) for event in events] == [h2.events.RequestReceived, h2.events.DataReceived, h2.events.TrailersReceived]
    trailers = events[2]
    assert trailers.headers == (("grpc-status", "0"), ("x-checksum", "abc"))
    assert trailers.stream_ended == h2.events.StreamEnded(stream_id=stream_id)


def test_response_trailers_sent_with_send_headers_end_stream_reach_the_client():
    pair = Pair()
    pair.handshake()
    stream_id, _ = pair.request(GET)
    client_events = pair.respond(stream_id, [(":status", "200")], body=b"ok", trailers=[("grpc-status", "0")])
    (trailers,) = of_type(client_events, h2.events.TrailersReceived)
    assert trailers.headers == [("grpc-status", "0")]
    assert of_type(client_events, h2.events.StreamEnded) == [h2.events.StreamEnded(stream_id=stream_id)]
    with pytest.raises(h2.exceptions.StreamClosedError):
        pair.server.send_data(stream_id, b"late")


def test_response_head_larger_than_the_peer_frame_size_goes_out_as_headers_and_continuation():
    pair = Pair()
    pair.handshake()
    stream_id, _ = pair.request(GET)
    headers = [(":status", "200")] + [(f"x-big-{i}", chr(97 + i) * 10_000) for i in range(4)]
    pair.server.send_headers(stream_id, headers, end_stream=True)
    out = pair.server.data_to_send()
    frames = parse_frames(out)
    assert [f.type for f in frames] == [HEADERS, CONTINUATION, CONTINUATION]
    assert [f.flags & END_HEADERS for f in frames] == [0, 0, END_HEADERS]
    assert frames[0].flags & END_STREAM
    assert all(len(f.payload) <= 16_384 for f in frames)
    client_events = pair.client.receive_data(out)
    (response,) = of_type(client_events, h2.events.ResponseReceived)
    assert response.headers == headers
    assert of_type(client_events, h2.events.StreamEnded)


def test_client_raising_max_frame_size_lets_the_head_go_out_in_one_frame():
    pair = Pair()
    pair.handshake()
    pair.client.update_settings({SettingCodes.MAX_FRAME_SIZE: 65_536})
    pair.pump()
    assert pair.server.max_outbound_frame_size == 65_536
    stream_id, _ = pair.request(GET)
    headers = [(":status", "200"), ("x-big", "q" * 30_000)]
    pair.server.send_headers(stream_id, headers, end_stream=True)
    out = pair.server.data_to_send()
    assert [f.type for f in parse_frames(out)] == [HEADERS]
    (response,) = of_type(pair.client.receive_data(out), h2.events.ResponseReceived)
    assert response.headers == headers


def test_many_requests_on_one_connection_decode_right_while_the_client_dynamic_table_changes():
    pair = Pair()
    pair.handshake()
    paths = ["/", "/a", "/b", "/a", "/c", "/a", "/b"]
    for n in range(300):
        headers = [
            (":method", "GET" if n % 3 else "POST"),
            (":scheme", "https"),
            (":path", paths[n % len(paths)] if n % 11 else f"/new/{n}"),
            (":authority", "svc"),
            ("user-agent", "client/1"),
            ("x-request-id", str(n // 5)),  # a new value every 5 requests: the table churns
        ]
        stream_id, events = pair.request(headers)
        (request,) = events
        assert request.headers == tuple(headers), n
        pair.respond(stream_id)


def test_client_shrinking_its_table_mid_connection_keeps_decoding_right():
    pair = Pair()
    pair.handshake()
    for n, size in enumerate((4096, 4096, 100, 100, 0, 0, 4096, 4096, 4096)):
        pair.client.encoder.header_table_size = size
        headers = GET + [("x-a", "1" * 40), ("x-b", str(n // 2) * 40)]
        stream_id, events = pair.request(headers)
        assert events[0].headers == tuple(headers), size
        pair.respond(stream_id)


def test_client_changing_its_header_table_size_setting_still_decodes_our_responses():
    pair = Pair()
    pair.handshake()
    for size in (0, 256, 4096):
        pair.client.update_settings({SettingCodes.HEADER_TABLE_SIZE: size})
        pair.pump()
        stream_id, _ = pair.request(GET)
        pair.server.send_headers(stream_id, [(":status", "200"), ("server", "waypoint")], end_stream=True)
        out = pair.server.data_to_send()
        (headers_frame,) = parse_frames(out)
        assert headers_frame.payload[0] == 0x20  # a "dynamic table size 0" update opens the block
        (response,) = of_type(pair.client.receive_data(out), h2.events.ResponseReceived)
        assert response.headers == [(":status", "200"), ("server", "waypoint")]


def test_indexed_only_request_head_is_not_reused_after_the_table_was_rewritten_to_the_same_size_and_first_entry():
    # Every entry is 2000 bytes, so the client's 4096-byte table holds two. Request 3 pushes out
    # both entries and re-inserts the newest one, leaving [A, Y] where there was [A, B]: same
    # length, same first entry. Request 4 then uses the very bytes request 2 used (indexes 62,
    # 63), which must now mean x-a, x-y and not the x-a, x-b of request 2.
    client = RawClient()
    value = {name: name[-1] * 1965 for name in ("x-a", "x-b", "x-x", "x-y")}
    static = [(":method", "GET"), (":scheme", "https"), (":path", "/")]
    requests = [
        static + [("x-b", value["x-b"]), ("x-a", value["x-a"])],
        static + [("x-b", value["x-b"]), ("x-a", value["x-a"])],
        static + [("x-x", value["x-x"]), ("x-y", value["x-y"]), ("x-a", value["x-a"])],
        static + [("x-y", value["x-y"]), ("x-a", value["x-a"])],
    ]
    blocks = []
    for headers in requests:
        stream_id = client.next_stream_id
        blocks.append(client.block(headers))
        client.next_stream_id += 2
        (event,) = client.send(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, blocks[-1]))
        assert event.headers == tuple(headers)
    assert blocks[1] == blocks[3]  # the same bytes, meaning different fields


def test_repeated_indexed_only_heads_are_decoded_once():
    client = RawClient()
    for stream_id in (1, 3, 5, 7):
        (event,) = client.send(client.headers(stream_id, GET + [("x-a", "1")]))
        assert event.headers == (*GET, ("x-a", "1"))
    assert len(client.server._block_memo) == 1


def test_non_ascii_header_values_survive_both_ways_as_latin1_text():
    pair = Pair()
    pair.handshake()
    value = "caf\xe9 \xff\x80-\xa0x"
    _, events = pair.request([(n.encode(), v.encode()) for n, v in GET] + [(b"x-name", value.encode("latin-1"))])
    assert events[0].headers[-1] == ("x-name", value)
    client_events = pair.respond(1, [(":status", "200"), ("x-name", value), (b"x-raw", b"\xe9t\xe9")])
    (response,) = of_type(client_events, h2.events.ResponseReceived)
    assert response.headers == [(":status", "200"), ("x-name", value), ("x-raw", "\xe9t\xe9")]


def test_client_reset_is_reported_as_a_remote_stream_reset():
    pair = Pair()
    pair.handshake()
    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_headers(stream_id, POST)
    pair.pump()
    pair.client.reset_stream(stream_id, Codes.CANCEL)
    events, _ = pair.pump()
    assert events == [h2.events.StreamReset(stream_id=stream_id, error_code=Codes.CANCEL, remote_reset=True)]
    with pytest.raises(h2.exceptions.StreamClosedError):
        pair.server.send_headers(stream_id, [(":status", "200")])


def test_server_reset_reaches_the_client_as_a_stream_reset():
    pair = Pair()
    pair.handshake()
    stream_id, _ = pair.request(GET)
    pair.server.reset_stream(stream_id, Codes.REFUSED_STREAM)
    _, client_events = pair.pump()
    (reset,) = of_type(client_events, h2.events.StreamReset)
    assert (reset.stream_id, reset.error_code, reset.remote_reset) == (stream_id, Codes.REFUSED_STREAM, True)


def test_resetting_a_closed_or_unknown_stream_raises_stream_closed_error():
    pair = Pair()
    pair.handshake()
    stream_id, _ = pair.request(GET)
    pair.respond(stream_id)
    with pytest.raises(h2.exceptions.StreamClosedError):
        pair.server.reset_stream(stream_id)
    with pytest.raises(h2.exceptions.StreamClosedError):
        pair.server.reset_stream(99)
    other, _ = pair.request(GET)
    pair.server.reset_stream(other)
    with pytest.raises(h2.exceptions.StreamClosedError):
        pair.server.reset_stream(other)


def test_close_connection_tells_the_client_the_last_stream_served():
    pair = Pair()
    pair.handshake()
    pair.request(GET)
    pair.request(GET)
    pair.server.close_connection(Codes.NO_ERROR)
    _, client_events = pair.pump()
    (terminated,) = of_type(client_events, h2.events.ConnectionTerminated)
    assert (terminated.error_code, terminated.last_stream_id) == (Codes.NO_ERROR, 3)


def test_client_goaway_is_reported_as_connection_terminated():
    pair = Pair()
    pair.handshake()
    pair.request(GET)
    pair.client.close_connection(Codes.ENHANCE_YOUR_CALM, additional_data=b"bye", last_stream_id=0)
    events, _ = pair.pump()
    (terminated,) = events
    assert isinstance(terminated, h2.events.ConnectionTerminated)
    assert (terminated.error_code, terminated.last_stream_id, terminated.additional_data) == (Codes.ENHANCE_YOUR_CALM, 0, b"bye")


def test_ping_is_answered_with_an_ack_carrying_the_same_data():
    pair = Pair()
    pair.handshake()
    pair.client.ping(b"8 bytes!")
    server_events, client_events = pair.pump()
    assert server_events == []
    assert [(type(e), e.ping_data) for e in client_events] == [(h2.events.PingAckReceived, b"8 bytes!")]


def test_client_initial_window_size_change_adjusts_open_stream_windows_and_wakes_senders():
    pair = Pair()
    pair.handshake()
    stream_id, _ = pair.request(GET)
    pair.server.send_headers(stream_id, [(":status", "200")])
    pair.server.send_data(stream_id, b"x" * 10_000)
    pair.pump()
    assert pair.server.local_flow_control_window(stream_id) == 55_535
    pair.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 5_000})
    events, _ = pair.pump()
    assert of_type(events, h2.events.WindowUpdated) == []  # it shrank: nobody to wake
    assert pair.server.local_flow_control_window(stream_id) == -5_000
    pair.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 20_000})
    events, _ = pair.pump()
    assert events == [h2.events.WindowUpdated(stream_id=0, delta=15_000)]
    assert pair.server.local_flow_control_window(stream_id) == 10_000
    # and new streams start from the new value
    other, _ = pair.request(GET)
    assert pair.server.local_flow_control_window(other) == 20_000


# ===================== 2. raw frames no conforming client sends =====================

# --- preface and framing ---


def test_a_preface_delivered_byte_by_byte_is_accepted():
    conn = server()
    conn.initiate_connection()
    for byte in PREFACE + settings_frame():
        assert conn.receive_data(bytes((byte,))) == []
    assert [(f.type, f.flags) for f in parse_frames(conn.data_to_send())] == [(SETTINGS, 0), (SETTINGS, ACK)]


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", b"PRX"])
def test_a_bad_preface_is_a_protocol_error(data):
    conn = server()
    with pytest.raises(h2.exceptions.ProtocolError) as info:
        conn.receive_data(data)
    assert info.value.error_code == Codes.PROTOCOL_ERROR
    assert [(f.type, f.code) for f in parse_frames(conn.data_to_send())] == [(GOAWAY, Codes.PROTOCOL_ERROR)]
    assert conn.receive_data(PREFACE) == []


@pytest.mark.parametrize("first", [frame(PING, 0, 0, b"12345678"), settings_frame(flags=ACK), frame(HEADERS, END_HEADERS, 1, b"\x82")])
def test_the_first_frame_after_the_preface_must_be_settings(first):
    conn = server()
    with pytest.raises(h2.exceptions.ProtocolError) as info:
        conn.receive_data(PREFACE + first)
    assert info.value.error_code == Codes.PROTOCOL_ERROR
    assert [(f.type, f.code) for f in parse_frames(conn.data_to_send())] == [(GOAWAY, Codes.PROTOCOL_ERROR)]


def test_a_frame_longer_than_16384_is_a_frame_size_error_before_its_payload_arrives():
    client = RawClient()
    expect_connection_error(client, struct.pack(">BHBBL", 0, 16_385, DATA, 0, 1), Codes.FRAME_SIZE_ERROR)


def test_a_frame_of_exactly_16384_is_accepted():
    client = RawClient()
    stream_id = client.open(POST)
    (event,) = client.send(frame(DATA, 0, stream_id, b"d" * 16_384))
    assert event.data == b"d" * 16_384


def test_unknown_frame_types_are_ignored():
    client = RawClient()
    assert client.send(frame(0xFA, 0xFF, 0, b"whatever"), frame(0x10, 0, 7, b"")) == []
    assert client.output() == []
    client.still_serves()


# --- header blocks ---


@pytest.mark.parametrize("stream_id", [0, 2])
def test_headers_on_stream_0_or_an_even_stream_are_a_protocol_error(stream_id):
    client = RawClient()
    expect_connection_error(client, client.headers(stream_id), Codes.PROTOCOL_ERROR)


def test_a_header_block_split_into_continuation_frames_is_one_request():
    client = RawClient()
    block = client.block(GET + [("x-long", "v" * 100)])
    pieces = [block[:10], block[10:20], block[20:], b""]
    events = client.send(
        frame(HEADERS, END_STREAM, 1, pieces[0]),
        frame(CONTINUATION, 0, 1, pieces[1]),
        frame(CONTINUATION, 0, 1, pieces[2]),
        frame(CONTINUATION, END_HEADERS, 1, pieces[3]),
    )
    assert [type(e) for e in events] == [h2.events.RequestReceived]
    assert events[0].headers == (*GET, ("x-long", "v" * 100))
    assert events[0].stream_ended is not None


@pytest.mark.parametrize(
    "interruption",
    [frame(PING, 0, 0, b"12345678"), frame(CONTINUATION, END_HEADERS, 3, b""), frame(HEADERS, END_HEADERS, 3, b"\x82"), frame(0xFA, 0, 0, b"")],
)
def test_a_header_block_interrupted_by_another_frame_is_a_protocol_error(interruption):
    client = RawClient()
    block = client.block(GET)
    expect_connection_error(client, frame(HEADERS, END_STREAM, 1, block[:2]) + interruption, Codes.PROTOCOL_ERROR)


def test_continuation_without_a_header_block_is_a_protocol_error():
    client = RawClient()
    expect_connection_error(client, frame(CONTINUATION, END_HEADERS, 1, client.block(GET)), Codes.PROTOCOL_ERROR)


def test_a_header_block_in_exactly_the_allowed_number_of_fragments_is_accepted():
    client = RawClient()
    block = client.block(GET)
    frames = [frame(HEADERS, END_STREAM, 1, block)] + [frame(CONTINUATION, 0, 1, b"")] * (MAX_HEADER_FRAGMENTS - 2)
    frames.append(frame(CONTINUATION, END_HEADERS, 1, b""))
    assert [type(e) for e in client.send(*frames)] == [h2.events.RequestReceived]


def test_a_header_block_in_too_many_continuation_frames_is_enhance_your_calm():
    client = RawClient()
    frames = [frame(HEADERS, END_STREAM, 1, client.block(GET))] + [frame(CONTINUATION, 0, 1, b"")] * MAX_HEADER_FRAGMENTS
    expect_connection_error(client, b"".join(frames), Codes.ENHANCE_YOUR_CALM)


def test_a_header_block_larger_than_the_header_list_limit_is_enhance_your_calm():
    client = RawClient(max_header_list_size=1_000)
    expect_connection_error(client, frame(HEADERS, END_STREAM, 1, b"\x82" * 900) + frame(CONTINUATION, END_HEADERS, 1, b"\x82" * 200), Codes.ENHANCE_YOUR_CALM)


def test_a_header_list_that_decodes_larger_than_the_limit_is_enhance_your_calm():
    client = RawClient(max_header_list_size=1_000)
    expect_connection_error(client, client.headers(1, GET + [("x-big", "b" * 1_000)]), Codes.ENHANCE_YOUR_CALM)


@pytest.mark.parametrize(
    "block",
    [
        b"\x80",  # index 0
        b"\xbe",  # index 62 with an empty dynamic table
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f",  # an integer too long
        b"\x40\x05ab",  # a literal shorter than its length
        b"\x82\x3f\xe1\x7f",  # a table size update above 4096, and not at the start
        b"\x00\x81\xff\x01a",  # huffman string with an EOS / bad padding
    ],
)
def test_an_undecodable_hpack_block_is_a_compression_error(block):
    client = RawClient()
    expect_connection_error(client, frame(HEADERS, END_HEADERS | END_STREAM, 1, block), Codes.COMPRESSION_ERROR)


MALFORMED_REQUESTS = {
    "uppercase name": GET + [("X-Upper", "1")],
    "name with a space": GET + [("x y", "1")],
    "name with a colon inside": GET + [("x:y", "1")],
    "empty name": GET + [("", "1")],
    "connection": GET + [("connection", "close")],
    "keep-alive": GET + [("keep-alive", "timeout=5")],
    "proxy-connection": GET + [("proxy-connection", "keep-alive")],
    "transfer-encoding": POST + [("transfer-encoding", "chunked")],
    "upgrade": GET + [("upgrade", "websocket")],
    "te other than trailers": GET + [("te", "gzip")],
    "pseudo-header after a regular one": [(":method", "GET"), (":scheme", "https"), ("x-a", "1"), (":path", "/")],
    "unknown pseudo-header": [(":foo", "bar")] + GET,
    ":status in a request": [(":status", "200")] + GET,
    "duplicate :path": GET[:3] + [(":path", "/again")] + GET[3:],
    "duplicate :method": [(":method", "GET")] + GET,
    "missing :method": GET[1:],
    "missing :scheme": [GET[0]] + GET[2:],
    "missing :path": GET[:2] + GET[3:],
    "empty :path": [(":method", "GET"), (":scheme", "https"), (":path", "")],
    "CONNECT with :path": [(":method", "CONNECT"), (":authority", "svc:443"), (":path", "/")],
    "CONNECT without :authority": [(":method", "CONNECT")],
    "value with CR": GET + [("x-a", "a\rb")],
    "value with LF": GET + [("x-a", "a\nb")],
    "value with NUL": GET + [("x-a", "a\0b")],
    "value with a leading space": GET + [("x-a", " a")],
    "value with a trailing space": GET + [("x-a", "a ")],
    "value with a leading tab": GET + [("x-a", "\ta")],
    "value with a trailing tab": GET + [("x-a", "a\t")],
    "pseudo value with CR": [(":method", "GET"), (":scheme", "https"), (":path", "/\r\nx")],
    "content-length not a number": POST + [("content-length", "abc")],
    "content-length negative": POST + [("content-length", "-1")],
    "content-length with a sign": POST + [("content-length", "+5")],
    "content-length empty": POST + [("content-length", "")],
    "content-length non-ASCII digits": POST + [("content-length", "\xb2")],
    "content-length twice, different": POST + [("content-length", "1"), ("content-length", "2")],
}


@pytest.mark.parametrize("headers", list(MALFORMED_REQUESTS.values()), ids=list(MALFORMED_REQUESTS))
def test_a_malformed_request_costs_its_stream_only(headers):
    client = RawClient()
    events = expect_stream_error(client, client.headers(1, headers), 1, Codes.PROTOCOL_ERROR, was_open=False)
    assert of_type(events, h2.events.RequestReceived) == []


@pytest.mark.parametrize(
    "headers",
    [
        GET + [("te", "trailers")],
        POST + [("content-length", "0"), ("content-length", "0")],
        [(":method", "CONNECT"), (":authority", "svc:443")],
        GET + [("x-a", ""), ("x-b", "a b\tc"), ("x-c", "\x7f\x80\xff")],
        [(":path", "/"), (":method", "OPTIONS"), (":scheme", "http")],
    ],
)
def test_unusual_but_valid_requests_are_accepted(headers):
    client = RawClient()
    (event,) = client.send(client.headers(1, headers))
    assert event.headers == tuple(headers)


def test_a_malformed_request_keeps_the_hpack_table_in_sync():
    client = RawClient()
    expect_stream_error(client, client.headers(1, GET + [("x-new", "value"), ("X-Bad", "1")]), 1, Codes.PROTOCOL_ERROR, was_open=False)
    (event,) = client.send(client.headers(client.next_stream_id, GET + [("x-new", "value")]))
    assert event.headers == (*GET, ("x-new", "value"))


def test_trailers_without_end_stream_are_a_stream_error():
    client = RawClient()
    stream_id = client.open(POST)
    expect_stream_error(client, client.headers(stream_id, [("x-t", "1")], end_stream=False), stream_id, Codes.PROTOCOL_ERROR, was_open=True)


def test_trailers_with_a_pseudo_header_are_a_stream_error():
    client = RawClient()
    stream_id = client.open(POST)
    expect_stream_error(client, client.headers(stream_id, [(":path", "/")]), stream_id, Codes.PROTOCOL_ERROR, was_open=True)


def test_trailers_with_a_malformed_field_are_a_stream_error():
    client = RawClient()
    stream_id = client.open(POST)
    expect_stream_error(client, client.headers(stream_id, [("Upper", "1")]), stream_id, Codes.PROTOCOL_ERROR, was_open=True)


def test_headers_after_the_client_ended_the_stream_are_stream_closed():
    client = RawClient()
    stream_id = client.open(GET, end_stream=True)
    expect_stream_error(client, client.headers(stream_id, [("x-t", "1")]), stream_id, Codes.STREAM_CLOSED, was_open=True)


def test_padded_headers_are_accepted_and_the_padding_dropped():
    client = RawClient()
    (event,) = client.send(frame(HEADERS, END_HEADERS | END_STREAM | PADDED, 1, padded(client.block(GET), 10)))
    assert event.headers == tuple(GET)


def test_headers_with_priority_fields_are_accepted():
    client = RawClient()
    priority = struct.pack(">LB", 0x80000000, 15)  # exclusive on stream 0, weight 16
    (event,) = client.send(frame(HEADERS, END_HEADERS | END_STREAM | PRIORITY_FLAG | PADDED, 1, padded(priority + client.block(GET), 3)))
    assert event.headers == tuple(GET)


@pytest.mark.parametrize("payload", [b"", b"\x04abc", b"\x01"])
def test_headers_padding_as_long_as_the_frame_is_a_protocol_error(payload):
    client = RawClient()
    expect_connection_error(client, frame(HEADERS, END_HEADERS | END_STREAM | PADDED, 1, payload), Codes.PROTOCOL_ERROR)


def test_headers_too_short_for_its_priority_fields_is_a_frame_size_error():
    client = RawClient()
    expect_connection_error(client, frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, b"\x00\x00"), Codes.FRAME_SIZE_ERROR)


def test_more_streams_than_allowed_are_refused_and_a_finished_one_frees_a_place():
    client = RawClient(max_concurrent_streams=2)
    client.open(POST)
    client.open(POST)
    assert client.send(client.headers(5)) == []
    assert [(f.type, f.stream_id, f.code) for f in client.output()] == [(RST_STREAM, 5, Codes.REFUSED_STREAM)]
    client.send(frame(DATA, END_STREAM, 1, b""))
    client.server.send_headers(1, [(":status", "200")], end_stream=True)
    client.output()
    assert [type(e) for e in client.send(client.headers(7))] == [h2.events.RequestReceived]


def test_headers_for_a_reset_stream_are_ignored_but_their_hpack_block_still_decoded():
    client = RawClient()
    stream_id = client.open(POST)
    client.server.reset_stream(stream_id, Codes.CANCEL)
    client.output()
    # the client had trailers in flight that insert a field into the shared table...
    assert client.send(client.headers(stream_id, [("x-inserted", "by-the-trailers")])) == []
    assert client.output() == []
    # ...and the next request refers to it by index only
    block = client.block(GET + [("x-inserted", "by-the-trailers")])
    assert block[-1] == 0x80 | 62
    (event,) = client.send(frame(HEADERS, END_HEADERS | END_STREAM, 3, block))
    assert event.headers == (*GET, ("x-inserted", "by-the-trailers"))


def test_headers_for_a_refused_stream_id_below_the_highest_are_ignored_but_decoded():
    client = RawClient(max_concurrent_streams=1)
    client.open(POST)
    assert client.send(client.headers(3, GET + [("x-one", "1")])) == []  # refused
    assert [f.code for f in client.output()] == [Codes.REFUSED_STREAM]
    assert client.send(client.headers(3, [("x-two", "2")])) == []  # ignored
    assert client.output() == []
    client.send(frame(DATA, END_STREAM, 1, b""))
    client.server.send_headers(1, [(":status", "204")], end_stream=True)
    client.output()
    (event,) = client.send(client.headers(5, GET + [("x-one", "1"), ("x-two", "2")]))
    assert event.headers == (*GET, ("x-one", "1"), ("x-two", "2"))


def test_headers_on_a_stream_that_ended_normally_are_a_stream_closed_connection_error():
    client = RawClient()
    stream_id = client.open(GET, end_stream=True)
    client.server.send_headers(stream_id, [(":status", "204")], end_stream=True)
    client.output()
    # a client reusing a finished stream would otherwise wait forever for an answer
    expect_connection_error(client, client.headers(stream_id), Codes.STREAM_CLOSED)


def test_headers_on_a_skipped_stream_id_are_a_connection_error():
    client = RawClient()
    client.send(client.headers(5))  # opening 5 closes 1 and 3 (RFC 9113 §5.1.1)
    expect_connection_error(client, client.headers(3), Codes.STREAM_CLOSED)


def test_the_header_list_limit_is_advertised():
    connection = server(max_header_list_size=12_345)
    connection.initiate_connection()
    (settings,) = [f for f in parse_frames(connection.data_to_send()) if f.type == SETTINGS]
    pairs = dict(struct.iter_unpack(">HL", settings.payload))
    assert pairs[SettingCodes.MAX_HEADER_LIST_SIZE] == 12_345


# --- DATA ---


def test_data_on_stream_0_is_a_protocol_error():
    client = RawClient()
    expect_connection_error(client, frame(DATA, 0, 0, b"x"), Codes.PROTOCOL_ERROR)


def test_data_on_an_idle_stream_is_a_protocol_error():
    client = RawClient()
    client.open(POST)
    expect_connection_error(client, frame(DATA, 0, 5, b"x"), Codes.PROTOCOL_ERROR)


def test_data_beyond_the_connection_window_is_a_flow_control_error():
    client = RawClient(stream_window=1 << 20)
    stream_id = client.open(POST)
    chunk = frame(DATA, 0, stream_id, b"x" * 16_383)
    assert len(client.send(chunk * 4, frame(DATA, 0, stream_id, b"xxx"))) == 5  # exactly 65535
    expect_connection_error(client, frame(DATA, 0, stream_id, b"x"), Codes.FLOW_CONTROL_ERROR)


def test_data_beyond_a_stream_window_resets_the_stream_and_credits_the_connection():
    client = RawClient(stream_window=1_000)
    stream_id = client.open(POST)
    expect_stream_error(client, frame(DATA, 0, stream_id, b"x" * 1_001), stream_id, Codes.FLOW_CONTROL_ERROR, was_open=True)
    # the refused bytes were given back to the connection: a full window still fits after them
    other = client.open(POST)
    for _ in range(64):
        events = client.send(frame(DATA, 0, other, b"y" * 1_000))
        assert [type(e) for e in events] == [h2.events.DataReceived]
        client.server.acknowledge_received_data(1_000, other)


def test_data_after_the_client_ended_the_stream_is_stream_closed():
    client = RawClient()
    stream_id = client.open(GET, end_stream=True)
    expect_stream_error(client, frame(DATA, 0, stream_id, b"late"), stream_id, Codes.STREAM_CLOSED, was_open=True)


def test_data_for_a_stream_the_server_reset_is_dropped_and_credited_back():
    client = RawClient()
    stream_id = client.open(POST)
    client.server.reset_stream(stream_id)
    client.output()
    assert client.send(frame(DATA, 0, stream_id, b"x" * 16_384) * 2) == []
    frames = client.output()
    assert [(f.type, f.stream_id, struct.unpack(">L", f.payload)[0]) for f in frames] == [(WINDOW_UPDATE, 0, 32_768)]


def test_padded_data_delivers_the_data_but_counts_the_padding_toward_flow_control():
    client = RawClient()
    stream_id = client.open(POST)
    (event,) = client.send(frame(DATA, PADDED, stream_id, padded(b"payload", 20)))
    assert (event.data, event.flow_controlled_length) == (b"payload", 1 + 7 + 20)
    client.server.send_headers(stream_id, [(":status", "200")])
    assert client.server.local_flow_control_window(stream_id) == 65_535  # our send window is untouched


@pytest.mark.parametrize("payload", [b"", b"\x05abc", b"\x01"])
def test_data_padding_as_long_as_the_frame_is_a_protocol_error(payload):
    client = RawClient()
    stream_id = client.open(POST)
    expect_connection_error(client, frame(DATA, PADDED, stream_id, payload), Codes.PROTOCOL_ERROR)


def test_padding_only_data_delivers_nothing_and_is_credited_at_once():
    client = RawClient(connection_window=20)
    stream_id = client.open(POST)
    assert client.send(frame(DATA, PADDED, stream_id, padded(b"", 30))) == []
    assert [(f.type, f.stream_id) for f in client.output()] == [(WINDOW_UPDATE, 0)]


def test_empty_data_with_end_stream_is_a_stream_ended_event_not_data():
    client = RawClient()
    stream_id = client.open(POST)
    assert client.send(frame(DATA, END_STREAM, stream_id, b"")) == [h2.events.StreamEnded(stream_id=stream_id)]


def test_a_body_matching_content_length_is_accepted():
    client = RawClient()
    stream_id = client.open(POST + [("content-length", "6")])
    events = client.send(frame(DATA, 0, stream_id, b"abc"), frame(DATA, END_STREAM, stream_id, b"def"))
    assert [e.data for e in events] == [b"abc", b"def"]
    assert events[1].stream_ended is not None


def test_a_body_longer_than_content_length_is_a_stream_error():
    client = RawClient()
    stream_id = client.open(POST + [("content-length", "3")])
    expect_stream_error(client, frame(DATA, 0, stream_id, b"abcd"), stream_id, Codes.PROTOCOL_ERROR, was_open=True)


def test_a_body_shorter_than_content_length_is_a_stream_error():
    client = RawClient()
    stream_id = client.open(POST + [("content-length", "5")])
    expect_stream_error(client, frame(DATA, END_STREAM, stream_id, b"abc"), stream_id, Codes.PROTOCOL_ERROR, was_open=True)


def test_a_request_ending_with_its_head_despite_a_content_length_is_a_stream_error():
    client = RawClient()
    events = expect_stream_error(client, client.headers(1, POST + [("content-length", "5")]), 1, Codes.PROTOCOL_ERROR, was_open=False)
    assert of_type(events, h2.events.RequestReceived) == []


def test_a_body_ended_by_trailers_short_of_content_length_is_a_stream_error():
    client = RawClient()
    stream_id = client.open(POST + [("content-length", "5")])
    assert len(client.send(frame(DATA, 0, stream_id, b"abc"))) == 1
    expect_stream_error(client, client.headers(stream_id, [("x-t", "1")]), stream_id, Codes.PROTOCOL_ERROR, was_open=True)


def test_a_body_ended_by_trailers_matching_content_length_is_accepted():
    client = RawClient()
    stream_id = client.open(POST + [("content-length", "3")])
    events = client.send(frame(DATA, 0, stream_id, b"abc"), client.headers(stream_id, [("x-t", "1")]))
    assert [type(e) for e in events] == [h2.events.DataReceived, h2.events.TrailersReceived]


# --- WINDOW_UPDATE, RST_STREAM, PING, SETTINGS, GOAWAY, PUSH_PROMISE, PRIORITY ---


def test_window_update_of_zero_on_the_connection_is_a_protocol_error():
    client = RawClient()
    expect_connection_error(client, window_update(0, 0), Codes.PROTOCOL_ERROR)


def test_window_update_of_zero_on_a_stream_is_a_stream_error():
    client = RawClient()
    stream_id = client.open(POST)
    expect_stream_error(client, window_update(stream_id, 0), stream_id, Codes.PROTOCOL_ERROR, was_open=True)


def test_connection_window_past_2_31_minus_1_is_a_flow_control_error():
    client = RawClient()
    assert client.send(window_update(0, 2**31 - 1 - 65_535)) == [h2.events.WindowUpdated(stream_id=0, delta=2**31 - 1 - 65_535)]
    expect_connection_error(client, window_update(0, 1), Codes.FLOW_CONTROL_ERROR)


def test_stream_window_past_2_31_minus_1_is_a_stream_error():
    client = RawClient()
    stream_id = client.open(POST)
    expect_stream_error(client, window_update(stream_id, 2**31 - 1), stream_id, Codes.FLOW_CONTROL_ERROR, was_open=True)


@pytest.mark.parametrize("payload", [b"\0\0\1", b"\0\0\0\1\0"])
def test_window_update_of_the_wrong_length_is_a_frame_size_error(payload):
    client = RawClient()
    expect_connection_error(client, frame(WINDOW_UPDATE, 0, 0, payload), Codes.FRAME_SIZE_ERROR)


def test_window_update_on_an_idle_stream_is_a_protocol_error():
    client = RawClient()
    expect_connection_error(client, window_update(9, 100), Codes.PROTOCOL_ERROR)


def test_window_update_on_a_closed_stream_is_ignored():
    client = RawClient()
    stream_id = client.open(GET, end_stream=True)
    client.server.send_headers(stream_id, [(":status", "200")], end_stream=True)
    client.output()
    assert client.send(window_update(stream_id, 100)) == []
    assert client.output() == []


def test_window_update_reserved_bit_is_ignored():
    client = RawClient()
    assert client.send(window_update(0, 0x80000000 | 10)) == [h2.events.WindowUpdated(stream_id=0, delta=10)]


@pytest.mark.parametrize(
    ("data", "code"),
    [(rst_stream(0, 0), Codes.PROTOCOL_ERROR), (rst_stream(7, 0), Codes.PROTOCOL_ERROR), (frame(RST_STREAM, 0, 1, b"\0\0\0"), Codes.FRAME_SIZE_ERROR)],
    ids=["on stream 0", "on an idle stream", "3 bytes"],
)
def test_bad_rst_stream_is_a_connection_error(data, code):
    client = RawClient()
    client.open(POST)
    expect_connection_error(client, data, code)


def test_rst_stream_with_an_unknown_code_keeps_the_number():
    client = RawClient()
    stream_id = client.open(POST)
    assert client.send(rst_stream(stream_id, 0x1234)) == [h2.events.StreamReset(stream_id=stream_id, error_code=0x1234, remote_reset=True)]
    assert client.send(rst_stream(stream_id, Codes.CANCEL)) == []  # already closed: nothing more
    client.still_serves()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(PING, 0, 0, b"1234567"), Codes.FRAME_SIZE_ERROR),
        (frame(PING, 0, 0, b"123456789"), Codes.FRAME_SIZE_ERROR),
        (frame(PING, 0, 1, b"12345678"), Codes.PROTOCOL_ERROR),
    ],
    ids=["7 bytes", "9 bytes", "on a stream"],
)
def test_bad_ping_is_a_connection_error(data, code):
    client = RawClient()
    expect_connection_error(client, data, code)


def test_ping_ack_from_the_client_is_not_answered():
    client = RawClient()
    assert client.send(frame(PING, ACK, 0, b"12345678")) == []
    assert client.output() == []


def test_a_flood_of_pings_nobody_reads_the_answers_to_is_enhance_your_calm():
    client = RawClient()
    ping = frame(PING, 0, 0, b"12345678")
    assert client.send(ping * MAX_PENDING_CONTROL_FRAMES) == []
    expect_connection_error(client, ping, Codes.ENHANCE_YOUR_CALM)


def test_pings_whose_answers_are_read_are_not_a_flood():
    client = RawClient()
    ping = frame(PING, 0, 0, b"12345678")
    for _ in range(3):
        client.send(ping * MAX_PENDING_CONTROL_FRAMES)
        assert len(client.output()) == MAX_PENDING_CONTROL_FRAMES
    client.still_serves()


def test_a_flood_of_settings_is_enhance_your_calm():
    client = RawClient()
    client.send(settings_frame() * MAX_PENDING_CONTROL_FRAMES)
    expect_connection_error(client, settings_frame(), Codes.ENHANCE_YOUR_CALM)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (settings_frame(stream_id=1), Codes.PROTOCOL_ERROR),
        (frame(SETTINGS, ACK, 0, b"\0\0\0\0\0\0"), Codes.FRAME_SIZE_ERROR),
        (frame(SETTINGS, 0, 0, b"\0\4\0\0\0"), Codes.FRAME_SIZE_ERROR),
        (settings_frame((SettingCodes.ENABLE_PUSH, 2)), Codes.PROTOCOL_ERROR),
        (settings_frame((SettingCodes.MAX_FRAME_SIZE, 16_383)), Codes.PROTOCOL_ERROR),
        (settings_frame((SettingCodes.MAX_FRAME_SIZE, 2**24)), Codes.PROTOCOL_ERROR),
        (settings_frame((SettingCodes.INITIAL_WINDOW_SIZE, 2**31)), Codes.FLOW_CONTROL_ERROR),
    ],
    ids=[
        "on a stream",
        "ack with payload",
        "length not a multiple of 6",
        "enable_push 2",
        "max_frame_size too small",
        "max_frame_size too large",
        "initial_window_size too large",
    ],
)
def test_bad_settings_are_a_connection_error(data, code):
    client = RawClient()
    expect_connection_error(client, data, code)


def test_settings_with_unknown_and_boundary_values_are_acknowledged():
    client = RawClient()
    events = client.send(
        settings_frame(
            (0xFF, 7),
            (SettingCodes.ENABLE_PUSH, 1),
            (SettingCodes.MAX_FRAME_SIZE, 2**24 - 1),
            (SettingCodes.INITIAL_WINDOW_SIZE, 2**31 - 1),
        )
    )
    assert events == [h2.events.WindowUpdated(stream_id=0, delta=2**31 - 1 - 65_535)]
    assert [(f.type, f.flags) for f in client.output()] == [(SETTINGS, ACK)]
    assert client.server.max_outbound_frame_size == 2**24 - 1


def test_initial_window_size_that_overflows_an_open_stream_window_is_a_flow_control_error():
    client = RawClient()
    stream_id = client.open(POST)
    client.send(window_update(stream_id, 2**31 - 1 - 65_535))
    expect_connection_error(client, settings_frame((SettingCodes.INITIAL_WINDOW_SIZE, 65_536)), Codes.FLOW_CONTROL_ERROR)


def test_push_promise_from_a_client_is_a_protocol_error():
    client = RawClient()
    stream_id = client.open(POST)
    expect_connection_error(client, frame(PUSH_PROMISE, END_HEADERS, stream_id, struct.pack(">L", 2) + client.block(GET)), Codes.PROTOCOL_ERROR)


@pytest.mark.parametrize(("data", "code"), [(frame(GOAWAY, 0, 1, b"\0" * 8), Codes.PROTOCOL_ERROR), (frame(GOAWAY, 0, 0, b"\0" * 7), Codes.FRAME_SIZE_ERROR)])
def test_bad_goaway_is_a_connection_error(data, code):
    client = RawClient()
    expect_connection_error(client, data, code)


def test_priority_is_accepted_and_ignored_on_any_stream():
    client = RawClient()
    stream_id = client.open(POST)
    assert client.send(frame(PRIORITY, 0, stream_id, b"\0\0\0\0\x10"), frame(PRIORITY, 0, 11, b"\0\0\0\1\x10")) == []
    assert client.output() == []
    client.still_serves()


def test_priority_of_the_wrong_length_is_a_stream_error():
    client = RawClient()
    stream_id = client.open(POST)
    expect_stream_error(client, frame(PRIORITY, 0, stream_id, b"\0\0\0\0"), stream_id, Codes.FRAME_SIZE_ERROR, was_open=True)


def test_priority_of_the_wrong_length_on_an_idle_stream_is_a_connection_error():
    # a stream error would need a RST_STREAM naming an idle stream, which the RFC forbids
    client = RawClient()
    expect_connection_error(client, frame(PRIORITY, 0, 9, b"\0\0\0\0"), Codes.FRAME_SIZE_ERROR)


def test_a_stream_depending_on_itself_is_a_stream_error():
    client = RawClient()
    stream_id = client.open(POST)
    expect_stream_error(client, frame(PRIORITY, 0, stream_id, struct.pack(">LB", stream_id, 16)), stream_id, Codes.PROTOCOL_ERROR, was_open=True)


def test_a_request_whose_priority_names_itself_is_refused_and_its_head_still_decoded():
    client = RawClient()
    block = client.block(GET + [("x-only-in-this-block", "1")])  # inserts into the client's table
    assert client.send(frame(HEADERS, END_HEADERS | END_STREAM | PRIORITY_FLAG, 1, struct.pack(">LB", 1, 16) + block)) == []
    assert [(f.type, f.stream_id, f.code) for f in client.output()] == [(RST_STREAM, 1, Codes.PROTOCOL_ERROR)]
    (event,) = client.send(client.headers(3, GET + [("x-only-in-this-block", "1")]))
    assert event.headers == (*GET, ("x-only-in-this-block", "1"))


def test_priority_on_stream_0_is_a_protocol_error():
    client = RawClient()
    expect_connection_error(client, frame(PRIORITY, 0, 0, b"\0\0\0\1\x10"), Codes.PROTOCOL_ERROR)


def test_frames_after_a_connection_error_are_not_read():
    client = RawClient()
    stream_id = client.open(POST)
    with pytest.raises(h2.exceptions.ProtocolError):
        client.send(frame(DATA, 0, 0, b"x"), frame(DATA, 0, stream_id, b"never seen"))
    assert client.send(frame(DATA, 0, stream_id, b"nor this")) == []
    client.server.acknowledge_received_data(100_000, stream_id)
    assert [f.type for f in client.output()] == [GOAWAY]


# ===================== 3. properties =====================

NAMES = ["accept", "user-agent", "x-request-id", "content-type", "x-b3-traceid", "grpc-timeout"]
TEXT = st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\x00\r\n", exclude_categories=()), max_size=20)


@st.composite
def header_values(draw) -> str:
    value = draw(st.sampled_from(["", "a", "application/grpc", "caf\xe9", "1", "*/*"]) | TEXT)
    return value.strip(" \t")


@st.composite
def requests(draw) -> dict:
    fields = draw(st.lists(st.tuples(st.sampled_from(NAMES) | st.from_regex(r"x-[a-z0-9-]{1,8}", fullmatch=True), header_values()), max_size=6))
    body = draw(st.binary(max_size=3_000) | st.just(b""))
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    path = draw(st.sampled_from(["/", "/a", "/a/b?x=1", "/api/v1/items"]) | st.from_regex(r"/[a-z0-9/%?=&.-]{0,20}", fullmatch=True))
    head = [(":method", method), (":scheme", "https"), (":path", path), (":authority", draw(st.sampled_from(["svc", "svc.ns:8080"])))]
    if body and draw(st.booleans()):
        fields.append(("content-length", str(len(body))))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
    trailers = draw(st.lists(st.tuples(st.from_regex(r"x-t[a-z]{0,4}", fullmatch=True), header_values()), max_size=2))
    return {"head": head + fields, "chunks": chunks, "trailers": trailers}


def client_bytes(data, reqs: list[dict]) -> bytes:
    """What an h2 client writes for these requests, their frames interleaved at random."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="latin-1"))
    client.initiate_connection()
    plans = []
    for req in reqs:
        steps = [("head", req["head"])]
        steps += [("data", chunk) for chunk in req["chunks"]]
        steps.append(("trailers", req["trailers"]) if req["trailers"] else ("end", None))
        plans.append(steps)
    stream_ids = {}
    while any(plans):
        index = data.draw(st.sampled_from([i for i, steps in enumerate(plans) if steps]))
        kind, value = plans[index].pop(0)
        last = not plans[index]
        if kind == "head":
            stream_ids[index] = client.get_next_available_stream_id()
            client.send_headers(stream_ids[index], value, end_stream=last)
        elif kind == "data":
            client.send_data(stream_ids[index], value, end_stream=last)
        elif kind == "trailers":
            client.send_headers(stream_ids[index], value, end_stream=True)
        else:
            client.end_stream(stream_ids[index])
    return client.data_to_send()


def normalized(events: list) -> list[tuple]:
    """Request events in a comparable form: h2 reports the end of a stream as a separate event,
    we (also) as `stream_ended` on the event that ended it."""
    out: list[tuple] = []
    for event in events:
        if isinstance(event, h2.events.RequestReceived):
            out.append(("request", event.stream_id, [tuple(h) for h in event.headers]))
        elif isinstance(event, h2.events.DataReceived):
            if event.data:
                out.append(("data", event.stream_id, bytes(event.data), event.flow_controlled_length))
        elif isinstance(event, h2.events.TrailersReceived):
            out.append(("trailers", event.stream_id, [tuple(h) for h in event.headers]))
        elif isinstance(event, h2.events.StreamEnded):
            out.append(("end", event.stream_id))
        elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
            out.append(("other", event))
        if getattr(event, "stream_ended", None) is not None and not isinstance(event, h2.events.StreamEnded):
            out.append(("end", event.stream_id))
    # h2 puts "end" right after the event carrying it as well, so the two line up
    deduped = []
    for item in out:
        if item[0] == "end" and deduped and deduped[-1] == item:
            continue
        deduped.append(item)
    return deduped


def slices(data, payload: bytes) -> list[bytes]:
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(payload)), max_size=12))))
    return [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)])]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(requests(), min_size=1, max_size=6), data=st.data())
def test_valid_request_sequences_give_the_events_h2s_own_server_gives(reqs, data):
    wire = client_bytes(data, reqs)
    reference = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="latin-1"))
    reference.initiate_connection()
    expected = normalized(reference.receive_data(wire))
    ours = server()
    ours.initiate_connection()
    got = []
    for piece in slices(data, wire):
        got += ours.receive_data(piece)
    # h2 emits StreamEnded both as an attribute and as its own event; we only ever add it once
    assert normalized(got) == expected
    assert [kind for kind, *_ in expected].count("request") == len(reqs)


# Fields of 2000 bytes in the HPACK table: the client's 4096-byte table holds two of them, so
# heads drawn from these keep evicting and re-inserting, and the same indexed-only bytes come
# to mean different fields.
BIG_FIELDS = [(f"x-{c}", c * 1965) for c in "abcd"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    heads=st.lists(st.lists(st.sampled_from(BIG_FIELDS + [("x-a", "1"), ("user-agent", "u")]), max_size=4), min_size=1, max_size=30),
    sizes=st.lists(st.sampled_from([4096] * 8 + [2500, 0]), max_size=30),
)
# the case test_indexed_only_request_head_is_not_reused_after_the_table_was_rewritten... spells out
@example(heads=[BIG_FIELDS[1::-1], BIG_FIELDS[1::-1], [*BIG_FIELDS[2:], BIG_FIELDS[0]], [BIG_FIELDS[3], BIG_FIELDS[0]]], sizes=[])
def test_repeated_heads_decode_right_whatever_the_client_table_holds(heads, sizes):
    client = RawClient()
    for n, fields in enumerate(heads):
        if n < len(sizes) and sizes[n] != client.encoder.header_table_size:
            client.encoder.header_table_size = sizes[n]  # the next block starts with a size update
        headers = [(":method", "GET"), (":scheme", "https"), (":path", "/")] + fields
        (event,) = client.send(client.headers(2 * n + 1, headers))
        assert event.headers == tuple(headers)
        client.server.send_headers(2 * n + 1, [(":status", "200")], end_stream=True)


@st.composite
def raw_frames(draw) -> bytes:
    frame_type = draw(st.integers(0, 12))
    flags = draw(st.sampled_from([0, END_STREAM, END_HEADERS, END_HEADERS | END_STREAM, PADDED, PRIORITY_FLAG]) | st.integers(0, 255))
    stream_id = draw(st.sampled_from([0, 1, 3, 5, 2]) | st.integers(0, 2**32 - 1))
    payload = draw(st.sampled_from([b"\x82\x87\x84", b"\0" * 4, b"\0" * 8, b"\0\0\0\0\1\0"]) | st.binary(max_size=40))
    return frame(frame_type, flags, stream_id, payload)


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(raw_frames(), max_size=20), noise=st.binary(max_size=64), data=st.data())
def test_random_frames_after_a_valid_preface_raise_nothing_but_protocol_error(frames, noise, data):
    conn = server()
    conn.initiate_connection()
    encoder = hpack.Encoder()
    wire = PREFACE + settings_frame() + frame(HEADERS, END_HEADERS, 1, encoder.encode(POST)) + b"".join(frames) + noise
    try:
        for piece in slices(data, wire):
            events = conn.receive_data(piece)
            for event in events:
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            conn.data_to_send()
    except h2.exceptions.ProtocolError as exc:
        assert exc.error_code in set(Codes)
        assert parse_frames(conn.data_to_send())[-1].type == GOAWAY
        assert conn.receive_data(wire) == []

