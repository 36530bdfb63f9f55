"""waypoint/otlp: sends finished spans to an OpenTelemetry collector over OTLP/HTTP.

Requests hand their span to `submit`, which never blocks: spans wait in a bounded queue,
and when it is full (the collector is slow or away) the span is dropped and counted. One
task empties the queue: it takes every span waiting (up to MAX_BATCH) and POSTs them as one
`ExportTraceServiceRequest` (protobuf, Content-Type application/x-protobuf) to
`{endpoint}/v1/traces`, on a kept-alive HTTP/1.1 connection. So a quiet waypoint exports a
span right after its request, and under load batches grow by themselves while an export is
in flight; no timer is needed.

As the OTLP spec asks of exporters: connection failures, timeouts and the retryable
statuses (429, 502, 503, 504) are retried with exponential backoff and jitter, honouring a
`Retry-After` in seconds, up to MAX_ATTEMPTS; then the batch's spans are counted as failed.
Any other status fails the batch at once. Spans a collector rejects in a partial success
count as failed too.

Shutdown: `aclose()` stops taking spans and returns once those already queued have been
exported or given up; the app calls it after the drain, under a deadline.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import h11
import prometheus_client
import trio
from google.protobuf.message import DecodeError
from meshcore._gen.otlp_trace_pb2 import (
    AnyValue,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
    InstrumentationScope,
    KeyValue,
    Resource,
    ResourceSpans,
    ScopeSpans,
    Status,
)
from meshcore._gen.otlp_trace_pb2 import Span as SpanProto

from meshcore.log import get_logger
from waypoint.http1 import Http1ClientConnection
from waypoint.messages import BodyError, BufferedBody, Headers, Request, header_value
from waypoint.settings import OtlpEndpoint
from waypoint.tracing import Span

QUEUE_SIZE = 2048  # the OpenTelemetry SDKs' BatchSpanProcessor max queue size
MAX_BATCH = 512  # ... and its max export batch size
MAX_ATTEMPTS = 5
INITIAL_BACKOFF = 0.2
MAX_BACKOFF = 5.0
EXPORT_TIMEOUT = 10.0  # one POST, connecting included (the SDKs' default exporter timeout)
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
_MAX_RESPONSE_BYTES = 64 * 1024
# W3C sampled flag, and "the parent's is-remote bit is known" / "the parent is remote"
# (OTLP SpanFlags): the waypoint's parent is always the client's span in another process.
_SAMPLED = 0x01
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_SCOPE = InstrumentationScope(name="waypoint")

_log = get_logger("otlp")


def export_request(spans: Sequence[Span], service_name: str) -> ExportTraceServiceRequest:
    """One OTLP export of `spans`, all from this waypoint (resource `service.name`)."""
    resource = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value=service_name))])
    return ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(resource=resource, scope_spans=[ScopeSpans(scope=_SCOPE, spans=[_span_proto(s) for s in spans])])]
    )


def _span_proto(span: Span) -> SpanProto:
    flags = _SAMPLED | _HAS_IS_REMOTE | (_IS_REMOTE if span.parent_span_id is not None else 0)
    return SpanProto(
        trace_id=span.trace_id,
        span_id=span.span_id,
        trace_state=span.trace_state or "",
        parent_span_id=span.parent_span_id or b"",
        flags=flags,
        name=span.name,
        kind=span.kind.value,  # type: ignore[arg-type]
        start_time_unix_nano=span.start_unix_nano,
        end_time_unix_nano=span.end_unix_nano,
        attributes=[KeyValue(key=key, value=AnyValue(string_value=value)) for key, value in span.attributes],
        status=Status(code=Status.STATUS_CODE_ERROR if span.error else Status.STATUS_CODE_UNSET),
    )


def rejected_spans(body: bytes) -> int:
    """How many spans an OTLP success response says were rejected (0 if it does not parse)."""
    response = ExportTraceServiceResponse()
    try:
        response.ParseFromString(body)
    except DecodeError:
        return 0
    return response.partial_success.rejected_spans


class OtlpExporter:
    """Exports spans given to `submit`; run `run()` in a nursery."""

    def __init__(
        self,
        endpoint: OtlpEndpoint,
        *,
        service_name: str,
        registry: prometheus_client.CollectorRegistry,
        queue_size: int = QUEUE_SIZE,
        rng: random.Random | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._service_name = service_name
        self._queue_in, self._queue_out = trio.open_memory_channel[Span](queue_size)
        self._rng = rng or random.Random()
        self._connection: Http1ClientConnection | None = None  # idle between exports
        self._dropping = False
        self._finished = trio.Event()
        self.exported = prometheus_client.Counter(
            "waypoint_tracing_spans_exported", "Spans the OTLP collector accepted", registry=registry
        )
        self.dropped = prometheus_client.Counter(
            "waypoint_tracing_spans_dropped", "Spans dropped because the export queue was full or closed", registry=registry
        )
        self.failed = prometheus_client.Counter(
            "waypoint_tracing_spans_failed", "Spans given up after failed exports, or rejected by the collector", registry=registry
        )

    def submit(self, span: Span) -> None:
        """Queue `span` for export; never blocks (a full queue drops it)."""
        try:
            self._queue_in.send_nowait(span)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.dropped.inc()
            if not self._dropping:
                self._dropping = True
                _log.warning("span export queue full; dropping spans", endpoint=self._endpoint.url)
            return
        self._dropping = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            async with self._queue_out:
                async for first in self._queue_out:
                    batch = [first]
                    while len(batch) < MAX_BATCH:
                        try:
                            batch.append(self._queue_out.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    await self._export(batch)
        finally:
            if self._connection is not None:
                await self._connection.aclose()
            self._finished.set()

    async def aclose(self) -> None:
        """Stop taking spans; return once the queued ones were exported or given up."""
        self._queue_in.close()
        await self._finished.wait()

    async def _export(self, batch: list[Span]) -> None:
        payload = export_request(batch, self._service_name).SerializeToString()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            retry_after: float | None = None
            try:
                with trio.fail_after(EXPORT_TIMEOUT):
                    status, headers, body = await self._post(payload)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, h11.ProtocolError, BodyError) as exc:
                error, retriable = f"{type(exc).__name__}: {exc}", True
            else:
                if 200 <= status < 300:
                    rejected = min(rejected_spans(body), len(batch))
                    self.exported.inc(len(batch) - rejected)
                    if rejected:
                        self.failed.inc(rejected)
                        _log.warning("collector rejected spans", endpoint=self._endpoint.url, rejected=rejected)
                    return
                error, retriable = f"HTTP {status}", status in RETRYABLE_STATUSES
                retry_after = _retry_after(headers)
            if not retriable or attempt == MAX_ATTEMPTS:
                break
            delay = retry_after if retry_after is not None else INITIAL_BACKOFF * 2 ** (attempt - 1) * self._rng.uniform(0.5, 1.0)
            _log.info("span export failed; retrying", endpoint=self._endpoint.url, error=error, attempt=attempt, retry_in=round(delay, 3))
            await trio.sleep(min(delay, MAX_BACKOFF))
        self.failed.inc(len(batch))
        _log.warning("span export failed; spans dropped", endpoint=self._endpoint.url, error=error, attempts=attempt, spans=len(batch))

    async def _post(self, payload: bytes) -> tuple[int, Headers, bytes]:
        connection, self._connection = self._connection, None
        if connection is None or connection.closed:
            stream = await trio.open_tcp_stream(self._endpoint.host, self._endpoint.port)
            connection = Http1ClientConnection(stream, on_idle=self._keep)
        headers = (("content-type", "application/x-protobuf"), ("content-length", str(len(payload))))
        response = await connection.send(Request("POST", self._endpoint.authority, self._endpoint.path, headers, BufferedBody(payload), "HTTP/1.1"))
        body = b""
        while chunk := await response.body.read():
            body += chunk
            if len(body) > _MAX_RESPONSE_BYTES:
                await response.body.aclose()
                raise BodyError(f"collector response larger than {_MAX_RESPONSE_BYTES} bytes")
        return response.status, response.headers, body

    def _keep(self, connection: Http1ClientConnection) -> None:
        self._connection = connection


def _retry_after(headers: Headers) -> float | None:
    value = header_value(headers, "retry-after")
    return float(value) if value is not None and value.strip().isdigit() else None
