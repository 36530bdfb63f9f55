"""`ambientctl observe` against proxies served on loopback: merging, filters, follow, failures."""

from __future__ import annotations

import dataclasses
import random
from functools import partial

import pytest
import trio

from ambientctl.cli import main
from ambientctl.observe import FollowEnd, follow_flows, format_event, last_matching, recent_flows
from ambientctl.proxies import MeshProxy
from meshcore.admin import serve_http
from meshcore.flows import FlowBroadcaster, FlowEvent, FlowFilter, FlowPeer, HttpSummary, flows_routes

T0 = 1_790_000_000.0


def flow(seconds: float, proxy: str, **changes) -> FlowEvent:
    base = FlowEvent(
        time=T0 + seconds,
        proxy=proxy,
        reporter="destination",
        source=FlowPeer("client-1", "shop", "spiffe://cluster.local/ns/shop/sa/client", "198.18.1.5:40112"),
        destination=FlowPeer("reviews-v1-a", "books", "spiffe://cluster.local/ns/books/sa/reviews", "198.18.2.9:9080"),
        verdict="allowed",
        policy=None,
        bytes_sent=10,
        bytes_received=20,
        duration_ms=1.5,
        flags="-",
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture
async def proxies(nursery):
    """Two live ztunnel-like proxies on one port of two loopback IPs, and a third that is down."""
    net = f"127.{random.randint(20, 250)}.{random.randint(0, 255)}"
    flows = {"node-1": FlowBroadcaster("node-1", subscriber_queue=2), "node-2": FlowBroadcaster("node-2")}
    port = await nursery.start(serve_http, (f"{net}.1", 0), flows_routes(flows["node-1"]))
    await nursery.start(serve_http, (f"{net}.2", port), flows_routes(flows["node-2"]))
    listed = [MeshProxy("ztunnel", name, f"{net}.{i}") for i, name in enumerate(("node-1", "node-2", "node-3"), start=1)]
    return listed, flows, port


async def test_recent_events_are_merged_by_time_and_a_dead_proxy_is_named(proxies):
    listed, flows, port = proxies
    flows["node-1"].publish(flow(1, "node-1"))
    flows["node-1"].publish(flow(3, "node-1"))
    flows["node-2"].publish(flow(2, "node-2", verdict="denied", policy="books/deny-shop"))
    warnings: list[str] = []
    events, answered = await recent_flows(listed, warn=warnings.append, port=port)
    assert [(e.proxy, e.time - T0) for e in events] == [("node-1", 1), ("node-2", 2), ("node-1", 3)]
    assert answered == 2
    [warning] = warnings
    assert warning.startswith(f"ztunnel node-3 ({listed[2].address}:{port}) did not answer")
    assert [e.policy for e in last_matching(events, FlowFilter(verdict="denied"), 20)] == ["books/deny-shop"]
    assert [e.time - T0 for e in last_matching(events, FlowFilter(), 2)] == [2, 3]


async def test_follow_shows_the_last_events_then_new_ones_and_reports_lost_ones(proxies):
    listed, flows, port = proxies
    flows["node-2"].publish(flow(1, "node-2", destination=FlowPeer("ratings-1", "books")))
    flows["node-2"].publish(flow(2, "node-2"))
    shown: list[FlowEvent] = []
    warnings: list[str] = []
    only_reviews = FlowFilter(pod="books/reviews")
    follow = partial(follow_flows, lambda: listed, only_reviews, last=5, show=shown.append, warn=warnings.append, port=port)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        with trio.fail_after(5):
            while not shown:
                await trio.sleep(0.01)
        assert [e.time - T0 for e in shown] == [2]  # the recent one that matches
        flows["node-2"].publish(flow(4, "node-2", destination=FlowPeer("ratings-1", "books")))  # filtered out
        for n in range(5):  # node-1 holds 2 for this follower and drops 3
            flows["node-1"].publish(flow(10 + n, "node-1"))
        with trio.fail_after(5):
            while len(shown) < 3 or not any("dropped" in w for w in warnings):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert [(e.proxy, e.time - T0) for e in shown] == [("node-2", 2), ("node-1", 10), ("node-1", 11)]
    assert "node-1 dropped 3 events: this reader fell behind" in warnings
    assert any(w.startswith("ztunnel node-3") for w in warnings)


async def test_follow_picks_up_new_proxies_and_reports_a_dead_one_once(proxies):
    listed, flows, port = proxies
    discovered = [listed[0], listed[2]]  # node-2 is not listed yet; node-3 is down
    shown: list[FlowEvent] = []
    warnings: list[str] = []
    follow = partial(follow_flows, lambda: list(discovered), FlowFilter(), last=None, show=shown.append,
                     warn=warnings.append, port=port, rediscover_seconds=0.05)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        with trio.fail_after(5):
            while not flows["node-1"].subscribers:
                await trio.sleep(0.01)
        discovered.append(listed[1])  # a waypoint was applied
        with trio.fail_after(5):
            while not flows["node-2"].subscribers:
                await trio.sleep(0.01)
        flows["node-2"].publish(flow(1, "node-2"))
        with trio.fail_after(5):
            while not shown:
                await trio.sleep(0.01)
        await trio.sleep(0.3)  # several more discoveries of the dead node-3
        nursery.cancel_scope.cancel()
    assert [e.proxy for e in shown] == ["node-2"]
    assert len([w for w in warnings if w.startswith("ztunnel node-3")]) == 1


async def test_follow_ends_when_no_proxy_answers_or_the_mesh_is_gone(proxies):
    listed, _, port = proxies
    def follow(discover):
        return follow_flows(discover, FlowFilter(), last=None, show=print, warn=lambda _: None, port=port, rediscover_seconds=0.05)

    with trio.fail_after(5):
        assert await follow(lambda: [listed[2]]) is FollowEnd.NO_PROXY_ANSWERED
        listings = iter([[listed[0]], []])
        assert await follow(lambda: next(listings, [])) is FollowEnd.MESH_STOPPED


def test_a_line_says_who_what_verdict_policy_and_the_request():
    denied = flow(0, "shop/waypoint", reporter="waypoint", verdict="denied", policy="books/deny-shop",
                  http=HttpSummary("POST", "/reviews/1", "reviews:9080", 403))
    line = format_event(denied)
    assert "shop/client-1 -> books/reviews-v1-a DENIED policy=books/deny-shop (waypoint shop/waypoint)" in line
    assert "http POST reviews:9080/reviews/1 403" in line
    assert "tcp sent=10B received=20B" in format_event(flow(0, "node-1"))


def test_without_a_mesh_observe_says_so_and_fails(tmp_path, capsys):
    assert main(["observe", "--run-dir", str(tmp_path)]) == 1
    assert "no mesh running" in capsys.readouterr().err
