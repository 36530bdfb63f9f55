"""The sans-IO HBONE core, driven with bytes: client and server cores talk to each other
directly, and a raw h2 peer checks exact frames on the wire."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import hyperframe.frame as hf
import pytest

from meshcore.hbone import sansio


def pair() -> tuple[sansio.HboneConnection, sansio.HboneConnection]:
    client = sansio.HboneConnection(client_side=True)
    server = sansio.HboneConnection(client_side=False)
    client.initiate()
    server.initiate()
    exchange(client, server)
    return client, server


def exchange(client, server, rounds: int = 4) -> tuple[list, list]:
    """Shuttle bytes both ways until quiet; returns (client events, server events)."""
    c_events, s_events = [], []
    for _ in range(rounds):
        s_events += server.receive_data(client.data_to_send())
        c_events += client.receive_data(server.data_to_send())
    return c_events, s_events


def frames(data: bytes) -> list[hf.Frame]:
    out, pos = [], 0
    while pos < len(data):
        frame, length = hf.Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
        frame.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        out.append(frame)
        pos += 9 + length
    return out


def test_connect_then_data_both_ways_then_half_close():
    client, server = pair()
    sid = client.open_tunnel("10.0.0.2:8080", (("baggage", "k8s.namespace.name=default"),))
    _, s_events = exchange(client, server)
    [req] = [e for e in s_events if isinstance(e, sansio.TunnelRequested)]
    assert req.authority == "10.0.0.2:8080"
    assert ("baggage", "k8s.namespace.name=default") in req.headers

    server.respond(sid, 200)
    c_events, _ = exchange(client, server)
    assert sansio.TunnelResponse(sid, 200, ()) in c_events

    assert client.send_data(sid, b"ping") == 4
    assert server.send_data(sid, b"pong") == 4
    c_events, s_events = exchange(client, server)
    assert sansio.TunnelData(sid, b"ping") in s_events
    assert sansio.TunnelData(sid, b"pong") in c_events

    client.send_eof(sid)
    _, s_events = exchange(client, server)
    assert sansio.TunnelEnded(sid) in s_events
    assert server.send_data(sid, b"still open") == 10  # half-close: the other way stays open
    c_events, _ = exchange(client, server)
    assert sansio.TunnelData(sid, b"still open") in c_events
    server.send_eof(sid)
    c_events, _ = exchange(client, server)
    assert sansio.TunnelEnded(sid) in c_events
    assert client.open_streams == 0 and server.open_streams == 0


def test_wire_frames_are_exact():
    """CONNECT carries only :method and :authority; data is plain DATA; EOF is empty DATA+END_STREAM."""
    client = sansio.HboneConnection(client_side=True)
    client.initiate()
    preface = client.data_to_send()
    assert preface.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    settings, window = frames(preface[24:])
    assert isinstance(settings, hf.SettingsFrame)
    assert settings.settings[hf.SettingsFrame.INITIAL_WINDOW_SIZE] == 4 * 1024 * 1024
    assert settings.settings[hf.SettingsFrame.MAX_FRAME_SIZE] == 1024 * 1024
    assert settings.settings[hf.SettingsFrame.ENABLE_PUSH] == 0
    assert isinstance(window, hf.WindowUpdateFrame) and window.stream_id == 0
    assert window.window_increment == 16 * 1024 * 1024 - 65535

    sid = client.open_tunnel("10.0.0.2:8080")
    [headers] = frames(client.data_to_send())
    assert isinstance(headers, hf.HeadersFrame) and "END_HEADERS" in headers.flags
    assert "END_STREAM" not in headers.flags

    # Pretend the server accepted (a raw h2 server answers 200).
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    peer.initiate_connection()
    peer.receive_data(preface)
    events = peer.receive_data(bytes(hf.HeadersFrame(sid, data=headers.data, flags=["END_HEADERS"]).serialize()))
    [request] = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert dict(request.headers) == {b":method": b"CONNECT", b":authority": b"10.0.0.2:8080"}

    peer.send_headers(sid, [(":status", "200")])
    client.receive_data(peer.data_to_send())
    client.data_to_send()
    client.send_data(sid, b"hello")
    [data] = frames(client.data_to_send())
    assert isinstance(data, hf.DataFrame) and data.data == b"hello" and not data.flags
    client.send_eof(sid)
    [eof] = frames(client.data_to_send())
    assert isinstance(eof, hf.DataFrame) and eof.data == b"" and "END_STREAM" in eof.flags


def test_send_respects_windows_and_resumes_on_window_update():
    client, server = pair()
    sid = client.open_tunnel("10.0.0.2:80")
    exchange(client, server)
    server.respond(sid, 200)
    exchange(client, server)
    big = b"x" * (5 * 1024 * 1024)
    sent = client.send_data(sid, big)
    assert sent == sansio.STREAM_WINDOW  # stream window caps it
    assert client.send_window(sid) == 0
    wire = client.data_to_send()
    assert all(len(f.data) <= sansio.MAX_FRAME_SIZE for f in frames(bytes(wire)))  # peer's max frame
    s_events = server.receive_data(bytes(wire))
    received = sum(len(e.data) for e in s_events if isinstance(e, sansio.TunnelData))
    assert received == sent
    # Credit comes back only when the consumer acknowledges what it wrote out.
    assert client.send_window(sid) == 0
    server.acknowledge(sid, received)
    c_events, _ = exchange(client, server)
    assert sansio.SendWindowOpened(sid) in c_events
    assert client.send_window(sid) > 0


def test_non_connect_and_extended_connect_get_400():
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    server = sansio.HboneConnection(client_side=False)
    server.initiate()
    client.send_headers(1, [(":method", "GET"), (":authority", "a:1"), (":scheme", "https"), (":path", "/")], end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert [e for e in events if isinstance(e, sansio.BadTunnelRequest)][0].reason.startswith("method 'GET'")
    replies = client.receive_data(server.data_to_send())
    [resp] = [e for e in replies if isinstance(e, h2.events.ResponseReceived)]
    assert dict(resp.headers)[b":status"] == b"400"


def test_data_over_window_resets_only_that_stream():
    client, server = pair()
    sid = client.open_tunnel("10.0.0.2:80")
    exchange(client, server)
    server.respond(sid, 200)
    exchange(client, server)
    # A misbehaving peer ignores the stream window: forge frames past it.
    chunk = b"y" * sansio.MAX_FRAME_SIZE
    forged = b"".join(
        bytes(hf.DataFrame(sid, data=chunk).serialize()) for _ in range(sansio.STREAM_WINDOW // len(chunk) + 1)
    )
    events = server.receive_data(forged)
    assert sansio.TunnelReset(sid, sansio.ErrorCode.FLOW_CONTROL_ERROR, remote=False) in events
    rst = [f for f in frames(server.data_to_send()) if isinstance(f, hf.RstStreamFrame)]
    assert rst and rst[0].stream_id == sid


def test_garbage_is_a_protocol_error_with_goaway():
    server = sansio.HboneConnection(client_side=False)
    server.initiate()
    server.data_to_send()
    with pytest.raises(sansio.HboneProtocolError):
        server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 40)


def test_oversized_frame_is_rejected():
    client, server = pair()
    header = (2 * 1024 * 1024).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    with pytest.raises(sansio.HboneProtocolError) as info:
        server.receive_data(header)
    assert info.value.error_code == sansio.ErrorCode.FRAME_SIZE_ERROR


def test_peer_reset_and_goaway_are_reported():
    client, server = pair()
    sid = client.open_tunnel("10.0.0.2:80")
    exchange(client, server)
    client.reset(sid)
    _, s_events = exchange(client, server)
    assert sansio.TunnelReset(sid, sansio.ErrorCode.CANCEL, remote=True) in s_events
    server.close()
    c_events, _ = exchange(client, server)
    assert any(isinstance(e, sansio.ConnectionTerminated) and e.error_code == 0 for e in c_events)


def test_stream_limit_follows_peer_settings():
    client, server = pair()
    assert client.max_streams == 100  # min(pool cap 100, server's 200)


def test_keepalive_pings_stop_quietly_once_a_goaway_went_either_way():
    client, server = pair()
    client.ping(b"12345678")  # a live connection pings
    assert [type(f) for f in frames(client.data_to_send())] == [hf.PingFrame]
    # Draining (our GOAWAY sent) or told to go (theirs received): a keepalive tick must not
    # fail, or the proxy's whole connection pool goes down with it.
    server.close()
    exchange(client, server)
    client.ping(b"12345678")
    server.ping(b"12345678")
    assert client.data_to_send() == b"" and server.data_to_send() == b""
