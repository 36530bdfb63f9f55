"""meshcore/hbone/sansio: the HBONE protocol core (HTTP/2 CONNECT tunnels), without I/O.

Bytes in (`receive_data`), events out, bytes to send pulled with `data_to_send`; no sockets,
no trio. Both ends of a tunnel use it: the client opens CONNECT streams, the server answers
them.

Theory of operation
-------------------
h2 owns everything except the payload: the preface, SETTINGS, HEADERS/HPACK, the stream
state machines, WINDOW_UPDATE received from the peer, PING, RST_STREAM and GOAWAY. DATA
frames bypass it in both directions, because h2's per-frame object machinery is most of a
Python tunnel's CPU (shared/reference/python-hbone-ceiling.md, "fastdata"):

* Inbound DATA is parsed here from the 9-byte frame header and handed out as `TunnelData`.
  h2 never sees the bytes, so its inbound windows never move; we keep our own and send
  WINDOW_UPDATE frames ourselves. An END_STREAM flag is delivered to h2 as a synthetic empty
  DATA frame so that its stream state machine still closes the remote side.
* Outbound DATA frames are serialised here, and h2's *outbound* window counters are
  decremented by hand, so h2 stays the single source of truth for how much the peer lets us
  send (it applies the peer's WINDOW_UPDATE and SETTINGS_INITIAL_WINDOW_SIZE changes).
  END_STREAM is sent through h2 (`end_stream`), which keeps its state machine right.

Flow-control credit is split in two (the head-of-line trap in the reference): connection
credit is returned as soon as bytes are received (the stream windows bound what is
buffered), stream credit only when the consumer `acknowledge`s bytes it has written out.
Both are batched into WINDOW_UPDATEs of at least a quarter window.

Output ordering: every byte h2 produces is moved into our own output buffer right after
each h2 call, and our own frames are appended behind it, so the wire order is the call order.
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

# Sizes from ztunnel (facts §1 "HTTP/2 settings").
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024
CLIENT_MAX_HEADER_LIST = 16 * 1024
SERVER_MAX_HEADER_LIST = 64 * 1024
SERVER_MAX_CONCURRENT_STREAMS = 200
POOL_MAX_STREAMS_PER_CONNECTION = 100

_FRAME_HEADER = struct.Struct(">HBBBL")  # 24-bit length split as H+B, type, flags, stream id
_DATA = 0x0
_FLAG_END_STREAM = 0x1
_FLAG_PADDED = 0x8
_PREFACE_LEN = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_WINDOW_UPDATE_HEADER = struct.Struct(">HBBBLL")

ErrorCode = h2.errors.ErrorCodes


# --- Events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TunnelRequested:
    """Server side: the peer asked for a tunnel to `authority` (a valid CONNECT)."""

    stream_id: int
    authority: str
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class BadTunnelRequest:
    """Server side: a request that is not a valid HBONE CONNECT; it was answered with 400."""

    stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class TunnelResponse:
    """Client side: the peer answered our CONNECT (200 = tunnel open)."""

    stream_id: int
    status: int
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class TunnelData:
    """Payload for a tunnel. Acknowledge it once written out, to return stream credit."""

    stream_id: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class TunnelEnded:
    """The peer half-closed the tunnel (empty DATA with END_STREAM, or END_STREAM on data)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class TunnelReset:
    """The tunnel was reset, by the peer (remote=True) or by us on a protocol error."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True, slots=True)
class SendWindowOpened:
    """The peer granted send credit; stream_id 0 means the whole connection."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The peer sent GOAWAY: streams above `last_stream_id` were not processed."""

    error_code: int
    last_stream_id: int
    additional_data: bytes | None


Event = (
    TunnelRequested
    | BadTunnelRequest
    | TunnelResponse
    | TunnelData
    | TunnelEnded
    | TunnelReset
    | SendWindowOpened
    | PingAcknowledged
    | ConnectionTerminated
)


