"""Flow events: one record per connection (ztunnel) or request (waypoint), streamed live.

What `ambientctl observe` shows, like Cilium's `hubble observe`: who talked to whom, with
which identities, whether policy allowed it and which policy decided, how many bytes, how
long, and for requests a waypoint saw the HTTP method, path and status.

Every proxy keeps a `FlowBroadcaster`: a ring buffer of its recent events and a set of
subscribers. Publishing never waits: a subscriber whose bounded queue is full loses the
events that do not fit and is told how many (`LostEvents`), so a slow reader never slows
the data path. `flows_routes` serves it on the metrics port as NDJSON:

    GET /debug/flows            the recent events, then the response ends
    GET /debug/flows?follow=1   events from now on, as they happen (chunked, until the client leaves)

Byte counts are from the source workload's point of view whoever reports them:
`bytes_sent` went from source to destination (the request), `bytes_received` came back.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args

import trio

from meshcore import log
from meshcore.admin import HttpHandler, Request, Response, StreamingBody, StreamingResponse

Reporter = Literal["source", "destination", "waypoint"]
Verdict = Literal["allowed", "denied"]
VERDICTS: tuple[str, ...] = get_args(Verdict)
_REPORTERS: tuple[str, ...] = get_args(Reporter)

# Enough recent events for `observe --last` on a busy demo, small enough to not matter.
HISTORY_EVENTS = 1000
SUBSCRIBER_QUEUE_EVENTS = 1000
# Each follower costs a queue and a connection; the endpoint is reachable from the network.
MAX_SUBSCRIBERS = 16
NDJSON = "application/x-ndjson"

_log = log.get_logger("flows")


class FlowFormatError(ValueError):
    """A flow event in JSON does not have the expected shape; names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class TooManySubscribers(Exception):
    """The proxy already streams to MAX_SUBSCRIBERS followers."""


# --- Events ---


@dataclass(frozen=True, slots=True)
class FlowPeer:
    """One end of a flow; `service` only for a destination reached through a Service."""

    workload: str | None = None  # the pod's name
    namespace: str | None = None
    identity: str | None = None  # SPIFFE URI, when mTLS proved it
    address: str | None = None  # "ip:port"
    service: str | None = None  # the Service hostname the client addressed

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "namespace": self.namespace,
            "identity": self.identity,
            "address": self.address,
            "service": self.service,
        }

    @classmethod
    def from_json(cls, value: Any, field: str) -> FlowPeer:
        data = _mapping(value, field)
        return cls(**{name: _optional_str(data, name, field) for name in cls.__slots__})  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class HttpSummary:
    """The request a waypoint saw."""

    method: str
    path: str
    authority: str
    status: int  # 0 when no response was sent (the client went away)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "path": self.path, "authority": self.authority, "status": self.status}

    @classmethod
    def from_json(cls, value: Any, field: str) -> HttpSummary:
        data = _mapping(value, field)
        return cls(
            method=_str(data, "method", field),
            path=_str(data, "path", field),
            authority=_str(data, "authority", field),
            status=_int(data, "status", field),
        )


