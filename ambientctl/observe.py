"""`ambientctl observe`: the mesh's connections and requests as they happen, like `hubble observe`.

    ambientctl observe [--follow] [--namespace N] [--pod [NS/]P] [--verdict allowed|denied]
                       [--last K] [-o json]

Every ztunnel and waypoint of the running one-machine mesh keeps its recent flow events and
streams new ones (`GET /debug/flows[?follow=1]` on :15020, see meshcore/flows.py). This
command reads all of them at once, merges them by time and filters them. Without --follow it
prints the last K (default 20) matching events and exits; with --follow it prints the last K
(only if --last is given) and then every new matching event until Ctrl-C.

--namespace and --pod match either end of a flow; --pod takes a name prefix, so a
Deployment's name selects its pods. One line per event, or one JSON object per line with
`-o json`. A proxy that does not answer, stops streaming or drops events for a slow reader is
a warning on stderr naming it; the others go on.
Exit status: 0 printed; 1 no mesh runs or no proxy answered; 2 usage errors.
"""

from __future__ import annotations

import argparse
import enum
import json
import math
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import h11
import trio

from ambientctl.proxies import MeshProxy, local_proxies
from ambientctl.runtime import RunDir
from meshcore.flows import VERDICTS, FlowEvent, FlowFilter, FlowFormatError, FlowPeer, LostEvents, parse_line

FLOWS_PORT = 15020
FLOWS_PATH = "/debug/flows"
DEFAULT_LAST = 20
# A proxy that takes longer than this to connect and answer (or, without --follow, to send
# its recent events) is reported as not answering.
ANSWER_TIMEOUT_SECONDS = 3.0
_RECEIVE_CHUNK = 64 * 1024
# How often --follow lists the mesh's proxies again (new waypoints, restarted ztunnels).
REDISCOVER_SECONDS = 2.0
# Events waiting to be printed; when full, readers wait and the proxies drop for us (and say so).
_PENDING_EVENTS = 1000

Warn = Callable[[str], None]


class ProxyUnavailable(Exception):
    """A proxy could not be read; the message says which and why."""


# --- reading one proxy ---


def _describe(proxy: MeshProxy, port: int) -> str:
    return f"{proxy.kind} {proxy.name} ({proxy.address}:{port})"


async def read_proxy(
    proxy: MeshProxy,
    *,
    follow: bool,
    deliver: Callable[[FlowEvent | LostEvents], Awaitable[None]],
    warn: Warn,
    port: int = FLOWS_PORT,
    on_answer: Callable[[], None] = lambda: None,
) -> None:
    """Pass `proxy`'s events to `deliver` until its response ends; `on_answer` is called once
    the proxy answered (from then on, with --follow, no event is missed). Raises ProxyUnavailable."""
    where = _describe(proxy, port)
    target = FLOWS_PATH + ("?follow=1" if follow else "")
    conn = h11.Connection(h11.CLIENT)
    deadline = trio.current_time() + ANSWER_TIMEOUT_SECONDS
    try:
        with trio.fail_at(deadline):
            stream = await trio.open_tcp_stream(proxy.address, port)
        async with stream:
            request = h11.Request(method="GET", target=target, headers=[("host", f"{proxy.address}:{port}"), ("connection", "close")])
            with trio.fail_at(deadline):
                await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
                head = await _next_event(stream, conn)
                if not isinstance(head, h11.Response):
                    raise ProxyUnavailable(f"{where} closed the connection without answering")
                if head.status_code != 200:
                    body = await _rest_of_body(stream, conn)
                    raise ProxyUnavailable(f"{where} answered {head.status_code}: {body.decode(errors='replace').strip()}")
            on_answer()
            with trio.fail_at(math.inf if follow else deadline):
                pending = b""
                while isinstance(event := await _next_event(stream, conn), h11.Data):
                    *lines, pending = (pending + event.data).split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        try:
                            item = parse_line(line)
                        except FlowFormatError as exc:
                            warn(f"{where} sent an event that is not understood: {exc}")
                            continue
                        await deliver(item)
    except trio.TooSlowError:
        raise ProxyUnavailable(f"{where} did not answer within {ANSWER_TIMEOUT_SECONDS:g}s") from None
    except (OSError, trio.BrokenResourceError) as exc:
        raise ProxyUnavailable(f"{where} did not answer: {exc}") from None
    except h11.RemoteProtocolError as exc:
        raise ProxyUnavailable(f"{where} sent malformed HTTP: {exc}") from None


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> Any:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await stream.receive_some(_RECEIVE_CHUNK))
    return event


