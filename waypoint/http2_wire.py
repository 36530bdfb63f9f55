"""waypoint/http2_wire: the server side of an HTTP/2 connection (RFC 9113), sans-IO.

h2 spent about 70 µs of every proxied request in its state machines, frame objects, header
checks and HPACK encoder: a third of the waypoint's CPU on HTTP/2. This is the downstream
half only, what a server needs, written for that cost: frames are parsed with one struct
unpack, a request head whose HPACK block is only indexed fields (what clients send once their
dynamic table holds the head: h2load, grpc, browsers) is decoded and its fields checked once
per connection and then looked up, and responses are encoded without the dynamic table (RFC 7541
allows an encoder never to insert), so one module-wide memo serves every connection.

It speaks h2's event vocabulary (`h2.events`) and method names, so the trio shell in
`waypoint/http2.py` drives it like the h2 connection its upstream client still uses. Header
names and values come out, and may go in, as latin-1 `str`. An END_STREAM is reported on the
event of its frame (`stream_ended`), and as a `StreamEnded` of its own only when it came on an
empty DATA frame. `WindowUpdated` on stream 0 means every stream may have more window: the
connection's grew, or the client raised SETTINGS_INITIAL_WINDOW_SIZE (lowering it can leave a
stream's window below zero until the client credits it back).

Errors follow RFC 9113 §5.4: a connection error queues GOAWAY and raises
`h2.exceptions.ProtocolError` (its `error_code` says which); a stream error resets that stream
(RST_STREAM) and, if the shell knew it, reports `StreamReset` with `remote_reset` False. A
malformed request (§8.1.1) is a stream error, so it costs its sender one stream, not the
connection. Frames for streams already closed are dropped (after their HPACK block is decoded
and their DATA credited back), because after a reset they are still in flight by design.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable

import h2.errors
import h2.events
import h2.exceptions
import hpack
import hpack.exceptions
from hpack.table import HeaderTable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
MAX_FRAME_SIZE = 16_384  # what we accept (the RFC default; we never raise it)
# Control frames we answer (PING and SETTINGS acks) allowed to wait for the writer: a client
# that sends them without reading our answers is flooding (Envoy's limit is 1000 too).
MAX_PENDING_CONTROL_FRAMES = 1_000
# A header block arriving in more CONTINUATION frames than this is a flood (CVE-2024-27316).
MAX_HEADER_FRAGMENTS = 64
_BLOCK_MEMO_SIZE = 64
_RESETS_REMEMBERED = 256

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
_SELF_DEPENDENT = 0x100  # ours, past the flag byte: a HEADERS frame's priority names its stream

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

_Codes = h2.errors.ErrorCodes
_FRAME_HEAD = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, stream id
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")

_REQUEST_PSEUDO = frozenset((":method", ":scheme", ":authority", ":path"))
# RFC 9113 §8.2.2: connection-specific fields make a message malformed (te: only "trailers").
_CONNECTION_SPECIFIC = frozenset(("connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade"))
_NAME = re.compile(r":?[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
_BAD_VALUE = re.compile(r"[\x00\r\n]|\A[ \t]|[ \t]\Z")

Header = tuple[str, str]


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Stream:
    __slots__ = ("stream_id", "send_window", "recv_window", "unacked", "remote_closed", "local_closed", "content_length", "received")

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.stream_id = stream_id
        self.send_window = send_window
        self.recv_window = recv_window
        self.unacked = 0  # bytes the shell has read but we have not yet credited back
        self.remote_closed = False
        self.local_closed = False
        self.content_length: int | None = None
        self.received = 0


class H2ServerConnection:
    """One server connection: feed `receive_data`, send what `data_to_send` returns."""

    def __init__(
        self,
        *,
        max_concurrent_streams: int,
        stream_window: int,
        connection_window: int,
        max_header_list_size: int,
    ) -> None:
        self._max_concurrent_streams = max_concurrent_streams
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._out = bytearray()
        self._last_frame_start = 0
        self._last_frame_data_of = 0  # the stream whose open DATA frame ends `_out`, if any
        self._in = bytearray()
        self._preface_seen = False
        self._settings_seen = False  # the client's first frame must be SETTINGS
        self._terminated = False
        self._pending_control = 0
        self._streams: dict[int, _Stream] = {}
        self._highest_stream_id = 0
        # Streams we reset lately: the client may still have frames for them in flight, which
        # are dropped; a HEADERS frame on any other stream that is not open is an error.
        self._reset_by_us: dict[int, None] = {}
        self._send_window = DEFAULT_WINDOW
        self._recv_window = DEFAULT_WINDOW
        self._recv_unacked = 0
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame_size = MAX_FRAME_SIZE
        self._table_size_update_due = True  # our blocks start with "dynamic table size 0" once
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = max_header_list_size
        self._block_memo: dict[bytes, tuple[Header, ...]] = {}
        self._continuing: tuple[int, int, bytearray, int] | None = None  # stream, flags, block, frames

    # --- what the shell asks ---

    @property
    def max_outbound_frame_size(self) -> int:
        return self._peer_max_frame_size

    def local_flow_control_window(self, stream_id: int) -> int:
        """How many DATA bytes `send_data` may send on the stream now."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            raise h2.exceptions.StreamClosedError(stream_id)
        return min(self._send_window, stream.send_window)

    @property
    def output_pending(self) -> bool:
        """Whether `data_to_send` has anything (receiving a request alone queues nothing)."""
        return bool(self._out)

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        self._last_frame_data_of = 0
        self._pending_control = 0
        return data

    # --- sending ---

    def initiate_connection(self) -> None:
        """Our SETTINGS (the server preface) and the connection window we grant."""
        settings = (
            (SETTINGS_ENABLE_PUSH, 0),
            (SETTINGS_MAX_CONCURRENT_STREAMS, self._max_concurrent_streams),
            (SETTINGS_INITIAL_WINDOW_SIZE, self._stream_window),
            (SETTINGS_MAX_HEADER_LIST_SIZE, self._decoder.max_header_list_size),
        )
        self._frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(code, value) for code, value in settings))
        if self._connection_window > DEFAULT_WINDOW:
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._connection_window - DEFAULT_WINDOW))
            self._recv_window = self._connection_window

    def send_headers(self, stream_id: int, headers: Iterable[tuple[str | bytes, str | bytes]], end_stream: bool = False) -> None:
        stream = self._sendable(stream_id)
        block = b"".join([_encoded_field(name, value) for name, value in headers])
        if self._table_size_update_due:
            block = b"\x20" + block
            self._table_size_update_due = False
        flags = END_STREAM if end_stream else 0
        limit = self._peer_max_frame_size
        if len(block) <= limit:
            self._frame(HEADERS, flags | END_HEADERS, stream_id, block)
        else:
            self._frame(HEADERS, flags, stream_id, block[:limit])
            for start in range(limit, len(block), limit):
                last = start + limit >= len(block)
                self._frame(CONTINUATION, END_HEADERS if last else 0, stream_id, block[start : start + limit])
        if end_stream:
            self._end_local(stream)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        stream = self._sendable(stream_id)
        size = len(data)
        if size > self._peer_max_frame_size:
            raise h2.exceptions.FrameTooLargeError(f"{size} bytes exceed the peer's frame size {self._peer_max_frame_size}")
        if size > self._send_window or size > stream.send_window:
            raise h2.exceptions.FlowControlError(f"cannot send {size} bytes on stream {stream_id}: the window is {min(self._send_window, stream.send_window)}")
        self._send_window -= size
        stream.send_window -= size
        self._frame(DATA, END_STREAM if end_stream else 0, stream_id, data)
        if end_stream:
            self._end_local(stream)

    def end_stream(self, stream_id: int) -> None:
        if self._last_frame_data_of == stream_id:
            # The stream's DATA is still ours to amend: it carries the END_STREAM instead of
            # an empty frame after it (one frame less for both ends, per response).
            self._out[self._last_frame_start + 4] |= END_STREAM
            self._end_local(self._sendable(stream_id))
            self._last_frame_data_of = 0
        else:
            self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = _Codes.NO_ERROR) -> None:
        if self._streams.pop(stream_id, None) is None:
            raise h2.exceptions.StreamClosedError(stream_id)
        self._send_reset(stream_id, error_code)

    def _send_reset(self, stream_id: int, error_code: int) -> None:
        self._frame(RST_STREAM, 0, stream_id, _U32.pack(error_code))
        reset = self._reset_by_us
        reset[stream_id] = None
        if len(reset) > _RESETS_REMEMBERED:
            del reset[next(iter(reset))]

    def close_connection(self, error_code: int = _Codes.NO_ERROR, additional_data: bytes | None = None) -> None:
        """GOAWAY: streams up to the last one we saw are still served."""
        self._frame(GOAWAY, 0, 0, struct.pack(">LL", self._highest_stream_id, error_code) + (additional_data or b""))

    def acknowledge_received_data(self, length: int, stream_id: int) -> None:
        """The shell consumed `length` flow-controlled bytes: credit them back, in batches
        of half a window so that a steady stream costs few WINDOW_UPDATE frames."""
        if length <= 0 or self._terminated:
            return
        self._recv_unacked += length
        if self._recv_unacked >= self._connection_window // 2:
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._recv_unacked))
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return
        stream.unacked += length
        if stream.unacked >= self._stream_window // 2:
            self._frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(stream.unacked))
            stream.recv_window += stream.unacked
            stream.unacked = 0

    def _sendable(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            raise h2.exceptions.StreamClosedError(stream_id)
        return stream

    def _end_local(self, stream: _Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            del self._streams[stream.stream_id]

    def _frame(self, frame_type: int, flags: int, stream_id: int, payload: bytes) -> None:
        size = len(payload)
        self._last_frame_start = len(self._out)
        self._last_frame_data_of = stream_id if frame_type == DATA and not flags & END_STREAM else 0
        self._out += _FRAME_HEAD.pack(size >> 16, size & 0xFFFF, frame_type, flags, stream_id)
        self._out += payload

    # --- receiving ---

    def receive_data(self, data: bytes) -> list[h2.events.Event]:
        """Events for the frames completed by `data`; raises ProtocolError (GOAWAY queued)
        for a connection error."""
        if self._terminated:
            return []
        events: list[h2.events.Event] = []
        buffer = self._in
        buffer += data
        try:
            position = 0
            if not self._preface_seen:
                if len(buffer) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buffer)):
                        raise _ConnectionError(_Codes.PROTOCOL_ERROR, "invalid HTTP/2 client preface")
                    return events
                if not buffer.startswith(PREFACE):
                    raise _ConnectionError(_Codes.PROTOCOL_ERROR, "invalid HTTP/2 client preface")
                self._preface_seen = True
                position = len(PREFACE)
            end = len(buffer)
            while end - position >= 9:
                high, low, frame_type, flags, stream_id = _FRAME_HEAD.unpack_from(buffer, position)
                length = high << 16 | low
                if length > MAX_FRAME_SIZE:
                    raise _ConnectionError(_Codes.FRAME_SIZE_ERROR, f"a {length}-byte frame exceeds SETTINGS_MAX_FRAME_SIZE {MAX_FRAME_SIZE}")
                if end - position - 9 < length:
                    break
                payload = bytes(buffer[position + 9 : position + 9 + length])
                position += 9 + length
                self._receive_frame(frame_type, flags, stream_id & 0x7FFFFFFF, payload, events)
            del buffer[:position]
        except _ConnectionError as exc:
            self._terminated = True
            buffer.clear()
            self.close_connection(exc.code, str(exc).encode())
            error = h2.exceptions.ProtocolError(str(exc))
            error.error_code = exc.code
            raise error from None
        return events

    def _receive_frame(self, frame_type: int, flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if not self._settings_seen:
            if frame_type != SETTINGS or flags & ACK:
                raise _ConnectionError(_Codes.PROTOCOL_ERROR, "the client preface must be followed by SETTINGS")
            self._settings_seen = True
        if self._continuing is not None:
            if frame_type != CONTINUATION or stream_id != self._continuing[0]:
                raise _ConnectionError(_Codes.PROTOCOL_ERROR, "a header block was interrupted by another frame")
            self._receive_continuation(flags, payload, events)
        elif frame_type == HEADERS:
            self._receive_headers(flags, stream_id, payload, events)
        elif frame_type == DATA:
            self._receive_data_frame(flags, stream_id, payload, events)
        elif frame_type == WINDOW_UPDATE:
            self._receive_window_update(stream_id, payload, events)
        elif frame_type == RST_STREAM:
            self._receive_rst_stream(stream_id, payload, events)
        elif frame_type == SETTINGS:
            self._receive_settings(flags, stream_id, payload, events)
        elif frame_type == PING:
            if len(payload) != 8:
                raise _ConnectionError(_Codes.FRAME_SIZE_ERROR, "PING frames carry 8 bytes")
            if stream_id:
                raise _ConnectionError(_Codes.PROTOCOL_ERROR, "PING on a stream")
            if not flags & ACK:
                self._control_frame(PING, ACK, payload)
        elif frame_type == PRIORITY:
            if not stream_id:
                raise _ConnectionError(_Codes.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                if stream_id > self._highest_stream_id:  # no RST_STREAM may name an idle stream
                    raise _ConnectionError(_Codes.FRAME_SIZE_ERROR, "PRIORITY frames carry 5 bytes")
                self._stream_error(stream_id, _Codes.FRAME_SIZE_ERROR, events)
            elif _U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id:
                self._stream_error(stream_id, _Codes.PROTOCOL_ERROR, events)  # depends on itself
        elif frame_type == GOAWAY:
            if stream_id:
                raise _ConnectionError(_Codes.PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise _ConnectionError(_Codes.FRAME_SIZE_ERROR, "GOAWAY frames carry at least 8 bytes")
            last_stream_id, code = struct.unpack_from(">LL", payload)
            terminated = h2.events.ConnectionTerminated()
            terminated.error_code = _error_code(code)
            terminated.last_stream_id = last_stream_id & 0x7FFFFFFF
            terminated.additional_data = payload[8:]
            events.append(terminated)
        elif frame_type == PUSH_PROMISE:
            raise _ConnectionError(_Codes.PROTOCOL_ERROR, "a client must not send PUSH_PROMISE")
        elif frame_type == CONTINUATION:
            raise _ConnectionError(_Codes.PROTOCOL_ERROR, "CONTINUATION without a header block in progress")
        # Unknown frame types are ignored (RFC 9113 §4.1).

    def _control_frame(self, frame_type: int, flags: int, payload: bytes) -> None:
        self._pending_control += 1
        if self._pending_control > MAX_PENDING_CONTROL_FRAMES:
            raise _ConnectionError(_Codes.ENHANCE_YOUR_CALM, "too many control frames waiting to be answered")
        self._frame(frame_type, flags, 0, payload)

    def _receive_settings(self, flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if stream_id:
            raise _ConnectionError(_Codes.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(_Codes.FRAME_SIZE_ERROR, "a SETTINGS acknowledgement carries no payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(_Codes.FRAME_SIZE_ERROR, "SETTINGS payload is not a multiple of 6 bytes")
        for position in range(0, len(payload), 6):
            code, value = _SETTING.unpack_from(payload, position)
            if code == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(_Codes.FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value} exceeds 2^31-1")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise _ConnectionError(_Codes.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE overflows a stream window")
                if delta > 0:
                    events.append(h2.events.WindowUpdated(stream_id=0, delta=delta))
            elif code == SETTINGS_MAX_FRAME_SIZE:
                if not MAX_FRAME_SIZE <= value <= 16_777_215:
                    raise _ConnectionError(_Codes.PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value} is out of range")
                self._peer_max_frame_size = value
            elif code == SETTINGS_ENABLE_PUSH:
                if value > 1:
                    raise _ConnectionError(_Codes.PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value} is not 0 or 1")
            elif code == SETTINGS_HEADER_TABLE_SIZE:
                self._table_size_update_due = True  # we use none; saying so again is cheap
        self._control_frame(SETTINGS, ACK, b"")

    def _receive_headers(self, flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if not stream_id or not stream_id % 2:
            raise _ConnectionError(_Codes.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}, which a client cannot open")
        if flags & PADDED:
            payload = _unpad(payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise _ConnectionError(_Codes.FRAME_SIZE_ERROR, "HEADERS too short for its priority fields")
            if _U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id:
                flags |= _SELF_DEPENDENT
            payload = payload[5:]
        if flags & END_HEADERS:
            self._header_block(stream_id, flags, payload, events)
        else:
            self._continuing = (stream_id, flags, bytearray(payload), 1)

    def _receive_continuation(self, flags: int, payload: bytes, events: list) -> None:
        assert self._continuing is not None
        stream_id, first_flags, block, fragments = self._continuing
        block += payload
        fragments += 1
        if fragments > MAX_HEADER_FRAGMENTS or len(block) > self._decoder.max_header_list_size:
            raise _ConnectionError(_Codes.ENHANCE_YOUR_CALM, "header block too large or in too many CONTINUATION frames")
        if flags & END_HEADERS:
            self._continuing = None
            self._header_block(stream_id, first_flags, bytes(block), events)
        else:
            self._continuing = (stream_id, first_flags, block, fragments)

    def _header_block(self, stream_id: int, flags: int, block: bytes, events: list) -> None:
        """A complete header block: a new request, or trailers of an open one."""
        end_stream = flags & END_STREAM
        headers, malformed = self._decode(block)  # even for a refused stream: HPACK stays in step
        if flags & _SELF_DEPENDENT:
            malformed = "a stream cannot depend on itself"  # RFC 9113 §5.3.1
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id <= self._highest_stream_id:
                if stream_id in self._reset_by_us:
                    return  # in flight when we reset it: its head is moot (HPACK is in step)
                raise _ConnectionError(_Codes.STREAM_CLOSED, f"HEADERS on stream {stream_id}, which is closed")
            self._highest_stream_id = stream_id
            if len(self._streams) >= self._max_concurrent_streams:
                self._send_reset(stream_id, _Codes.REFUSED_STREAM)
                return
            if malformed is None:
                malformed = _request_problem(headers)
            if malformed is not None:
                self._send_reset(stream_id, _Codes.PROTOCOL_ERROR)
                return
            stream = _Stream(stream_id, self._peer_initial_window, self._stream_window)
            for name, value in headers:
                if name == "content-length":
                    stream.content_length = int(value)
                    break
            if end_stream and stream.content_length:  # no body where one was announced (§8.1.1)
                self._send_reset(stream_id, _Codes.PROTOCOL_ERROR)
                return
            self._streams[stream_id] = stream
            ended = h2.events.StreamEnded(stream_id=stream_id) if end_stream else None
            events.append(h2.events.RequestReceived(stream_id=stream_id, headers=headers, stream_ended=ended))
            if end_stream:
                self._end_remote(stream, events)
            return
        if stream.remote_closed:
            self._stream_error(stream_id, _Codes.STREAM_CLOSED, events)
        elif (
            not end_stream
            or malformed is not None
            or any(name[0] == ":" for name, _ in headers)
            or stream.content_length not in (None, stream.received)
        ):
            # trailers end the stream (and its body, which must then match content-length, §8.1.1),
            # and carry no pseudo-fields
            self._stream_error(stream_id, _Codes.PROTOCOL_ERROR, events)
        else:
            ended = h2.events.StreamEnded(stream_id=stream_id)
            events.append(h2.events.TrailersReceived(stream_id=stream_id, headers=headers, stream_ended=ended))
            self._end_remote(stream, events)

    def _decode(self, block: bytes) -> tuple[tuple[Header, ...], str | None]:
        """The fields of a block, and what is wrong with them (None: nothing field-level).

        Blocks of only one-byte indexed fields do not change the dynamic table, so the same
        bytes mean the same fields until a block that does: those are memoized. Every insertion
        puts a new tuple first, so the first entry's identity (not its value: an evicted field
        can come back first) says whether the table changed."""
        memo = self._block_memo
        decoded = memo.get(block)
        if decoded is not None:
            return decoded, None
        table = self._decoder.header_table
        first = table.dynamic_entries[0] if table.dynamic_entries else None  # held: its id stays unique
        before = (len(table.dynamic_entries), id(first), table.maxsize)
        try:
            raw = self._decoder.decode(block, raw=True)
        except hpack.exceptions.OversizedHeaderListError as exc:
            raise _ConnectionError(_Codes.ENHANCE_YOUR_CALM, f"header list too large: {exc}") from None
        except (hpack.exceptions.HPACKError, IndexError, ValueError) as exc:
            raise _ConnectionError(_Codes.COMPRESSION_ERROR, f"undecodable header block: {exc}") from None
        headers = tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in raw)
        problem = _field_problem(headers)
        after = (len(table.dynamic_entries), id(table.dynamic_entries[0] if table.dynamic_entries else None), table.maxsize)
        if after != before:
            memo.clear()
        elif problem is None and all(byte & 0x80 and byte != 0xFF for byte in block):
            if len(memo) >= _BLOCK_MEMO_SIZE:
                memo.clear()
            memo[block] = headers
        return headers, problem

    def _receive_data_frame(self, flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if not stream_id:
            raise _ConnectionError(_Codes.PROTOCOL_ERROR, "DATA on stream 0")
        flow_length = len(payload)
        self._recv_window -= flow_length
        if self._recv_window < 0:
            raise _ConnectionError(_Codes.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        data = _unpad(payload) if flags & PADDED else payload
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_closed:
            if stream_id > self._highest_stream_id:
                raise _ConnectionError(_Codes.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            self.acknowledge_received_data(flow_length, 0)
            if stream is not None:
                self._stream_error(stream_id, _Codes.STREAM_CLOSED, events)
            return
        stream.recv_window -= flow_length
        if stream.recv_window < 0:
            self.acknowledge_received_data(flow_length, 0)
            self._stream_error(stream_id, _Codes.FLOW_CONTROL_ERROR, events)
            return
        stream.received += len(data)
        end_stream = flags & END_STREAM
        if stream.content_length is not None and (
            stream.received > stream.content_length or (end_stream and stream.received != stream.content_length)
        ):
            self.acknowledge_received_data(flow_length, 0)
            self._stream_error(stream_id, _Codes.PROTOCOL_ERROR, events)  # RFC 9113 §8.1.1
            return
        ended = h2.events.StreamEnded(stream_id=stream_id) if end_stream else None
        if data:
            events.append(h2.events.DataReceived(stream_id=stream_id, data=data, flow_controlled_length=flow_length, stream_ended=ended))
        else:
            # An empty (or all-padding) frame delivers nothing: credit it now, and report
            # only the end it may carry (the shell reads b"" as the end of a body).
            self.acknowledge_received_data(flow_length, 0)
            if ended is not None:
                events.append(ended)
        if end_stream:
            self._end_remote(stream, events)

    def _receive_window_update(self, stream_id: int, payload: bytes, events: list) -> None:
        if len(payload) != 4:
            raise _ConnectionError(_Codes.FRAME_SIZE_ERROR, "WINDOW_UPDATE frames carry 4 bytes")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise _ConnectionError(_Codes.PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise _ConnectionError(_Codes.FLOW_CONTROL_ERROR, "the connection window exceeds 2^31-1")
            events.append(h2.events.WindowUpdated(stream_id=0, delta=increment))
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id > self._highest_stream_id:
                raise _ConnectionError(_Codes.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
            return
        if not increment:
            self._stream_error(stream_id, _Codes.PROTOCOL_ERROR, events)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(stream_id, _Codes.FLOW_CONTROL_ERROR, events)
            return
        events.append(h2.events.WindowUpdated(stream_id=stream_id, delta=increment))

    def _receive_rst_stream(self, stream_id: int, payload: bytes, events: list) -> None:
        if len(payload) != 4:
            raise _ConnectionError(_Codes.FRAME_SIZE_ERROR, "RST_STREAM frames carry 4 bytes")
        if not stream_id:
            raise _ConnectionError(_Codes.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if stream_id > self._highest_stream_id:
            raise _ConnectionError(_Codes.PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
        if self._streams.pop(stream_id, None) is not None:
            code = _error_code(_U32.unpack(payload)[0])
            events.append(h2.events.StreamReset(stream_id=stream_id, error_code=code, remote_reset=True))

    def _stream_error(self, stream_id: int, code: int, events: list) -> None:
        self._send_reset(stream_id, code)
        if self._streams.pop(stream_id, None) is not None:
            events.append(h2.events.StreamReset(stream_id=stream_id, error_code=code, remote_reset=False))

    def _end_remote(self, stream: _Stream, events: list) -> None:
        stream.remote_closed = True
        if stream.local_closed:
            del self._streams[stream.stream_id]


def _unpad(payload: bytes) -> bytes:
    if not payload or payload[0] >= len(payload):
        raise _ConnectionError(_Codes.PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - payload[0]]


def _error_code(code: int) -> int:
    try:
        return _Codes(code)
    except ValueError:
        return code  # unknown codes are kept as numbers (RFC 9113 §7)


def _field_problem(headers: tuple[Header, ...]) -> str | None:
    """What makes these fields malformed in any HTTP/2 message (RFC 9113 §8.2), if anything."""
    regular_seen = False
    for name, value in headers:
        if not _NAME.match(name):
            return f"invalid field name {name!r}"
        if _BAD_VALUE.search(value):
            return f"invalid value for field {name!r}"
        if name[0] == ":":
            if regular_seen:
                return f"pseudo-header {name} after regular fields"
        else:
            regular_seen = True
            if name in _CONNECTION_SPECIFIC or (name == "te" and value != "trailers"):
                return f"connection-specific field {name!r}"
    return None


def _request_problem(headers: tuple[Header, ...]) -> str | None:
    """What makes a request head malformed (RFC 9113 §8.3.1), beyond its fields."""
    pseudo: dict[str, str] = {}
    content_length: str | None = None
    for name, value in headers:
        if name[0] == ":":
            if name not in _REQUEST_PSEUDO:
                return f"{name} is not a request pseudo-header"
            if name in pseudo:
                return f"{name} appears twice"
            pseudo[name] = value
        elif name == "content-length":
            if not value.isdigit() or not value.isascii() or (content_length is not None and value != content_length):
                return "invalid content-length"
            content_length = value
    method = pseudo.get(":method")
    if method is None:
        return ":method is missing"
    if method == "CONNECT":
        return None if ":authority" in pseudo and ":scheme" not in pseudo and ":path" not in pseudo else "malformed CONNECT"
    if ":scheme" not in pseudo or not pseudo.get(":path"):
        return ":scheme or :path is missing"
    return None


def _encoded_field(name: str | bytes, value: str | bytes) -> bytes:
    """One field as an HPACK representation that never touches the dynamic table."""
    key = (name, value)
    encoded = _field_memo.get(key)
    if encoded is None:
        raw_name = name.encode("latin-1") if isinstance(name, str) else name
        raw_value = value.encode("latin-1") if isinstance(value, str) else value
        index = _STATIC_FIELDS.get((raw_name, raw_value))
        if index is not None:
            encoded = _integer(index, 7, 0x80)
        else:
            index = _STATIC_NAMES.get(raw_name, 0)
            encoded = _integer(index, 4, 0x00)  # literal without indexing
            if not index:
                encoded += _integer(len(raw_name), 7, 0x00) + raw_name
            encoded += _integer(len(raw_value), 7, 0x00) + raw_value
        if len(_field_memo) >= _FIELD_MEMO_SIZE:
            _field_memo.clear()
        _field_memo[key] = encoded
    return encoded


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 §5.1 integer with an N-bit prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_STATIC_FIELDS: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_FIELDS.setdefault((_name, _value), _index)
    _STATIC_NAMES.setdefault(_name, _index)
# Responses repeat the same few fields (status, server, content-type...) across connections.
_FIELD_MEMO_SIZE = 4096
_field_memo: dict[tuple[str | bytes, str | bytes], bytes] = {}
