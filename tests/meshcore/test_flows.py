"""Flow events: JSON form, filters, the recent-events ring, slow followers, the HTTP stream."""

from __future__ import annotations

import dataclasses
import json

import pytest
import trio

from meshcore.admin import serve_http
from meshcore.flows import (
    FlowBroadcaster,
    FlowEvent,
    FlowFilter,
    FlowFormatError,
    FlowPeer,
    HttpSummary,
    LostEvents,
    TooManySubscribers,
    flows_routes,
    parse_line,
)


def event(n: int = 0, **changes) -> FlowEvent:
    base = FlowEvent(
        time=1_790_000_000.123456 + n,
        proxy="node-1",
        reporter="destination",
        source=FlowPeer("client-7d9f", "shop", "spiffe://cluster.local/ns/shop/sa/client", "198.18.1.5:40112"),
        destination=FlowPeer(
            "reviews-v1-abc", "books", "spiffe://cluster.local/ns/books/sa/reviews", "198.18.2.9:9080",
            "reviews.books.svc.cluster.local",
        ),
        verdict="allowed",
        policy="books/allow-shop",
        bytes_sent=100 + n,
        bytes_received=2048,
        duration_ms=12.5,
        flags="-",
    )
    return dataclasses.replace(base, **changes)


# --- JSON ---


@pytest.mark.parametrize("http", [None, HttpSummary("GET", "/reviews/1", "reviews:9080", 200)])
def test_an_event_survives_its_json_line(http):
    original = event(http=http)
    line = json.dumps(original.to_json())
    parsed = parse_line(line)
    assert parsed.to_json() == original.to_json()
    assert parsed.time == pytest.approx(original.time, abs=1e-6)
    assert original.to_json()["time"] == "2026-09-21T14:13:20.123456Z"


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("verdict",), "dropped", "verdict"),
        (("time",), "yesterday", "time"),
        (("time",), "2026-09-21T14:13:20", "time"),
        (("destination", "address"), 9080, "destination.address"),
        (("bytes_sent",), -1, "bytes_sent"),
        (("http",), {"method": "GET", "path": "/", "authority": "a", "status": "200"}, "http.status"),
        (("source",), "client", "source"),
    ],
)
def test_a_malformed_event_names_the_field(path, value, field):
    data = event().to_json()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(FlowFormatError) as caught:
        parse_line(json.dumps(data))
    assert caught.value.field == field


def test_lost_events_and_garbage_lines():
    assert parse_line('{"lost_events": 7, "proxy": "node-2"}') == LostEvents("node-2", 7)
    with pytest.raises(FlowFormatError, match="not JSON"):
        parse_line("<html>")


# --- Filters ---


def test_filters_match_either_end_and_combine():
    allowed, denied = event(), event(verdict="denied", policy="books/deny-all")
    assert FlowFilter().matches(allowed)
    assert FlowFilter(namespace="shop").matches(allowed)
    assert FlowFilter(namespace="books").matches(allowed)
    assert not FlowFilter(namespace="default").matches(allowed)
    assert FlowFilter(pod="reviews").matches(allowed)  # a prefix: the deployment's pods
    assert FlowFilter(pod="books/reviews-v1").matches(allowed)
    assert not FlowFilter(pod="shop/reviews").matches(allowed)  # reviews is not in shop
    assert not FlowFilter(pod="ratings").matches(allowed)
    assert FlowFilter(verdict="denied").matches(denied) and not FlowFilter(verdict="denied").matches(allowed)
    assert not FlowFilter(namespace="shop", verdict="denied").matches(allowed)


# --- Broadcaster ---


def test_the_ring_keeps_the_newest_events():
    flows = FlowBroadcaster("node-1", history=3)
    for n in range(5):
        flows.publish(event(n))
    assert [e.bytes_sent for e in flows.recent()] == [102, 103, 104]


async def test_an_event_published_as_a_maker_is_made_only_when_read():
    made: list[int] = []

    def maker(n: int):
        def make() -> FlowEvent:
            made.append(n)
            return event(n)

        return make

    flows = FlowBroadcaster("node-1")
    flows.publish(maker(1))
    assert made == []  # nobody follows: nothing is built on the data path
    with flows.subscribe() as follower:
        flows.publish(maker(2))
        assert made == [2]  # a follower gets the event at once
        assert await follower.receive() == event(2)
    assert flows.recent() == (event(1), event(2))


