"""waypoint/tracing: W3C trace context and the waypoint's span per request, without I/O.

What a request's trace looks like through the waypoint (as an Envoy waypoint with an
OpenTelemetry tracer, Istio's `Telemetry` tracing):

- the client's `traceparent` (W3C Trace Context) is parsed; a malformed one (wrong length,
  upper-case or non-hex digits, version ff, an all-zero trace or span id, a second
  `traceparent` header) is treated as absent, as the spec requires, never as an error;
- when spans are exported and the trace is sampled, the waypoint's span (kind SERVER) is the
  client's span's child: same trace id, parent = the client's span id, and the request sent
  upstream carries a `traceparent` naming the waypoint's span, so the backend's span
  becomes the waypoint span's child. `tracestate` goes upstream unchanged;
- sampling is parent-based: a client that sent `traceparent` decided already (its sampled
  flag); a request without one starts a new trace, sampled with `sampling_percent`;
- a span id is made only for a span that is recorded. Otherwise (no exporter, or not
  sampled) the client's `traceparent` goes upstream unchanged, so the backend's span links
  to the client's and no parent points at a span nobody exported. A request without a
  valid one gets a new, unsampled traceparent (its trace id is the access log's);
- a recorded span ends with the request and carries Envoy's tags (`http.method`,
  `http.url`, `http.status_code`, `upstream_cluster`, `node_id`, `component: proxy`,
  `response_flags`, ...) as string attributes, `error: true` and an ERROR status for 5xx,
  gRPC errors and requests that got no response.

`Tracer.start` runs when a request arrives, `Tracer.finish` when its RequestRecord is
written; finished spans go to the `export` callable (the OTLP exporter's non-blocking
submit, waypoint/otlp.py).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from waypoint.messages import Headers
from waypoint.metrics import NO_FLAG, RequestRecord

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_SAMPLED = 0x01
_INVALID_TRACE_ID = bytes(16)
_INVALID_SPAN_ID = bytes(8)
# version 00 is exactly these four fields; a later version may append "-..." fields.
_FIELDS = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# gRPC status OK; anything else marks the span as an error (Envoy's grpc.status_code tag).
_GRPC_OK = "0"


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A span as W3C `traceparent` names it: trace id, span id, sampled flag."""

    trace_id: bytes  # 16 bytes, not all zero
    span_id: bytes  # 8 bytes, not all zero
    sampled: bool

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id.hex()}-{self.span_id.hex()}-{_SAMPLED if self.sampled else 0:02x}"


def parse_traceparent(value: str) -> TraceContext | None:
    """The context in a `traceparent` value, or None when it is not a valid one."""
    value = value.strip()
    match = _FIELDS.match(value)
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff":
        return None
    rest = value[match.end() :]
    if rest and (version == "00" or not rest.startswith("-")):
        return None
    context = TraceContext(bytes.fromhex(trace_id), bytes.fromhex(span_id), bool(int(flags, 16) & _SAMPLED))
    if context.trace_id == _INVALID_TRACE_ID or context.span_id == _INVALID_SPAN_ID:
        return None
    return context


def incoming_context(headers: Headers) -> tuple[TraceContext | None, str | None]:
    """The client's trace context and its `tracestate` (several headers joined with ",").

    More than one `traceparent` makes the context invalid; without a valid context the
    tracestate is dropped too, since it belongs to a trace that is not continued.
    """
    parents = [value for name, value in headers if name == TRACEPARENT]
    context = parse_traceparent(parents[0]) if len(parents) == 1 else None
    if context is None:
        return None, None
    states = [value for name, value in headers if name == TRACESTATE]
    return context, ",".join(states) if states else None


def new_span_id(rng: random.Random) -> bytes:
    # Envoy draws ids from a fast PRNG too; os.urandom is a system call per id.
    while (span_id := rng.getrandbits(64).to_bytes(8)) == _INVALID_SPAN_ID:
        pass
    return span_id


def new_trace_id(rng: random.Random) -> bytes:
    while (trace_id := rng.getrandbits(128).to_bytes(16)) == _INVALID_TRACE_ID:
        pass
    return trace_id


def should_sample(parent: TraceContext | None, sampling_percent: float, draw: float) -> bool:
    """Parent-based sampling: the parent's flag if there is one, else `draw` (uniform in
    [0, 1)) below `sampling_percent` / 100."""
    if parent is not None:
        return parent.sampled
    return draw * 100.0 < sampling_percent