class HboneProtocolError(Exception):
    """The peer broke HTTP/2; the connection is finished (a GOAWAY is queued to send)."""

    def __init__(self, message: str, error_code: int = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.error_code = int(error_code)


# --- The connection core ------------------------------------------------------------------


class _Tunnel:
    """Our bookkeeping for one stream: receive window (h2 never sees its DATA) and ends."""

    __slots__ = ("window", "unacked", "remote_ended", "local_ended")

    def __init__(self) -> None:
        self.window = STREAM_WINDOW  # bytes the peer may still send before we return credit
        self.unacked = 0  # consumed bytes whose credit is not returned yet
        self.remote_ended = False
        self.local_ended = False


class HboneConnection:
    """One HTTP/2 connection carrying HBONE tunnels, client or server side."""

    def __init__(self, *, client_side: bool) -> None:
        self.client_side = client_side
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding="utf-8",
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=True,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        self._h2.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: (
                    POOL_MAX_STREAMS_PER_CONNECTION if client_side else SERVER_MAX_CONCURRENT_STREAMS
                ),
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: (
                    CLIENT_MAX_HEADER_LIST if client_side else SERVER_MAX_HEADER_LIST
                ),
            },
        )
        self._out = bytearray()
        self._in = bytearray()
        self._preface_pending = 0 if client_side else _PREFACE_LEN
        self._tunnels: dict[int, _Tunnel] = {}
        self._conn_recv_window = CONNECTION_WINDOW
        self._conn_unacked = 0
        self._terminated = False
        self.peer_goaway: ConnectionTerminated | None = None

    # --- setup and properties ---

    def initiate(self) -> None:
        """Queue our preface/SETTINGS and open the connection window to 16 MiB."""
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._pull_h2()

    @property
    def open_streams(self) -> int:
        """Streams that are not fully closed yet (ours and the peer's)."""
        return len(self._tunnels)

    @property
    def max_streams(self) -> int:
        """How many concurrent tunnels we may open: min(pool cap, peer's SETTINGS)."""
        return min(POOL_MAX_STREAMS_PER_CONNECTION, self._h2.remote_settings.max_concurrent_streams)

    @property
    def terminated(self) -> bool:
        return self._terminated

    def send_window(self, stream_id: int) -> int:
        """Bytes we may send on `stream_id` now (0 if the stream cannot send)."""
        tunnel = self._tunnels.get(stream_id)
        if tunnel is None or tunnel.local_ended:
            return 0
        stream = self._h2.streams[stream_id]
        return min(self._h2.outbound_flow_control_window, stream.outbound_flow_control_window)

    # --- client operations ---

    def open_tunnel(self, authority: str, headers: tuple[tuple[str, str], ...] = ()) -> int:
        """Send CONNECT for `authority`; returns the new stream id."""
        stream_id = self._h2.get_next_available_stream_id()
        self._h2.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority), *headers])
        self._tunnels[stream_id] = _Tunnel()
        self._pull_h2()
        return stream_id

    # --- server operations ---

    def respond(
        self, stream_id: int, status: int, headers: tuple[tuple[str, str], ...] = (), *, end_stream: bool = False
    ) -> None:
        """Answer a CONNECT; any status but 200 should end the stream."""
        self._h2.send_headers(stream_id, [(":status", str(status)), *headers], end_stream=end_stream)
        self._pull_h2()
        if end_stream:
            self._end_local(stream_id)

    # --- both sides ---

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Frame as much of `data` as the send windows allow; returns how many bytes were taken."""
        tunnel = self._tunnels.get(stream_id)
        if tunnel is None or tunnel.local_ended:
            return 0
        h2conn = self._h2
        stream = h2conn.streams[stream_id]
        window = min(h2conn.outbound_flow_control_window, stream.outbound_flow_control_window)
        total = min(len(data), window)
        if total <= 0:
            return 0
        frame_size = h2conn.max_outbound_frame_size
        out = self._out
        view = memoryview(data)
        offset = 0
        while offset < total:
            size = min(frame_size, total - offset)
            out += _FRAME_HEADER.pack(size >> 8, size & 0xFF, _DATA, 0, stream_id)
            out += view[offset : offset + size]
            offset += size
        h2conn.outbound_flow_control_window -= total
        stream.outbound_flow_control_window -= total
        return total

    def send_eof(self, stream_id: int) -> None:
        """Half-close our side: empty DATA with END_STREAM."""
        tunnel = self._tunnels.get(stream_id)
        if tunnel is None or tunnel.local_ended:
            return
        self._h2.end_stream(stream_id)
        self._pull_h2()
        self._end_local(stream_id)

    def reset(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        """Abort a tunnel with RST_STREAM (no-op if it is already closed)."""
        if self._tunnels.pop(stream_id, None) is None:
            return
        try:
            self._h2.reset_stream(stream_id, error_code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self._pull_h2()

    def acknowledge(self, stream_id: int, size: int) -> bool:
        """The consumer wrote `size` bytes of this stream's data out: return stream credit.

        Returns True when that queued a WINDOW_UPDATE (there is something to send).
        """
        tunnel = self._tunnels.get(stream_id)
        if tunnel is None or tunnel.remote_ended:
            return False
        tunnel.unacked += size
        if tunnel.unacked < STREAM_WINDOW // 4:
            return False
        self._out += _WINDOW_UPDATE_HEADER.pack(0, 4, 0x8, 0, stream_id, tunnel.unacked)
        tunnel.window += tunnel.unacked
        tunnel.unacked = 0
        return True

    def ping(self, opaque: bytes) -> None:
        """Send a keepalive PING; nothing once a GOAWAY went either way (h2 forbids it then, and
        a connection that is only draining needs no keepalive)."""
        if self._terminated or self._h2.state_machine.state is h2.connection.ConnectionState.CLOSED:
            return
        self._h2.ping(opaque)
        self._pull_h2()

    def close(self, error_code: int = ErrorCode.NO_ERROR) -> None:
        """Send GOAWAY: the peer must open no new streams; open ones may finish."""
        if not self._terminated:
            self._h2.close_connection(error_code)
            self._pull_h2()

    def data_to_send(self) -> bytes | bytearray:
        """Bytes to write to the transport, in order; empties the buffer (hands it over, no copy)."""
        if not self._out:
            return b""
        out = self._out
        self._out = bytearray()
        return out

    # --- input ---

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the transport; returns the events they caused.

        `TunnelData.data` may be a memoryview into `data` (no copy) when `data` is immutable
        bytes; keep it as long as you like, it is never overwritten.

        Raises HboneProtocolError when the peer broke the protocol; a GOAWAY is queued.
        """
        events: list[Event] = []
        if self._preface_pending:
            take = min(self._preface_pending, len(data))
            self._h2_receive(bytes(data[:take]), events)
            self._preface_pending -= take
            data = data[take:]
        if self._in or not isinstance(data, bytes):
            # A partial frame is pending (or the buffer is mutable): parse from our own copy,
            # whose payload slices must then be copied out.
            self._in += data
            consumed = self._parse(self._in, events, zero_copy=False)
            del self._in[:consumed]
        else:
            # Common case: whole frames in an immutable buffer; slice payloads without copying.
            consumed = self._parse(data, events, zero_copy=True)
            if consumed < len(data):
                self._in += memoryview(data)[consumed:]
        if self._conn_unacked >= CONNECTION_WINDOW // 4:
            self._out += _WINDOW_UPDATE_HEADER.pack(0, 4, 0x8, 0, 0, self._conn_unacked)
            self._conn_recv_window += self._conn_unacked
            self._conn_unacked = 0
        return events

    def _parse(self, buf: bytes | bytearray, events: list[Event], *, zero_copy: bool) -> int:
        """Handle every complete frame in `buf`; returns how many bytes were consumed."""
        view = memoryview(buf)
        pos = 0
        control_start = -1  # start of a run of non-DATA frames, handed to h2 in one call
        end = len(buf)
        max_frame = MAX_FRAME_SIZE
        try:
            while end - pos >= 9:
                length_hi, length_lo, frame_type, flags, stream_id = _FRAME_HEADER.unpack_from(buf, pos)
                length = (length_hi << 8) | length_lo
                if length > max_frame:
                    raise HboneProtocolError(f"frame of {length} bytes exceeds max frame size", ErrorCode.FRAME_SIZE_ERROR)
                if end - pos < 9 + length:
                    break
                if frame_type != _DATA:
                    if control_start < 0:
                        control_start = pos
                    pos += 9 + length
                    continue
                if control_start >= 0:
                    self._h2_receive(bytes(view[control_start:pos]), events)
                    control_start = -1
                self._receive_data_frame(view, pos, length, flags, stream_id & 0x7FFFFFFF, events, zero_copy)
                pos += 9 + length
        finally:
            if control_start >= 0:
                self._h2_receive(bytes(view[control_start:pos]), events)
            if not zero_copy:
                view.release()  # our bytearray must be resizable again; its payloads were copied
        return pos

    def _receive_data_frame(
        self, buf: memoryview, pos: int, length: int, flags: int, stream_id: int, events: list[Event], zero_copy: bool
    ) -> None:
        if stream_id == 0:
            self._fail("DATA frame on stream 0")
        self._conn_recv_window -= length
        if self._conn_recv_window < 0:
            self._fail("peer overran the connection flow-control window", ErrorCode.FLOW_CONTROL_ERROR)
        # Connection credit goes back at once; the stream window bounds what is buffered.
        self._conn_unacked += length
        start, stop = pos + 9, pos + 9 + length
        if flags & _FLAG_PADDED:
            if length < 1 or buf[start] >= length:
                self._fail("DATA frame with invalid padding")
            stop -= buf[start]
            start += 1
        recv = self._tunnels.get(stream_id)
        if recv is None or recv.remote_ended:
            # Closed, reset or unknown stream: h2 decides between RST_STREAM and GOAWAY.
            self._h2_receive(_FRAME_HEADER.pack(0, 0, _DATA, flags & _FLAG_END_STREAM, stream_id), events)
            return
        recv.window -= length
        if recv.window < 0:
            self._reset_local(stream_id, ErrorCode.FLOW_CONTROL_ERROR, events)
            return
        if flags & _FLAG_PADDED:
            # Padding is flow-controlled but never delivered: credit it back now.
            recv.unacked += length - (stop - start)
        if stop > start:
            events.append(TunnelData(stream_id, buf[start:stop] if zero_copy else bytes(buf[start:stop])))
        if flags & _FLAG_END_STREAM:
            self._h2_receive(_FRAME_HEADER.pack(0, 0, _DATA, _FLAG_END_STREAM, stream_id), events)

    def _h2_receive(self, data: bytes, events: list[Event]) -> None:
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._terminated = True
            self._pull_h2()
            raise HboneProtocolError(f"HTTP/2 protocol error: {exc}", getattr(exc, "error_code", ErrorCode.PROTOCOL_ERROR)) from exc
        self._pull_h2()
        for ev in h2_events:
            self._translate(ev, events)

    def _translate(self, ev: h2.events.Event, events: list[Event]) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev, events)
        elif isinstance(ev, h2.events.ResponseReceived):
            headers = _decode(ev.headers)
            status = next((int(v) for k, v in headers if k == ":status"), 0)
            events.append(TunnelResponse(ev.stream_id, status, tuple(h for h in headers if h[0] != ":status")))
        elif isinstance(ev, h2.events.StreamEnded):
            self._on_remote_end(ev.stream_id, events)
        elif isinstance(ev, h2.events.StreamReset):
            if self._tunnels.pop(ev.stream_id, None) is not None:
                events.append(TunnelReset(ev.stream_id, int(ev.error_code), remote=ev.remote_reset))
        elif isinstance(ev, h2.events.WindowUpdated):
            events.append(SendWindowOpened(ev.stream_id))
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                events.append(SendWindowOpened(0))
        elif isinstance(ev, h2.events.PingAckReceived):
            events.append(PingAcknowledged(ev.ping_data))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.peer_goaway = ConnectionTerminated(int(ev.error_code), ev.last_stream_id, ev.additional_data)
            events.append(self.peer_goaway)
        elif isinstance(ev, h2.events.DataReceived):
            # Only our synthetic zero-length END_STREAM frames reach h2; nothing to credit.
            pass
        elif isinstance(ev, h2.events.TrailersReceived):
            self._reset_local(ev.stream_id, ErrorCode.PROTOCOL_ERROR, events)

    def _on_request(self, ev: h2.events.RequestReceived, events: list[Event]) -> None:
        stream_id = ev.stream_id
        headers = _decode(ev.headers)
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        reason = None
        if pseudo.get(":method") != "CONNECT":
            reason = f"method {pseudo.get(':method')!r} is not CONNECT"
        elif ":protocol" in pseudo or ":path" in pseudo or ":scheme" in pseudo:
            reason = "extended CONNECT (:protocol/:path/:scheme) is not HBONE"
        elif not pseudo.get(":authority"):
            reason = "CONNECT without :authority"
        if reason is not None:
            self._h2.send_headers(stream_id, [(":status", "400")], end_stream=True)
            self._pull_h2()
            events.append(BadTunnelRequest(stream_id, reason))
            return
        self._tunnels[stream_id] = _Tunnel()
        events.append(
            TunnelRequested(stream_id, pseudo[":authority"], tuple(h for h in headers if not h[0].startswith(":")))
        )

    def _on_remote_end(self, stream_id: int, events: list[Event]) -> None:
        tunnel = self._tunnels.get(stream_id)
        if tunnel is None or tunnel.remote_ended:
            return
        tunnel.remote_ended = True
        events.append(TunnelEnded(stream_id))
        if tunnel.local_ended:
            del self._tunnels[stream_id]

    def _end_local(self, stream_id: int) -> None:
        """Our side is closed; drop the record once both are (it no longer counts)."""
        tunnel = self._tunnels.get(stream_id)
        if tunnel is None:
            return
        tunnel.local_ended = True
        if tunnel.remote_ended:
            del self._tunnels[stream_id]

    def _reset_local(self, stream_id: int, error_code: int, events: list[Event]) -> None:
        self.reset(stream_id, error_code)
        events.append(TunnelReset(stream_id, int(error_code), remote=False))

    def _fail(self, message: str, error_code: int = ErrorCode.PROTOCOL_ERROR) -> None:
        self._terminated = True
        self._h2.close_connection(error_code)
        self._pull_h2()
        raise HboneProtocolError(message, error_code)

    def _pull_h2(self) -> None:
        data = self._h2.data_to_send()
        if data:
            self._out += data


def _decode(headers: list[tuple[str | bytes, str | bytes]]) -> list[tuple[str, str]]:
    return [
        (k.decode("utf-8", "replace") if isinstance(k, bytes) else k, v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
        for k, v in headers
    ]
