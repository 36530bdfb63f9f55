"""waypoint/metrics: Istio's request metrics and the per-request access-log event.

The families and labels are those of an Envoy waypoint (facts §8), so Istio dashboards and
alerts work unchanged:

- `istio_requests_total` (counter), `istio_request_duration_milliseconds`,
  `istio_request_bytes`, `istio_response_bytes` (histograms with Envoy's default buckets);
- labels `meshcore.metrics.REQUEST_LABELS`, with `reporter="waypoint"`; what is unknown is
  "unknown"; `grpc_response_status` is empty for requests that are not gRPC;
- `source_*` describe the client workload (found by the HBONE peer's address, its principal
  proven by the peer certificate), `destination_*` the endpoint that answered and the
  service of its cluster (cluster metadata `istio.services[0]`).

Every request ends in exactly one `RequestRecord` passed to `WaypointMetrics.record`, which
counts it and writes one access-log event (logger "access"), whether it was answered by the
upstream, refused by policy or failed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate

import prometheus_client
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from meshcore import log
from meshcore.metrics import ENVOY_DEFAULT_BUCKETS_MS, REQUEST_LABELS, UNKNOWN, register_build_info

REPORTER = "waypoint"
NO_FLAG = "-"
# Envoy's short response flags in the order Envoy prints them (stream_info ResponseFlag).
_FLAG_ORDER = (
    "UH", "UF", "UO", "NR", "URX", "NC", "DT", "DC", "LH", "UT", "LR", "UR", "UC",
    "DI", "FI", "RL", "UAEX", "RLSE", "IH", "SI", "DPE", "UPE", "UMSDR", "OM", "DF", "DO", "DR", "UDO",
)  # fmt: skip

_access_log = log.get_logger("access")


@dataclass(frozen=True, slots=True)
class PeerLabels:
    """What the metrics say about one side of a request; None is reported as "unknown"."""

    workload: str | None = None
    namespace: str | None = None
    principal: str | None = None  # SPIFFE URI
    canonical_service: str | None = None
    canonical_revision: str | None = None
    cluster: str | None = None


@dataclass(slots=True)  # not frozen: one per request, and a frozen init costs 2 µs more
class RequestRecord:
    """One finished request, as metrics and the access log see it."""

    source: PeerLabels
    source_address: str
    destination: PeerLabels
    destination_address: str | None  # the endpoint that answered, "ip:port"
    service_host: str | None
    service_name: str | None
    service_namespace: str | None
    method: str
    authority: str
    path: str
    protocol: str  # "http" or "grpc"
    http_version: str  # downstream "HTTP/1.1" / "HTTP/2"
    response_code: int  # 0 when no response was sent (the client went away)
    response_flags: str
    response_code_details: str
    grpc_status: str  # "" unless gRPC
    duration_ms: float
    request_bytes: int
    response_bytes: int
    upstream_cluster: str | None
    attempts: int
    trace_id: str
    error: str | None = None


class WaypointMetrics:
    """The waypoint's metric families, registered in `registry`.

    Counted in plain lists and turned into Prometheus families only when scraped:
    prometheus_client's histograms take a lock and walk the buckets on every observation, and
    three of them per request cost more than the request's routing."""

    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        self._series: dict[tuple[object, ...], _RequestSeries] = {}
        registry.register(self)
        register_build_info(registry, "proxy")  # what an Envoy waypoint reports

    def record(self, record: RequestRecord) -> None:
        # The series of one label set is found again by the fields its labels come from.
        key = (
            record.service_host, record.service_name, record.service_namespace, record.protocol,
            record.response_flags, record.response_code, record.grpc_status, record.source, record.destination,
        )
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _RequestSeries(tuple(request_labels(record).values()))
        series.requests += 1
        series.duration.observe(record.duration_ms)
        series.request_bytes.observe(record.request_bytes)
        series.response_bytes.observe(record.response_bytes)
        _log_access(record)

    # prometheus_client collector protocol

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        requests, duration, request_bytes, response_bytes = self._families()
        for series in self._series.values():
            requests.add_metric(series.label_values, series.requests)
            series.duration.add_to(duration, series.label_values)
            series.request_bytes.add_to(request_bytes, series.label_values)
            series.response_bytes.add_to(response_bytes, series.label_values)
        yield from (requests, duration, request_bytes, response_bytes)

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, HistogramMetricFamily, HistogramMetricFamily, HistogramMetricFamily]:
        # The exposition appends the "_total" suffix Istio's counter name carries.
        return (
            CounterMetricFamily("istio_requests", "The total number of requests handled by the waypoint", labels=REQUEST_LABELS),
            HistogramMetricFamily("istio_request_duration_milliseconds", "Request duration in milliseconds", labels=REQUEST_LABELS),
            HistogramMetricFamily("istio_request_bytes", "HTTP request body sizes", labels=REQUEST_LABELS),
            HistogramMetricFamily("istio_response_bytes", "HTTP response body sizes", labels=REQUEST_LABELS),
        )