async def _rest_of_body(stream: trio.SocketStream, conn: h11.Connection) -> bytes:
    body = b""
    while isinstance(event := await _next_event(stream, conn), h11.Data):
        body += event.data
    return body


# --- all proxies ---


async def recent_flows(proxies: Sequence[MeshProxy], *, warn: Warn, port: int = FLOWS_PORT) -> tuple[list[FlowEvent], int]:
    """Every proxy's recent events, oldest first, and how many proxies answered."""
    events: list[FlowEvent] = []
    answered = 0

    async def keep(item: FlowEvent | LostEvents) -> None:
        if isinstance(item, FlowEvent):
            events.append(item)

    async def read(proxy: MeshProxy) -> None:
        nonlocal answered
        try:
            await read_proxy(proxy, follow=False, deliver=keep, warn=warn, port=port)
            answered += 1
        except ProxyUnavailable as exc:
            warn(str(exc))

    async with trio.open_nursery() as nursery:
        for proxy in proxies:
            nursery.start_soon(read, proxy)
    events.sort(key=lambda event: event.time)
    return events, answered


def last_matching(events: Sequence[FlowEvent], flow_filter: FlowFilter, last: int) -> list[FlowEvent]:
    matching = [event for event in events if flow_filter.matches(event)]
    return matching[-last:]


class FollowEnd(enum.Enum):
    """Why following stopped by itself (Ctrl-C cancels it instead)."""

    NO_PROXY_ANSWERED = "none of the mesh's proxies answered"
    MESH_STOPPED = "the mesh stopped"


async def follow_flows(
    discover: Callable[[], Sequence[MeshProxy]],
    flow_filter: FlowFilter,
    *,
    last: int | None,
    show: Callable[[FlowEvent], None],
    warn: Warn,
    port: int = FLOWS_PORT,
    rediscover_seconds: float = REDISCOVER_SECONDS,
) -> FollowEnd:
    """Show new matching events of every proxy `discover` lists, until cancelled.

    The live streams are opened first and the recent events (`last`) read after, so nothing
    happens unseen in between; an event that is in both is shown once. Proxies are listed
    again every `rediscover_seconds`: a new waypoint is followed too, and a proxy that stopped
    streaming (a restarted ztunnel) is followed again once it answers; each problem is
    reported once. Returns only when no proxy answered at the start or none is listed any more.
    """
    send, receive = trio.open_memory_channel[FlowEvent | LostEvents](_PENDING_EVENTS)
    running: set[MeshProxy] = set()  # a stream task is reading it
    answering: list[MeshProxy] = []  # answered (the first of them also give the recent events)
    unavailable: set[MeshProxy] = set()  # its problem was reported; it will be tried again

    async def stream(proxy: MeshProxy, sender: trio.MemorySendChannel[FlowEvent | LostEvents], settle: trio.Event) -> None:
        def on_answer() -> None:
            answering.append(proxy)
            if proxy in unavailable:
                unavailable.discard(proxy)
                warn(f"{_describe(proxy, port)} answers again")
            settle.set()

        async with sender:
            try:
                await read_proxy(proxy, follow=True, deliver=sender.send, warn=warn, port=port, on_answer=on_answer)
                problem = f"{_describe(proxy, port)} stopped streaming"
            except ProxyUnavailable as exc:
                problem = str(exc)
            finally:
                running.discard(proxy)
                settle.set()
        if proxy not in unavailable:
            unavailable.add(proxy)
            warn(problem)

    def start(nursery: trio.Nursery, proxies: Sequence[MeshProxy]) -> list[trio.Event]:
        """Start reading the listed proxies not read yet; each event is set once it answered or failed."""
        settled = []
        for proxy in proxies:
            if proxy not in running:
                running.add(proxy)
                settled.append(trio.Event())
                nursery.start_soon(stream, proxy, send.clone(), settled[-1])
        return settled

    async def rediscover(nursery: trio.Nursery) -> None:
        while proxies := await trio.to_thread.run_sync(discover):
            start(nursery, proxies)
            await trio.sleep(rediscover_seconds)
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for settle in start(nursery, await trio.to_thread.run_sync(discover)):
            await settle.wait()
        if not answering:
            nursery.cancel_scope.cancel()
            return FollowEnd.NO_PROXY_ANSWERED
        nursery.start_soon(rediscover, nursery)
        shown: set[FlowEvent] = set()
        if last is not None:
            recent, _ = await recent_flows(answering, warn=warn, port=port)
            for event in last_matching(recent, flow_filter, last):
                show(event)
                shown.add(event)
        async for item in receive:
            if isinstance(item, LostEvents):
                warn(f"{item.proxy} dropped {item.count} events: this reader fell behind")
            elif item not in shown and flow_filter.matches(item):
                show(item)
    return FollowEnd.MESH_STOPPED  # rediscover found no proxy and ended the nursery