@dataclass(frozen=True, slots=True)
class FlowEvent:
    """A finished (or refused) connection or request, as one proxy saw it."""

    time: float  # Unix seconds, when it ended
    proxy: str  # the ztunnel's node or the waypoint's "namespace/name"
    reporter: Reporter
    source: FlowPeer
    destination: FlowPeer
    verdict: Verdict
    policy: str | None  # "namespace/name" of the policy that decided; None: no policy did
    bytes_sent: int
    bytes_received: int
    duration_ms: float
    flags: str  # Istio response flags, "-" for none
    http: HttpSummary | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "time": datetime.fromtimestamp(self.time, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "proxy": self.proxy,
            "reporter": self.reporter,
            "source": self.source.to_json(),
            "destination": self.destination.to_json(),
            "verdict": self.verdict,
            "policy": self.policy,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "duration_ms": self.duration_ms,
            "flags": self.flags,
            "http": self.http.to_json() if self.http is not None else None,
        }

    @classmethod
    def from_json(cls, value: Any) -> FlowEvent:
        """Raises FlowFormatError naming the first field that is wrong."""
        data = _mapping(value, "event")
        time_text = _str(data, "time", "")
        try:
            moment = datetime.fromisoformat(time_text)
        except ValueError:
            raise FlowFormatError("time", f"{time_text!r} is not an ISO 8601 time") from None
        if moment.tzinfo is None:
            raise FlowFormatError("time", f"{time_text!r} has no time zone")
        return cls(
            time=moment.timestamp(),
            proxy=_str(data, "proxy", ""),
            reporter=_choice(data, "reporter", _REPORTERS),  # type: ignore[arg-type]
            source=FlowPeer.from_json(data.get("source"), "source"),
            destination=FlowPeer.from_json(data.get("destination"), "destination"),
            verdict=_choice(data, "verdict", VERDICTS),  # type: ignore[arg-type]
            policy=_optional_str(data, "policy", ""),
            bytes_sent=_int(data, "bytes_sent", ""),
            bytes_received=_int(data, "bytes_received", ""),
            duration_ms=_number(data, "duration_ms", ""),
            flags=_str(data, "flags", ""),
            http=HttpSummary.from_json(data["http"], "http") if data.get("http") is not None else None,
        )


@dataclass(frozen=True, slots=True)
class LostEvents:
    """A follower was too slow: this many events were dropped for it at this point."""

    proxy: str
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"lost_events": self.count, "proxy": self.proxy}