async def test_a_slow_subscriber_loses_events_and_is_told_how_many():
    flows = FlowBroadcaster("node-1", subscriber_queue=3)
    with flows.subscribe() as slow:
        for n in range(10):
            flows.publish(event(n))  # never waits, however far behind the subscriber is
        got = [await slow.receive() for _ in range(4)]
        assert [e.bytes_sent for e in got[:3]] == [100, 101, 102]
        assert got[3] == LostEvents("node-1", 7)
        flows.publish(event(10))
        flows.publish(event(11))
        assert [(await slow.receive()).bytes_sent for _ in range(2)] == [110, 111]


async def test_a_gap_is_reported_where_it_happened():
    flows = FlowBroadcaster("node-1", subscriber_queue=2)
    with flows.subscribe() as slow:
        for n in range(4):  # 0, 1 queued; 2, 3 lost
            flows.publish(event(n))
        assert (await slow.receive()).bytes_sent == 100
        flows.publish(event(4))  # room again: after the gap
        assert [await slow.receive() for _ in range(3)] == [event(1), LostEvents("node-1", 2), event(4)]


async def test_subscribers_are_limited_and_closing_frees_a_place():
    flows = FlowBroadcaster("node-1", max_subscribers=1)
    first = flows.subscribe()
    with pytest.raises(TooManySubscribers):
        flows.subscribe()
    first.close()
    with flows.subscribe():
        assert flows.subscribers == 1
    assert flows.subscribers == 0


async def test_receive_waits_for_the_next_event():
    flows = FlowBroadcaster("node-1")
    with flows.subscribe() as subscription:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: trio.sleep(0.05))
            nursery.start_soon(lambda: _publish_later(flows, event(1)))
            with trio.fail_after(2):
                assert await subscription.receive() == event(1)


async def _publish_later(flows: FlowBroadcaster, item: FlowEvent) -> None:
    await trio.sleep(0.05)
    flows.publish(item)


# --- HTTP ---


async def _get(port: int, target: str) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"GET {target} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n".encode())
    return stream


async def _read_until(stream: trio.SocketStream, received: bytes, marker: bytes) -> bytes:
    """`received` plus what arrives until `marker` is in it."""
    with trio.fail_after(5):
        while marker not in received:
            chunk = await stream.receive_some(65536)
            assert chunk, f"connection closed before {marker!r}; got {received!r}"
            received += chunk
    return received


async def test_the_endpoint_serves_recent_events_then_follows_live(nursery):
    flows = FlowBroadcaster("node-1")
    flows.publish(event(1))
    port = await nursery.start(serve_http, ("127.0.0.1", 0), flows_routes(flows))

    received, stream = b"", await _get(port, "/debug/flows")
    async with stream:
        received = await _read_until(stream, received, b"\r\n\r\n")
        while chunk := await stream.receive_some(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"200 OK" in head and b"application/x-ndjson" in head
    assert [parse_line(line) for line in body.splitlines()] == [event(1)]

    received, stream = b"", await _get(port, "/debug/flows?follow=1")
    async with stream:
        received = await _read_until(stream, received, b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in received.lower()
        flows.publish(event(2))
        received = await _read_until(stream, received, b'"bytes_sent":102')
        assert b'"bytes_sent":101' not in received  # follow starts from now
    # The follower left: the server notices and unsubscribes it.
    with trio.fail_after(5):
        while flows.subscribers:
            await trio.sleep(0.01)


async def test_the_endpoint_refuses_bad_parameters_and_too_many_followers(nursery):
    flows = FlowBroadcaster("node-1", max_subscribers=1)
    port = await nursery.start(serve_http, ("127.0.0.1", 0), flows_routes(flows))
    received, stream = b"", await _get(port, "/debug/flows?follow=maybe")
    async with stream:
        received = await _read_until(stream, received, b"maybe")
    assert received.startswith(b"HTTP/1.1 400") and b"follow" in received

    received, first = b"", await _get(port, "/debug/flows?follow=1")
    async with first:
        await _read_until(first, received, b"\r\n\r\n")
        received, second = b"", await _get(port, "/debug/flows?follow=true")
        async with second:
            received = await _read_until(second, received, b"later")
        assert received.startswith(b"HTTP/1.1 503")