# --- output ---


def format_event(event: FlowEvent) -> str:
    """One line like hubble's: time, source -> destination, verdict, policy, who saw it, what."""
    moment = datetime.fromtimestamp(event.time).strftime("%b %d %H:%M:%S.%f")[:-3]
    parts = [
        f"{moment}:",
        _peer(event.source),
        "->",
        _peer(event.destination),
        event.verdict.upper(),
        f"policy={event.policy or '-'}",
        f"({event.reporter} {event.proxy})",
    ]
    if event.http is not None:
        http = event.http
        parts.append(f"http {http.method} {http.authority}{http.path} {http.status or 'no response'}")
    else:
        parts.append(f"tcp sent={event.bytes_sent}B received={event.bytes_received}B")
    parts.append(f"{event.duration_ms:.1f}ms")
    if event.flags != "-":
        parts.append(f"flags={event.flags}")
    return " ".join(parts)


def _peer(peer: FlowPeer) -> str:
    if peer.workload is not None:
        return f"{peer.namespace}/{peer.workload}" if peer.namespace else peer.workload
    return peer.service or peer.address or "unknown"


# --- the command ---


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    observe = commands.add_parser(
        "observe", parents=[common], help="live connection and request events (like `hubble observe`)",
        description=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    observe.add_argument("-f", "--follow", action="store_true", help="keep printing new events until Ctrl-C")
    observe.add_argument("-n", "--namespace", help="only flows from or to this namespace")
    observe.add_argument("--pod", metavar="[NS/]POD", help="only flows from or to pods whose name starts with POD")
    observe.add_argument("--verdict", choices=VERDICTS, help="only allowed or only denied flows")
    observe.add_argument("--last", type=int, metavar="K", help=f"how many recent events to print (default: {DEFAULT_LAST} without --follow)")
    observe.add_argument("-o", "--output", choices=("json",), help="one JSON object per line")
    observe.set_defaults(command=_observe)


def _observe(args: argparse.Namespace, run_dir: RunDir) -> int:
    if args.last is not None and args.last < 1:
        print(f"error: --last must be at least 1, got {args.last}", file=sys.stderr)
        return 2
    proxies = local_proxies(run_dir)
    if not proxies:
        print(f"error: no mesh running in {run_dir.root} (start one with `ambientctl up`)", file=sys.stderr)
        return 1
    flow_filter = FlowFilter(namespace=args.namespace, pod=args.pod, verdict=args.verdict)
    render = (lambda event: json.dumps(event.to_json())) if args.output == "json" else format_event

    def show(event: FlowEvent) -> None:
        print(render(event), flush=True)

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    if not args.follow:
        events, answered = trio.run(lambda: recent_flows(proxies, warn=warn))
        for event in last_matching(events, flow_filter, args.last or DEFAULT_LAST):
            show(event)
        return 0 if answered else _none_answered(len(proxies))
    async def follow_until_interrupted() -> FollowEnd | None:
        end = None  # stopped by Ctrl-C
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(stop_on_signal)
                end = await follow_flows(lambda: local_proxies(run_dir), flow_filter, last=args.last, show=show, warn=warn)
                nursery.cancel_scope.cancel()
        return end

    end = trio.run(follow_until_interrupted)
    if end is not None:
        print(f"error: {end.value} (run dir {run_dir.root})", file=sys.stderr)
        return 1
    return 0


def _none_answered(count: int) -> int:
    print(f"error: none of the mesh's {count} proxies answered", file=sys.stderr)
    return 1