def parse_line(line: str | bytes) -> FlowEvent | LostEvents:
    """One NDJSON line of the flows endpoint; raises FlowFormatError."""
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise FlowFormatError("event", f"not JSON: {exc}") from None
    if isinstance(value, dict) and "lost_events" in value:
        return LostEvents(proxy=_str(value, "proxy", ""), count=_int(value, "lost_events", ""))
    return FlowEvent.from_json(value)


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise FlowFormatError(field, f"expected an object, got {type(value).__name__}")
    return value


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _str(data: Mapping[str, Any], name: str, prefix: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise FlowFormatError(_path(prefix, name), f"expected a string, got {value!r}")
    return value


def _optional_str(data: Mapping[str, Any], name: str, prefix: str) -> str | None:
    return None if data.get(name) is None else _str(data, name, prefix)


def _int(data: Mapping[str, Any], name: str, prefix: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FlowFormatError(_path(prefix, name), f"expected a non-negative integer, got {value!r}")
    return value


def _number(data: Mapping[str, Any], name: str, prefix: str) -> float:
    value = data.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise FlowFormatError(_path(prefix, name), f"expected a non-negative number, got {value!r}")
    return float(value)


def _choice(data: Mapping[str, Any], name: str, choices: tuple[str, ...]) -> str:
    value = data.get(name)
    if value not in choices:
        raise FlowFormatError(name, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


# --- Filters ---


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """What `observe` asks for; an unset criterion matches everything.

    `namespace` and `pod` match either end of a flow, like hubble's `--namespace`/`--pod`;
    `pod` is "[namespace/]name-prefix", so a Deployment's name selects all its pods.
    """

    namespace: str | None = None
    pod: str | None = None
    verdict: Verdict | None = None

    def matches(self, event: FlowEvent) -> bool:
        if self.verdict is not None and event.verdict != self.verdict:
            return False
        ends = (event.source, event.destination)
        if self.namespace is not None and not any(peer.namespace == self.namespace for peer in ends):
            return False
        if self.pod is not None:
            namespace, _, prefix = self.pod.rpartition("/")
            return any(
                peer.workload is not None
                and peer.workload.startswith(prefix)
                and (not namespace or peer.namespace == namespace)
                for peer in ends
            )
        return True


# --- Broadcaster ---


class FlowSubscription:
    """Events published after `subscribe()`; `close()` it (or use `with`) to unsubscribe."""

    def __init__(self, broadcaster: FlowBroadcaster, capacity: int) -> None:
        self._broadcaster = broadcaster
        self._capacity = capacity
        self._queue: deque[FlowEvent | LostEvents] = deque()
        self._lost = 0
        self._wakeup = trio.Event()

    def __enter__(self) -> FlowSubscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop receiving; repeating it is harmless."""
        self._broadcaster._unsubscribe(self)

    def _offer(self, event: FlowEvent) -> None:
        if len(self._queue) >= self._capacity:
            self._lost += 1
            return
        if self._lost:
            # The gap goes where it happened: after what was queued, before what follows.
            self._queue.append(LostEvents(self._broadcaster.proxy, self._lost))
            self._lost = 0
        self._queue.append(event)
        self._wakeup.set()

    async def receive(self) -> FlowEvent | LostEvents:
        """The next event, or how many were lost before it; waits while there is none."""
        while not self._queue and not self._lost:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
        if self._queue:
            return self._queue.popleft()
        lost, self._lost = self._lost, 0
        return LostEvents(self._broadcaster.proxy, lost)


class FlowBroadcaster:
    """Recent events of one proxy, and live delivery to subscribers (see the module doc)."""

    def __init__(
        self,
        proxy: str,
        *,
        history: int = HISTORY_EVENTS,
        subscriber_queue: int = SUBSCRIBER_QUEUE_EVENTS,
        max_subscribers: int = MAX_SUBSCRIBERS,
    ) -> None:
        self.proxy = proxy
        self._recent: deque[FlowEvent | Callable[[], FlowEvent]] = deque(maxlen=history)
        self._subscriber_queue = subscriber_queue
        self._max_subscribers = max_subscribers
        self._subscribers: list[FlowSubscription] = []

    def publish(self, event: FlowEvent | Callable[[], FlowEvent]) -> None:
        """Record `event`, or a function that makes it when someone reads it (a waypoint
        request nobody watches then costs no event); never blocks (called on the data path)."""
        if self._subscribers:
            event = event if isinstance(event, FlowEvent) else event()
            for subscription in self._subscribers:
                subscription._offer(event)
        self._recent.append(event)

    def recent(self) -> tuple[FlowEvent, ...]:
        """The buffered events, oldest first."""
        return tuple(event if isinstance(event, FlowEvent) else event() for event in self._recent)

    def subscribe(self) -> FlowSubscription:
        """A new follower of events from now on; raises TooManySubscribers."""
        if len(self._subscribers) >= self._max_subscribers:
            raise TooManySubscribers(f"already streaming flows to {self._max_subscribers} followers")
        subscription = FlowSubscription(self, self._subscriber_queue)
        self._subscribers.append(subscription)
        return subscription

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def _unsubscribe(self, subscription: FlowSubscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)


# --- HTTP endpoint ---

_FOLLOW_VALUES = {"1": True, "true": True, "0": False, "false": False}


def flows_routes(broadcaster: FlowBroadcaster) -> dict[str, HttpHandler]:
    """`/debug/flows`: the recent events as NDJSON; `?follow=1`: live events, streamed."""

    async def flows(request: Request) -> Response | StreamingResponse:
        follow_text = request.query.get("follow", "0").lower()
        if follow_text not in _FOLLOW_VALUES:
            return Response(400, f"query parameter follow: expected 1/true or 0/false, got {follow_text!r}\n".encode())
        if not _FOLLOW_VALUES[follow_text]:
            body = "".join(_line(event) for event in broadcaster.recent())
            return Response(200, body.encode(), NDJSON)
        try:
            subscription = broadcaster.subscribe()
        except TooManySubscribers as exc:
            _log.warning("flow follower refused", reason=str(exc))
            return Response(503, f"{exc}; try again later\n".encode())
        return StreamingResponse(200, _FollowBody(subscription), NDJSON)

    return {"/debug/flows": flows}


class _FollowBody(StreamingBody):
    """The live stream of one follower; closing it unsubscribes."""

    def __init__(self, subscription: FlowSubscription) -> None:
        self._subscription = subscription

    async def __anext__(self) -> bytes:
        return _line(await self._subscription.receive()).encode()

    async def aclose(self) -> None:
        self._subscription.close()


def _line(item: FlowEvent | LostEvents) -> str:
    return json.dumps(item.to_json(), separators=(",", ":")) + "\n"