class SpanKind(Enum):
    """OpenTelemetry span kinds, valued as OTLP's SpanKind enum."""

    SERVER = 2


@dataclass(frozen=True, slots=True)
class Hop:
    """This waypoint's part in one request's trace, decided when the request arrived."""

    context: TraceContext  # sent upstream as traceparent: our span's when recording
    parent_span_id: bytes | None  # the client's span; None when this hop started the trace
    trace_state: str | None  # passed upstream unchanged
    recording: bool
    start_unix_nano: int

    @property
    def trace_id(self) -> str:
        return self.context.trace_id.hex()

    def upstream_headers(self) -> Headers:
        headers: Headers = ((TRACEPARENT, self.context.traceparent),)
        if self.trace_state is not None:
            headers += ((TRACESTATE, self.trace_state),)
        return headers


@dataclass(frozen=True, slots=True)
class Span:
    """A finished span, as exported."""

    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes | None
    trace_state: str | None
    name: str
    kind: SpanKind
    start_unix_nano: int
    end_unix_nano: int
    attributes: tuple[tuple[str, str], ...]
    error: bool


def request_span(hop: Hop, record: RequestRecord, *, operation: str, node_id: str, end_unix_nano: int) -> Span:
    """The waypoint's SERVER span for a finished request, with Envoy's tags
    (Tracing::HttpTracerUtility::finalizeDownstreamSpan)."""
    failed_grpc = record.protocol == "grpc" and record.grpc_status not in ("", _GRPC_OK)
    error = record.response_code == 0 or record.response_code >= 500 or failed_grpc
    attributes: list[tuple[str, str]] = [
        ("node_id", node_id),
        ("component", "proxy"),
        ("http.method", record.method),
        ("http.url", f"http://{record.authority}{record.path}"),
        ("http.protocol", record.http_version),
        ("http.status_code", str(record.response_code)),
        ("response_flags", record.response_flags or NO_FLAG),
        ("request_size", str(record.request_bytes)),
        ("response_size", str(record.response_bytes)),
        ("peer.address", record.source_address),
    ]
    if record.upstream_cluster is not None:
        attributes += [("upstream_cluster", record.upstream_cluster), ("upstream_cluster.name", record.upstream_cluster)]
    if record.destination_address is not None:
        attributes.append(("upstream_address", record.destination_address))
    if record.protocol == "grpc" and record.grpc_status:
        attributes.append(("grpc.status_code", record.grpc_status))
    if error:
        attributes.append(("error", "true"))
    return Span(
        trace_id=hop.context.trace_id,
        span_id=hop.context.span_id,
        parent_span_id=hop.parent_span_id,
        trace_state=hop.trace_state,
        name=operation,
        kind=SpanKind.SERVER,
        start_unix_nano=hop.start_unix_nano,
        end_unix_nano=end_unix_nano,
        attributes=tuple(attributes),
        error=error,
    )


class Tracer:
    """Trace decisions for the pipeline. Without `export` it only propagates context."""

    def __init__(
        self,
        *,
        node_id: str = "",  # the spans' node_id tag
        sampling_percent: float = 100.0,
        export: Callable[[Span], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._node_id = node_id
        self._sampling_percent = sampling_percent
        self._export = export
        self._rng = rng or random.Random()  # its own: draws must not shift the load balancers' sequences

    def start(self, headers: Headers, *, now_unix_nano: int) -> Hop:
        parent, trace_state = incoming_context(headers)
        recording = self._export is not None and should_sample(parent, self._sampling_percent, self._rng.random())
        if recording:
            trace_id = parent.trace_id if parent is not None else new_trace_id(self._rng)
            context = TraceContext(trace_id, new_span_id(self._rng), sampled=True)
        elif parent is not None:
            context = parent
        else:
            context = TraceContext(new_trace_id(self._rng), new_span_id(self._rng), sampled=False)
        return Hop(
            context=context,
            parent_span_id=parent.span_id if parent is not None and recording else None,
            trace_state=trace_state,
            recording=recording,
            start_unix_nano=now_unix_nano,
        )

    def finish(self, hop: Hop, record: RequestRecord, *, operation: str, now_unix_nano: int) -> None:
        if hop.recording and self._export is not None:
            self._export(request_span(hop, record, operation=operation, node_id=self._node_id, end_unix_nano=now_unix_nano))
