"""The waypoint's downstream HTTP/2 server (the trio shell in waypoint/http2.py over the
sans-IO connection in waypoint/http2_wire.py) under concurrency: storms of streams with
client resets mixed into completions, handlers blocked on reads or on flow control when their
stream is reset, handler failures, teardown with busy and idle stream workers, and many
streams interleaving multi-frame responses on one connection.

The client is a bare h2 connection on an in-memory stream, so each test decides frame by frame
what the client sends and which streams it stops acknowledging. The server is `_H2Server`,
which `serve_http2` runs as is, so a test can look at its stream workers afterwards.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from unittest import mock

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hypothesis
import hypothesis.strategies as st
import pytest
import structlog.testing
import trio
import trio.testing

from waypoint import http2
from waypoint.http2 import MAX_IDLE_WORKERS, Http2ClientConnection, _H2Server, serve_http2
from waypoint.messages import BufferedBody, Request, Response
from waypoint.settings import HttpLimits

Codes = h2.errors.ErrorCodes
SettingCodes = h2.settings.SettingCodes
# Resets in these tests are the client's right, not a flood.
LIMITS = HttpLimits(max_header_bytes=4096, max_concurrent_streams=50, rapid_reset_limit=1000)
# The client grants a large connection window, so only the stream window (65,535 by default)
# throttles a response: holding back one stream's acknowledgements stalls that stream only.
CLIENT_CONNECTION_WINDOW = 64 * 1024 * 1024
# The server's stream window in the storms: small, so request bodies need WINDOW_UPDATE too.
SMALL_STREAM_WINDOW = 65_535
# Virtual seconds (autojump clock) after which a test that is still waiting has hung.
HANG = 60


def pattern(seed: int, size: int) -> bytes:
    """`size` recognisable bytes: a body mixed up with another stream's shows."""
    unit = seed.to_bytes(4, "big") + bytes(range(251))
    return (unit * (size // len(unit) + 1))[:size]


# --- client ---


@dataclass
class Received:
    """What the client got on one stream."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[str, str] = field(default_factory=dict)
    ended: bool = False
    reset: int | None = None  # RST_STREAM code from the server
    reset_by_client: bool = False


class Client:
    """A bare h2 client: a reader task records what each stream receives and acknowledges
    DATA as it arrives, except on streams in `held` (their window closes)."""

    def __init__(self, stream: trio.abc.Stream, settings: dict[int, int] | None = None) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="latin-1", validate_outbound_headers=False))
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(settings)
        self.h2.increment_flow_control_window(CLIENT_CONNECTION_WINDOW - 65_535)
        self.streams: dict[int, Received] = {}
        self.held: set[int] = set()
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.settings_acked = 0
        self.closed = False
        self._changed = trio.Event()
        self._lock = trio.Lock()

    async def run(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(65_536)
                if not data:
                    break
                for event in self.h2.receive_data(data):
                    self._on(event)
                await self.flush()
                self._notify()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed = True
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event
            return
        if isinstance(event, h2.events.SettingsAcknowledged):
            self.settings_acked += 1
            return
        received = self.streams.get(getattr(event, "stream_id", 0))
        if received is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            received.headers = dict(event.headers)
            received.status = int(received.headers[":status"])
        elif isinstance(event, h2.events.DataReceived):
            received.body += event.data
            if event.stream_id not in self.held:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            received.trailers = dict(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            received.ended = True
        elif isinstance(event, h2.events.StreamReset):
            received.reset = event.error_code

    async def flush(self) -> None:
        async with self._lock:
            data = self.h2.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            if self.closed:
                raise AssertionError("the server closed the connection")
            await self._changed.wait()

    async def request(self, path: str, *, method: str = "GET", headers=(), end_stream: bool = True) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.streams[stream_id] = Received()
        fields = [(":method", method), (":scheme", "http"), (":authority", "svc"), (":path", path), *headers]
        self.h2.send_headers(stream_id, fields, end_stream=end_stream)
        await self.flush()
        return stream_id

    def _window(self, stream_id: int) -> int:
        try:
            return self.h2.local_flow_control_window(stream_id)
        except h2.exceptions.StreamClosedError:
            return 0

    async def send_body(self, stream_id: int, data: bytes, *, end_stream: bool = True, chunk: int = 16_384, pause: float = 0.0) -> None:
        """Send `data` under the server's flow control (stops if the stream is reset)."""
        received = self.streams[stream_id]
        while data:
            await self.until(lambda: received.reset is not None or received.reset_by_client or self._window(stream_id) > 0)
            if received.reset is not None or received.reset_by_client:
                return
            size = min(len(data), chunk, self._window(stream_id))
            self.h2.send_data(stream_id, data[:size])
            data = data[size:]
            await self.flush()
            if pause:
                await trio.sleep(pause)
        if end_stream:
            self.h2.end_stream(stream_id)
            await self.flush()

    async def reset(self, stream_id: int) -> None:
        self.streams[stream_id].reset_by_client = True
        self.h2.reset_stream(stream_id, Codes.CANCEL)
        await self.flush()

    async def response(self, stream_id: int) -> Received:
        received = self.streams[stream_id]
        await self.until(lambda: received.ended or received.reset is not None)
        return received

    async def get(self, path: str = "/") -> Received:
        return await self.response(await self.request(path))


@dataclass
class Served:
    server: _H2Server
    client: Client
    returned: trio.Event  # the server's run() returned (it never raises: the test fails)


@asynccontextmanager
async def serving(handler, limits: HttpLimits = LIMITS, *, settings: dict[int, int] | None = None) -> AsyncIterator[Served]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server = _H2Server(server_stream, handler, limits)
    returned = trio.Event()

    async def serve() -> None:
        await server.run(b"")
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        client = Client(client_stream, settings)
        await client.flush()
        nursery.start_soon(client.run)
        yield Served(server, client, returned)
        nursery.cancel_scope.cancel()


def busy_workers(server: _H2Server) -> int:
    assert server._handlers is not None
    return len(server._handlers.child_tasks) - len(server._idle_workers)


async def read_all(body) -> bytes:
    data = b""
    while chunk := await body.read():
        data += chunk
    return data


class ChunkedBody:
    """A response body handed out in the given chunk sizes, with a checkpoint between."""

    def __init__(self, data: bytes, sizes: list[int], trailers=()) -> None:
        self._data = data
        self._sizes = sizes
        self._trailers = tuple(trailers)

    async def read(self) -> bytes:
        await trio.sleep(0)
        size = self._sizes.pop(0) if self._sizes else len(self._data)
        chunk, self._data = self._data[:size], self._data[size:]
        return chunk

    @property
    def trailers(self):
        return self._trailers

    async def aclose(self) -> None:
        pass


class StallingBody:
    """Hands out `first`, then blocks forever (a response the handler cannot finish)."""

    def __init__(self, first: bytes, stalled: trio.Event) -> None:
        self._first = first
        self._stalled = stalled

    async def read(self) -> bytes:
        if self._first:
            first, self._first = self._first, b""
            return first
        self._stalled.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    @property
    def trailers(self):
        return ()

    async def aclose(self) -> None:
        pass


class Tracker:
    """Which handlers started, were cancelled, or ended otherwise."""

    def __init__(self) -> None:
        self.started: dict[str, trio.Event] = {}
        self.cancelled: Counter[str] = Counter()
        self.failed: dict[str, BaseException] = {}
        self.running = 0

    def event(self, path: str) -> trio.Event:
        return self.started.setdefault(path, trio.Event())

    def wrap(self, handler):
        async def tracked(request: Request, respond) -> None:
            self.running += 1
            try:
                await handler(request, respond)
            except trio.Cancelled:
                self.cancelled[request.target] += 1
                raise
            except BaseException as exc:
                self.failed[request.target] = exc
                raise
            finally:
                self.running -= 1

        return tracked


# --- storms: completions with client resets mixed in ---

FATES = ("ok", "raise", "silent", "reset_waiting", "reset_reading", "reset_sending", "reset_window")


@dataclass(frozen=True)
class Plan:
    fate: str
    request_size: int  # 0: the request ends with its head
    response_size: int
    delay: float  # how long the handler works before answering (virtual time)


async def run_storm(plans: list[Plan], seed: int, limits: HttpLimits = LIMITS) -> None:
    """Open every planned stream at once and drive them concurrently; assert what the client
    got on each stream, which handlers were cancelled, and that the server is left clean and
    still serving."""
    rng = random.Random(seed)
    tracker = Tracker()
    stalled = {f"/{n}": trio.Event() for n in range(len(plans))}
    opened: dict[str, int] = {}  # path -> stream id (drivers open streams in random order)

    async def handler(request: Request, respond) -> None:
        if request.target == "/after":
            await respond(Response(200, (), BufferedBody(b"still serving")))
            return
        n = int(request.target[1:])
        plan = plans[n]
        if plan.fate == "reset_waiting":
            tracker.event(request.target).set()
            await trio.sleep_forever()
        if plan.fate == "reset_reading":
            assert await request.body.read()  # the first chunk; the rest never comes
            tracker.event(request.target).set()
            await read_all(request.body)
            raise AssertionError("the body of a stream reset mid-body ended")
        body = await read_all(request.body)
        if body != pattern(n, plan.request_size):
            await respond(Response(422, (), BufferedBody(b"request body mixed up")))
            return
        await trio.sleep(plan.delay)
        if plan.fate == "raise":
            raise ValueError("handler bug")
        if plan.fate == "silent":
            return
        if plan.fate == "reset_sending":
            await respond(Response(200, (), StallingBody(b"x" * 1000, stalled[request.target])))
            return
        sizes = [rng.randint(1, 40_000) for _ in range(4)]
        await respond(Response(200, (("x-stream", str(n)),), ChunkedBody(pattern(n + 1000, plan.response_size), sizes)))

    async def drive(client: Client, n: int, plan: Plan) -> None:
        await trio.sleep(rng.random() * 0.01)
        path = f"/{n}"
        stream_id = opened[path] = await client.request(path, method="POST", end_stream=not plan.request_size)
        if plan.fate == "reset_window":
            client.held.add(stream_id)
        received = client.streams[stream_id]
        if plan.fate == "reset_reading":
            await client.send_body(stream_id, pattern(n, plan.request_size)[:1000], end_stream=False)
            await tracker.event(path).wait()
            await client.reset(stream_id)
            return
        if plan.request_size and plan.fate != "reset_waiting":  # that handler reads nothing
            await client.send_body(stream_id, pattern(n, plan.request_size), chunk=rng.choice((1000, 16_384)))
        if plan.fate == "reset_waiting":
            await tracker.event(path).wait()
        elif plan.fate == "reset_sending":
            await stalled[path].wait()
            await client.until(lambda: len(received.body) == 1000)
        elif plan.fate == "reset_window":  # the server waits for window it never gets
            await client.until(lambda: len(received.body) == 65_535)
            await trio.sleep(0.01)
        else:
            await client.response(stream_id)
            return
        assert not received.ended
        await client.reset(stream_id)

    with mock.patch.object(http2, "STREAM_WINDOW", SMALL_STREAM_WINDOW), trio.fail_after(HANG):
        async with serving(tracker.wrap(handler), limits) as served:
            client = served.client
            async with trio.open_nursery() as drivers:
                for n, plan in enumerate(plans):
                    drivers.start_soon(drive, client, n, plan)
            await trio.testing.wait_all_tasks_blocked()
            after = await client.get("/after")

            server = served.server
            assert (after.status, bytes(after.body)) == (200, b"still serving")
            assert client.terminated is None, "the server sent GOAWAY during the storm"
            assert busy_workers(server) == 0 and tracker.running == 0  # no handler left behind
            assert len(server._idle_workers) <= MAX_IDLE_WORKERS
            assert len(server._handlers.child_tasks) == len(server._idle_workers)
            assert server._streams == {}

    for n, plan in enumerate(plans):
        path = f"/{n}"
        got = client.streams[opened[path]]
        if plan.fate.startswith("reset"):
            assert tracker.cancelled[path] == 1, f"{path} ({plan.fate}): its handler was cancelled {tracker.cancelled[path]} times"
            assert path not in tracker.failed, f"{path} ({plan.fate}): handler saw {tracker.failed[path]!r} instead of a cancellation"
            continue
        assert tracker.cancelled[path] == 0, f"{path} ({plan.fate}) was not reset but its handler was cancelled"
        assert got.ended and got.reset is None, f"{path} ({plan.fate}) did not end cleanly: reset {got.reset}"
        if plan.fate == "ok":
            assert got.status == 200 and got.headers.get("x-stream") == str(n)
            assert bytes(got.body) == pattern(n + 1000, plan.response_size), f"{path}: the response body is wrong"
        elif plan.fate == "raise":
            assert got.status == 500 and b"internal error" in got.body
        else:
            assert (got.status, bytes(got.body)) == (500, b"no response was produced\n")


async def test_storm_of_50_streams_with_resets_mixed_into_completions(autojump_clock):
    rng = random.Random(7)
    fates = ["ok"] * 26 + ["raise", "silent"] * 3 + [fate for fate in FATES if fate.startswith("reset")] * 4 + ["reset_waiting"] * 2
    rng.shuffle(fates)
    plans = [
        Plan(
            fate,
            request_size=rng.choice((0, 0, 500, 70_000, 150_000)) if fate != "reset_reading" else 100_000,
            response_size=rng.choice((0, 100, 20_000, 70_000, 200_000)) if fate != "reset_window" else 200_000,
            delay=rng.random() * 0.05,
        )
        for fate in fates
    ]
    assert len(plans) == LIMITS.max_concurrent_streams
    await run_storm(plans, seed=7)


@st.composite
def _plan(draw) -> Plan:
    fate = draw(st.sampled_from(FATES))
    # a stream reset mid-body needs a body longer than its first chunk; one reset while
    # blocked on window needs a response longer than the client's window
    request_size = draw(st.sampled_from((70_000,) if fate == "reset_reading" else (0, 1, 16_384, 70_000)))
    response_size = draw(st.sampled_from((140_000,) if fate == "reset_window" else (0, 1, 16_385, 70_000, 140_000)))
    return Plan(fate, request_size, response_size, delay=draw(st.sampled_from((0.0, 0.001, 0.02))))


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(plans=st.lists(_plan(), min_size=1, max_size=24), seed=st.integers(0, 2**16))
def test_random_storms_leave_every_stream_answered_or_cancelled_exactly_once(plans, seed):
    limits = HttpLimits(max_header_bytes=4096, max_concurrent_streams=len(plans) + 1, rapid_reset_limit=1000)
    trio.run(run_storm, plans, seed, limits, clock=trio.testing.MockClock(autojump_threshold=0))


# --- bodies streamed slowly, resets of blocked handlers ---


async def test_a_slowly_streamed_request_body_after_an_early_response_reaches_the_handler_whole(autojump_clock):
    got: dict[str, int] = {}

    async def handler(request: Request, respond) -> None:
        if request.target == "/early":
            await respond(Response(200, (), BufferedBody(b"early")))  # before the body came
            got["/early"] = len(await read_all(request.body))
            return
        await trio.sleep(0.05)
        await respond(Response(200, (), BufferedBody(pattern(7, 100_000))))

    with trio.fail_after(HANG):
        async with serving(handler) as served:
            client = served.client
            early = await client.request("/early", method="POST", end_stream=False)
            response = await client.response(early)
            assert (response.status, bytes(response.body), response.reset) == (200, b"early", None)
            others = [await client.request(f"/{n}") for n in range(10)]
            await client.send_body(early, pattern(1, 50_000), chunk=1000, pause=0.01)  # 0.5 s of trickle
            for stream_id in others:
                other = await client.response(stream_id)
                assert (other.status, bytes(other.body)) == (200, pattern(7, 100_000))
            await trio.testing.wait_all_tasks_blocked()
            assert got == {"/early": 50_000}
            assert client.streams[early].reset is None  # the body ended: nothing to reset


async def test_resetting_handlers_blocked_on_reading_or_on_window_cancels_them_quietly(autojump_clock):
    tracker = Tracker()

    async def handler(request: Request, respond) -> None:
        if request.target == "/reading":
            await request.body.read()
            tracker.event("/reading").set()
            await read_all(request.body)  # the client stops sending
        elif request.target == "/window":
            tracker.event("/window").set()
            await respond(Response(200, (), BufferedBody(b"w" * 200_000)))  # the client stops reading
        else:
            await respond(Response(200, (), BufferedBody(pattern(3, 200_000))))

    with trio.fail_after(HANG), structlog.testing.capture_logs() as logs:
        async with serving(tracker.wrap(handler)) as served:
            client = served.client
            reading = await client.request("/reading", method="POST", end_stream=False)
            await client.send_body(reading, b"r" * 1000, end_stream=False)
            window = await client.request("/window")
            client.held.add(window)
            await tracker.event("/reading").wait()
            await client.until(lambda: len(client.streams[window].body) == 65_535)  # its window is spent
            await trio.testing.wait_all_tasks_blocked()
            await client.reset(reading)
            await client.reset(window)
            after = await client.get("/after")
            assert (after.status, bytes(after.body)) == (200, pattern(3, 200_000))
            await trio.testing.wait_all_tasks_blocked()
            assert tracker.cancelled == {"/reading": 1, "/window": 1}
            assert tracker.failed == {}, "a reset handler saw an error instead of its cancellation"
            assert busy_workers(served.server) == 0 and served.server._streams == {}
    assert [entry for entry in logs if entry["event"] == "http2 handler failed"] == []


# --- handler failures ---


async def test_handler_failures_cost_only_their_own_stream(autojump_clock):
    second_respond: list[BaseException] = []

    async def handler(request: Request, respond) -> None:
        await trio.sleep(0.01)
        if request.target == "/raise":
            raise ValueError("handler bug")
        if request.target == "/silent":
            return
        if request.target == "/twice":
            await respond(Response(200, (), BufferedBody(b"first")))
            try:
                await respond(Response(201, (), BufferedBody(b"second")))
            except Exception as exc:
                second_respond.append(exc)
                raise
            return
        await respond(Response(200, (), BufferedBody(pattern(5, 70_000))))

    paths = ["/raise", "/silent", "/twice", "/ok"] * 5
    with trio.fail_after(HANG), structlog.testing.capture_logs() as logs:
        async with serving(handler) as served:
            client = served.client
            streams = [await client.request(path) for path in paths]
            answers = {}
            for path, stream_id in zip(paths, streams, strict=True):
                got = await client.response(stream_id)
                assert got.ended and got.reset is None, f"{path}: the stream was reset ({got.reset})"
                answers.setdefault(path, set()).add((got.status, bytes(got.body)))
            assert answers == {
                "/raise": {(500, b"internal error, see the waypoint log\n")},
                "/silent": {(500, b"no response was produced\n")},
                "/twice": {(200, b"first")},
                "/ok": {(200, pattern(5, 70_000))},
            }
            assert client.terminated is None
            await trio.testing.wait_all_tasks_blocked()
            assert busy_workers(served.server) == 0
    assert len(second_respond) == 5 and all(isinstance(exc, RuntimeError) for exc in second_respond)
    failed = Counter(entry["target"] for entry in logs if entry["event"] == "http2 handler failed")
    assert failed == {"/raise": 5, "/twice": 5}


# --- teardown ---


async def _warm_up_workers(client: Client, count: int) -> None:
    """`count` concurrent quick requests: as many workers, which then go idle."""
    streams = [await client.request("/quick") for _ in range(count)]
    for stream_id in streams:
        assert (await client.response(stream_id)).status == 200


async def _blocked_handler(request: Request, respond) -> None:
    if request.target == "/quick":
        await trio.sleep(0.01)
        await respond(Response(200, (), BufferedBody(b"quick")))
    elif request.target == "/sleep":
        await trio.sleep_forever()
    elif request.target == "/reading":
        await read_all(request.body)
    elif request.target == "/window":
        await respond(Response(200, (), BufferedBody(b"w" * 200_000)))


async def test_closing_the_connection_ends_busy_and_idle_workers_promptly(autojump_clock):
    tracker = Tracker()
    with structlog.testing.capture_logs() as logs:
        async with serving(tracker.wrap(_blocked_handler)) as served:
            client, server = served.client, served.server
            await _warm_up_workers(client, 30)
            assert len(server._idle_workers) == MAX_IDLE_WORKERS
            await client.request("/sleep")
            await client.request("/reading", method="POST", end_stream=False)
            client.held.add(await client.request("/window"))
            await trio.testing.wait_all_tasks_blocked()
            assert tracker.running == 3
            closed_at = trio.current_time()
            await client.stream.aclose()
            with trio.fail_after(HANG):
                await served.returned.wait()
            assert trio.current_time() - closed_at < http2.FLUSH_SECONDS
            assert tracker.running == 0 and server._handlers is not None and not server._handlers.child_tasks
            assert tracker.cancelled == {"/sleep": 1, "/reading": 1, "/window": 1}
            assert tracker.failed == {}
    assert [entry for entry in logs if entry["event"] == "http2 handler failed"] == []


async def test_an_idle_connection_with_idle_workers_gets_goaway_and_ends(autojump_clock):
    limits = HttpLimits(max_header_bytes=4096, idle_timeout=5.0)
    async with serving(_blocked_handler, limits) as served:
        client, server = served.client, served.server
        await _warm_up_workers(client, 20)
        assert server._idle_workers
        answered_at = trio.current_time()
        with trio.fail_after(HANG):
            await served.returned.wait()
        await client.until(lambda: client.terminated is not None)
        assert trio.current_time() - answered_at == pytest.approx(limits.idle_timeout, abs=0.1)
        assert client.terminated.error_code == Codes.NO_ERROR
        assert client.terminated.last_stream_id == max(client.streams)
        assert server._idle_workers == [] and not server._handlers.child_tasks


async def test_a_client_that_stopped_reading_cannot_hold_the_server_past_its_flush_time(autojump_clock):
    # lockstep: the server's writes block until the client reads, which it never does
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    limits = HttpLimits(idle_timeout=5.0)
    client = Client(client_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.flush)
        started = trio.current_time()
        with trio.fail_after(HANG):
            await serve_http2(server_stream, _blocked_handler, limits)
        nursery.cancel_scope.cancel()
    assert trio.current_time() - started == pytest.approx(limits.idle_timeout + http2.FLUSH_SECONDS, abs=0.1)


# --- the client ends the connection mid-stream ---


async def test_client_goaway_with_an_error_mid_stream_ends_serving_without_raising(autojump_clock):
    tracker = Tracker()
    async with serving(tracker.wrap(_blocked_handler)) as served:
        client = served.client
        await client.request("/sleep")
        client.held.add(await client.request("/window"))
        await trio.testing.wait_all_tasks_blocked()
        client.h2.close_connection(Codes.INTERNAL_ERROR)
        await client.flush()
        with trio.fail_after(HANG):
            await served.returned.wait()  # serve() would have raised into the nursery instead
        assert tracker.running == 0 and tracker.failed == {}


async def test_a_graceful_client_goaway_still_gets_its_open_streams_answered(autojump_clock):
    gate = trio.Event()

    async def gated(request: Request, respond) -> None:
        await gate.wait()
        await respond(Response(200, (), BufferedBody(b"late but whole")))

    async with serving(gated) as served:
        client = served.client
        first, second = await client.request("/a"), await client.request("/b")
        await trio.testing.wait_all_tasks_blocked()
        # GOAWAY NO_ERROR: no new streams from the client. Written by hand, because h2 as a
        # client would then refuse the responses it still waits for (nghttp2 takes them).
        async with client._lock:
            await client.stream.send_all(struct.pack(">BHBBLLL", 0, 8, 7, 0, 0, 0, Codes.NO_ERROR))
        await trio.testing.wait_all_tasks_blocked()
        assert not served.returned.is_set()
        gate.set()
        with trio.fail_after(HANG):
            for stream_id in (first, second):
                received = await client.response(stream_id)
                assert (received.status, bytes(received.body)) == (200, b"late but whole")
            await served.returned.wait()  # then the server ends the connection itself
            await client.until(lambda: client.terminated is not None)
        assert client.terminated.error_code == Codes.NO_ERROR


async def test_client_closing_mid_response_ends_serving_without_raising(autojump_clock):
    tracker = Tracker()
    async with serving(tracker.wrap(_blocked_handler)) as served:
        client = served.client
        window = await client.request("/window")
        client.held.add(window)
        await client.until(lambda: len(client.streams[window].body) == 65_535)
        await client.stream.send_stream.aclose()  # half of it: the server still has a reader on it
        with trio.fail_after(HANG):
            await served.returned.wait()
        assert tracker.running == 0 and tracker.cancelled == {"/window": 1}


async def test_garbage_mid_stream_gets_goaway_protocol_error_and_ends_serving(autojump_clock):
    tracker = Tracker()
    async with serving(tracker.wrap(_blocked_handler)) as served:
        client = served.client
        await client.request("/sleep")
        await trio.testing.wait_all_tasks_blocked()
        await client.stream.send_all(b"\x00\x00\x08\x06\x00\x00\x00\x00\x01" + b"12345678")  # PING on a stream
        with trio.fail_after(HANG):
            await served.returned.wait()
            await client.until(lambda: client.terminated is not None)
        assert client.terminated.error_code == Codes.PROTOCOL_ERROR
        assert tracker.running == 0 and tracker.cancelled == {"/sleep": 1}


# --- interleaving ---


async def test_many_streams_interleaving_multi_frame_responses_decode_cleanly():
    """40 streams answer at once with bodies in odd-sized chunks, some with heads that need
    CONTINUATION frames and some with trailers: h2's client (which validates what it
    receives) decodes every frame and every stream gets its own bytes."""

    def expected(n: int) -> tuple[tuple[tuple[str, str], ...], bytes, tuple[tuple[str, str], ...]]:
        headers = (("x-stream", str(n)), ("x-big", "h" * 20_000)) if n % 4 == 0 else (("x-stream", str(n)),)
        trailers = (("x-checksum", str(n * 31)),) if n % 3 == 0 else ()
        return headers, pattern(n, 5_000 + n * 3_001), trailers

    async def handler(request: Request, respond) -> None:
        n = int(request.target[1:])
        headers, body, trailers = expected(n)
        rng = random.Random(n)
        sizes = [rng.randint(1, 9_000) for _ in range(40)]
        await respond(Response(200, headers, ChunkedBody(body, sizes, trailers)))

    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http2, server_stream, handler, LIMITS)
        connection = Http2ClientConnection(client_stream)
        await nursery.start(connection.run)
        results: dict[int, tuple] = {}

        async def one(n: int) -> None:
            response = await connection.send(Request("GET", "svc", f"/{n}", (), BufferedBody(), "HTTP/2"))
            body = await read_all(response.body)
            results[n] = (response.headers, body, response.body.trailers)

        with trio.fail_after(10):
            async with trio.open_nursery() as requests:
                for n in range(40):
                    requests.start_soon(one, n)
        for n in range(40):
            headers, body, trailers = expected(n)
            got_headers, got_body, got_trailers = results[n]
            assert dict(got_headers).items() >= dict(headers).items(), f"stream /{n}: wrong head"
            assert got_body == body, f"stream /{n}: wrong body"
            assert tuple(got_trailers) == trailers, f"stream /{n}: wrong trailers"
        assert connection.usable  # no protocol error ended it
        nursery.cancel_scope.cancel()


# --- refusals (431, 400) ---


async def test_a_refused_request_that_ended_with_its_head_is_answered_without_other_traffic(autojump_clock):
    async def handler(request: Request, respond) -> None:
        await respond(Response(200, (), BufferedBody(b"ok")))

    async with serving(handler) as served:
        client = served.client
        assert (await client.get("/")).status == 200  # the handshake is over: nothing else in flight
        with trio.fail_after(HANG):
            big = await client.response(await client.request("/", headers=[("x-big", "a" * 5000)]))
        assert big.status == 431 and big.body.startswith(b"request headers larger than")
        stream_id = client.h2.get_next_available_stream_id()
        client.streams[stream_id] = Received()
        client.h2.send_headers(stream_id, [(":method", "GET"), (":scheme", "http"), (":path", "/")], end_stream=True)
        await client.flush()
        with trio.fail_after(HANG):
            no_authority = await client.response(stream_id)
        assert no_authority.status == 400


async def test_a_refusal_to_a_client_whose_window_is_closed_keeps_the_connection(autojump_clock):
    async def handler(request: Request, respond) -> None:
        await respond(Response(200, (), BufferedBody(b"ok")))

    async with serving(handler, settings={SettingCodes.INITIAL_WINDOW_SIZE: 0}) as served:
        client = served.client
        with trio.fail_after(HANG):
            big = await client.response(await client.request("/", headers=[("x-big", "a" * 5000)]))
            assert (big.status, big.reset) == (431, None)
            ok = await client.request("/")
            await client.until(lambda: client.streams[ok].status is not None)
            client.h2.increment_flow_control_window(100, stream_id=ok)
            await client.flush()
            got = await client.response(ok)
        assert (got.status, bytes(got.body)) == (200, b"ok")
        assert client.terminated is None and not served.returned.is_set()


async def test_a_response_ends_once_a_window_the_client_lowered_below_zero_is_positive_again(autojump_clock):
    lowered = trio.Event()

    class ThenEnd:
        trailers = ()

        def __init__(self) -> None:
            self._sent = False

        async def read(self) -> bytes:
            if not self._sent:
                self._sent = True
                return b"x" * 600
            await lowered.wait()
            return b""

        async def aclose(self) -> None:
            pass

    async def handler(request: Request, respond) -> None:
        await respond(Response(200, (), ThenEnd()))

    async with serving(handler, settings={SettingCodes.INITIAL_WINDOW_SIZE: 1000}) as served:
        client = served.client
        with trio.fail_after(HANG):
            stream_id = await client.request("/")
            client.held.add(stream_id)  # no WINDOW_UPDATE: 400 bytes of window left
            await client.until(lambda: len(client.streams[stream_id].body) == 600)
            acked = client.settings_acked
            client.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})  # the stream's window: -600
            await client.flush()
            await client.until(lambda: client.settings_acked > acked)
            lowered.set()
            await trio.sleep(1)
            got = client.streams[stream_id]
            assert (got.ended, got.reset) == (False, None)  # not even an empty frame may go out yet
            client.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1000})  # the window: 400 again
            await client.flush()
            got = await client.response(stream_id)
        assert (got.status, bytes(got.body), got.ended, got.reset) == (200, b"x" * 600, True, None)


async def test_a_refused_request_reset_in_the_same_read_costs_only_its_stream(autojump_clock):
    async def handler(request: Request, respond) -> None:
        await respond(Response(200, (), BufferedBody(b"ok")))

    async with serving(handler) as served:
        client = served.client
        assert (await client.get("/")).status == 200
        stream_id = client.h2.get_next_available_stream_id()
        client.streams[stream_id] = Received()
        client.h2.send_headers(stream_id, [(":method", "GET"), (":scheme", "http"), (":authority", "svc"), (":path", "/"), ("x-big", "a" * 5000)], end_stream=True)
        client.h2.reset_stream(stream_id, Codes.CANCEL)  # HEADERS and RST_STREAM in one write
        await client.flush()
        with trio.fail_after(HANG):
            after = await client.get("/after")
        assert (after.status, bytes(after.body)) == (200, b"ok")
        assert client.terminated is None and not served.returned.is_set()