class _Histogram:
    """Counts per bucket of Envoy's default bounds (the last one +Inf) and the sum."""

    __slots__ = ("counts", "total")
    _LE = (*(floatToGoString(bound) for bound in ENVOY_DEFAULT_BUCKETS_MS), "+Inf")

    def __init__(self) -> None:
        self.counts = [0] * (len(ENVOY_DEFAULT_BUCKETS_MS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(ENVOY_DEFAULT_BUCKETS_MS, value)] += 1  # le: value <= bound
        self.total += value

    def add_to(self, family: HistogramMetricFamily, label_values: tuple[str, ...]) -> None:
        family.add_metric(label_values, list(zip(self._LE, accumulate(self.counts))), self.total)


class _RequestSeries:
    """The four series of one label set."""

    __slots__ = ("label_values", "requests", "duration", "request_bytes", "response_bytes")

    def __init__(self, label_values: tuple[str, ...]) -> None:
        self.label_values = label_values
        self.requests = 0
        self.duration = _Histogram()
        self.request_bytes = _Histogram()
        self.response_bytes = _Histogram()


def format_flags(flags: list[str]) -> str:
    """Envoy's %RESPONSE_FLAGS%: the flags comma-joined in Envoy's order, "-" for none."""
    if not flags:
        return NO_FLAG
    present = {flag for flag in flags if flag != NO_FLAG}
    return ",".join(flag for flag in _FLAG_ORDER if flag in present) or NO_FLAG


def request_labels(record: RequestRecord) -> dict[str, str]:
    """Istio's label values for one request."""
    labels = {
        "reporter": REPORTER,
        "destination_service": _or_unknown(record.service_host),
        "destination_service_name": _or_unknown(record.service_name),
        "destination_service_namespace": _or_unknown(record.service_namespace),
        "request_protocol": record.protocol,
        "response_flags": record.response_flags,
        "connection_security_policy": "mutual_tls",  # every request arrived over HBONE
        "response_code": str(record.response_code),
        "grpc_response_status": record.grpc_status,
    }
    for side, peer in (("source", record.source), ("destination", record.destination)):
        labels |= {
            f"{side}_workload": _or_unknown(peer.workload),
            f"{side}_workload_namespace": _or_unknown(peer.namespace),
            f"{side}_principal": _or_unknown(peer.principal),
            f"{side}_canonical_service": _or_unknown(peer.canonical_service),
            f"{side}_canonical_revision": _or_unknown(peer.canonical_revision),
            f"{side}_app": _or_unknown(peer.canonical_service),
            f"{side}_version": _or_unknown(peer.canonical_revision),
            f"{side}_cluster": _or_unknown(peer.cluster),
        }
    return {name: labels[name] for name in REQUEST_LABELS}


def _log_access(record: RequestRecord) -> None:
    failed = record.error is not None or record.response_code >= 500
    if not log.enabled("error" if failed else "info"):
        return
    fields = {
        "src.addr": record.source_address,
        "src.workload": record.source.workload,
        "src.namespace": record.source.namespace,
        "src.identity": record.source.principal,
        "dst.addr": record.destination_address,
        "dst.service": record.service_host,
        "dst.workload": record.destination.workload,
        "dst.namespace": record.destination.namespace,
        "dst.identity": record.destination.principal,
        "upstream_cluster": record.upstream_cluster,
        "method": record.method,
        "authority": record.authority,
        "path": record.path,
        "protocol": record.http_version,
        "response_code": record.response_code,
        "response_flags": record.response_flags,
        "response_code_details": record.response_code_details,
        "grpc_status": record.grpc_status or None,
        "attempts": record.attempts,
        "duration_ms": round(record.duration_ms, 3),
        "bytes_recv": record.request_bytes,
        "bytes_sent": record.response_bytes,
        "trace_id": record.trace_id,
        "error": record.error,
    }
    if failed:
        _access_log.error("request complete", **fields)
    else:
        _access_log.info("request complete", **fields)


def _or_unknown(value: str | None) -> str:
    return value if value else UNKNOWN
