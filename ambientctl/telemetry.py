"""ambientctl/telemetry: the mesh's traffic as data (edges, golden signals), for `stat` and the dashboard.

Two sources give the same `MeshTelemetry`:

- `PrometheusTelemetry(url)` asks a Prometheus (HTTP API `/api/v1/query`) for per-second
  rates grouped by the labels telemetry needs (`promql.telemetry_queries`, the PromQL the
  Grafana panels are built from);
- `ScrapeTelemetry(proxies)` scrapes the proxies' `/metrics` itself and turns two scrapes
  into the same rates (a counter that went down was reset: its new value is the increase).

Both hand `RateSample`s to `aggregate`, a pure function that sums them into edges and golden
signals (quantiles interpolated in histogram buckets as PromQL's `histogram_quantile` does).
Everything here is synchronous: callers with an event loop run `snapshot` in a thread.
A source that cannot be read is a `problems` sentence, never an exception (logged at info:
the caller reports the problems as loudly as it needs).
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from ambientctl import promql
from ambientctl.proxies import MeshProxy
from meshcore.log import get_logger
from meshcore.metrics import UNKNOWN

HTTP_TIMEOUT_SECONDS = 3.0

_log = get_logger("ambientctl")


@dataclass(frozen=True, slots=True)
class TrafficEdge:
    """One source workload -> destination service (or workload) pair."""

    source: str  # "namespace/workload" ("unknown" if not in mesh)
    destination: str  # "namespace/service" (destination_service_name) or "namespace/workload"
    protocol: str  # "http" | "tcp"
    rps: float  # requests/s (http) or connections/s (tcp)
    error_rate: float | None  # 5xx share for http; None for tcp
    p99_ms: float | None  # http only
    mtls: bool  # every series of the edge has connection_security_policy == mutual_tls
    bytes_per_second: float  # tcp sent+received; 0 for http


@dataclass(frozen=True, slots=True)
class GoldenSignals:
    """Inbound traffic of one service or workload."""

    namespace: str
    name: str
    kind: str  # "service" | "workload"
    rps: float
    success_rate: float | None  # None: no requests
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    tcp_connections_per_second: float


@dataclass(frozen=True, slots=True)
class MeshTelemetry:
    edges: tuple[TrafficEdge, ...]
    services: tuple[GoldenSignals, ...]
    workloads: tuple[GoldenSignals, ...]
    problems: tuple[str, ...]  # plain sentences naming what could not be read


@dataclass(frozen=True, slots=True)
class RateSample:
    """The per-second rate of one series (a counter or a histogram bucket)."""

    name: str  # the sample name, e.g. "istio_requests_total"
    labels: Mapping[str, str]
    rate: float


# --- pure: parsing, rates, quantiles, aggregation ---

CounterValues = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_exposition(text: str) -> CounterValues:
    """The samples telemetry needs from a Prometheus text exposition, by (name, sorted labels):
    those of `promql.TELEMETRY_SERIES`, from the reporter it names (each connection or request
    counted once, as the PromQL counts it).

    Raises ValueError if the text is not the exposition format.
    """
    values: CounterValues = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            wanted = promql.TELEMETRY_SERIES.get(sample.name)
            if wanted is not None and sample.labels.get("reporter") == wanted[0]:
                values[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return values


def counter_rates(before: CounterValues, after: CounterValues, seconds: float) -> list[RateSample]:
    """Per-second increase of every series in `after`; a series that is new or went down
    (the proxy restarted) increased by its whole value, as PromQL's `rate` treats resets."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    samples = []
    for (name, labels), value in after.items():
        previous = before.get((name, labels), 0.0)
        increase = value - previous if value >= previous else value
        samples.append(RateSample(name=name, labels=dict(labels), rate=increase / seconds))
    return samples


def histogram_quantile(quantile: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """PromQL's `histogram_quantile` over cumulative (upper bound, rate) buckets; None without data.

    Linear interpolation inside the bucket the rank falls in; the lowest bucket starts at 0;
    a rank in the +Inf bucket answers the highest finite bound.
    """
    ordered = sorted(buckets)
    if not ordered or not math.isinf(ordered[-1][0]):
        return None
    total = ordered[-1][1]
    if total <= 0:
        return None
    rank = quantile * total
    lower_bound, lower_count = 0.0, 0.0
    for upper_bound, count in ordered:
        if count >= rank:
            if math.isinf(upper_bound):
                return lower_bound
            if count == lower_count:
                return upper_bound
            return lower_bound + (upper_bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = upper_bound, count
    return lower_bound


def parse_query_response(name: str, body: Mapping) -> list[RateSample]:
    """The samples of a successful `/api/v1/query` answer (an instant vector) for `name`.

    Raises ValueError naming what is wrong with the answer.
    """
    if body.get("status") != "success":
        raise ValueError(f"{body.get('errorType', 'error')}: {body.get('error', 'no error message')}")
    data = body.get("data") or {}
    if data.get("resultType") != "vector":
        raise ValueError(f"expected an instant vector, got resultType {data.get('resultType')!r}")
    samples = []
    for entry in data.get("result") or ():
        rate = float(entry["value"][1])
        if math.isnan(rate):
            continue
        samples.append(RateSample(name=name, labels=dict(entry.get("metric") or {}), rate=rate))
    return samples


def _known(value: str) -> bool:
    return bool(value) and value != UNKNOWN


def _source(labels: Mapping[str, str]) -> str:
    workload = _named(labels, "source_workload_namespace", "source_workload")
    return f"{workload[0]}/{workload[1]}" if workload else UNKNOWN


def _named(labels: Mapping[str, str], namespace_label: str, name_label: str) -> tuple[str, str] | None:
    """(namespace, name) when both labels are known."""
    namespace, name = labels.get(namespace_label, ""), labels.get(name_label, "")
    return (namespace, name) if _known(namespace) and _known(name) else None


def _destination_service(labels: Mapping[str, str]) -> tuple[str, str] | None:
    return _named(labels, "destination_service_namespace", "destination_service_name")


def _destination_workload(labels: Mapping[str, str]) -> tuple[str, str] | None:
    return _named(labels, "destination_workload_namespace", "destination_workload")


def _destination(labels: Mapping[str, str]) -> str:
    target = _destination_service(labels) or _destination_workload(labels)
    return f"{target[0]}/{target[1]}" if target else UNKNOWN


@dataclass
class _Tally:
    """Running sums for one edge, service or workload."""

    requests: float = 0.0
    server_errors: float = 0.0
    connections: float = 0.0
    bytes: float = 0.0
    plaintext_seen: bool = False
    http_seen: bool = False
    tcp_seen: bool = False
    buckets: defaultdict[float, float] = field(default_factory=lambda: defaultdict(float))  # le -> rate

    def add(self, sample: RateSample) -> None:
        if sample.labels.get("connection_security_policy") != "mutual_tls" and sample.rate > 0:
            self.plaintext_seen = True
        if sample.name == promql.REQUESTS:
            self.http_seen = True
            self.requests += sample.rate
            if sample.labels.get("response_code", "").startswith("5"):
                self.server_errors += sample.rate
        elif sample.name == promql.REQUEST_DURATION_BUCKETS:
            self.buckets[float(sample.labels["le"])] += sample.rate
        elif sample.name == promql.TCP_OPENED:
            self.tcp_seen = True
            self.connections += sample.rate
        elif sample.name in (promql.TCP_SENT_BYTES, promql.TCP_RECEIVED_BYTES):
            self.bytes += sample.rate

    def quantile(self, quantile: float) -> float | None:
        return histogram_quantile(quantile, self.buckets.items()) if self.requests > 0 else None


def _is_http(sample: RateSample) -> bool:
    return sample.name in (promql.REQUESTS, promql.REQUEST_DURATION_BUCKETS)


def aggregate(samples: Iterable[RateSample]) -> tuple[tuple[TrafficEdge, ...], tuple[GoldenSignals, ...], tuple[GoldenSignals, ...]]:
    """Edges, services and workloads (each sorted) from rate samples of any grouping."""
    edges: dict[tuple[str, str, str], _Tally] = defaultdict(_Tally)
    services: dict[tuple[str, str], _Tally] = defaultdict(_Tally)
    workloads: dict[tuple[str, str], _Tally] = defaultdict(_Tally)
    for sample in samples:
        labels = sample.labels
        edges[(_source(labels), _destination(labels), "http" if _is_http(sample) else "tcp")].add(sample)
        if (service := _destination_service(labels)) is not None:
            services[service].add(sample)
        if (workload := _destination_workload(labels)) is not None:
            workloads[workload].add(sample)
    edge_rows = tuple(
        TrafficEdge(
            source=source,
            destination=destination,
            protocol=protocol,
            rps=tally.requests if protocol == "http" else tally.connections,
            error_rate=(tally.server_errors / tally.requests if tally.requests > 0 else None) if protocol == "http" else None,
            p99_ms=tally.quantile(0.99) if protocol == "http" else None,
            mtls=not tally.plaintext_seen,
            bytes_per_second=tally.bytes,
        )
        for (source, destination, protocol), tally in sorted(edges.items())
        if tally.http_seen or tally.tcp_seen
    )
    return edge_rows, _signals(services, "service"), _signals(workloads, "workload")


def _signals(tallies: Mapping[tuple[str, str], _Tally], kind: str) -> tuple[GoldenSignals, ...]:
    return tuple(
        GoldenSignals(
            namespace=namespace,
            name=name,
            kind=kind,
            rps=tally.requests,
            success_rate=1 - tally.server_errors / tally.requests if tally.requests > 0 else None,
            p50_ms=tally.quantile(0.5),
            p95_ms=tally.quantile(0.95),
            p99_ms=tally.quantile(0.99),
            tcp_connections_per_second=tally.connections,
        )
        for (namespace, name), tally in sorted(tallies.items())
        if tally.http_seen or tally.tcp_seen
    )


def _telemetry(samples: Iterable[RateSample], problems: Sequence[str]) -> MeshTelemetry:
    edges, services, workloads = aggregate(samples)
    return MeshTelemetry(edges=edges, services=services, workloads=workloads, problems=tuple(problems))


def _reason(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return getattr(reason, "strerror", None) or str(reason)
    return str(exc) or type(exc).__name__


# --- the sources ---


class PrometheusTelemetry:
    """Telemetry from a Prometheus that scrapes the proxies (`url` like http://host:9090)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.answered = False  # whether the last snapshot's queries all succeeded

    def snapshot(self, window_seconds: float) -> MeshTelemetry:
        """Rates over the last `window_seconds`, as of now."""
        window = promql.duration_literal(window_seconds)
        self.answered = False
        samples: list[RateSample] = []
        for name, query in promql.telemetry_queries(window).items():
            try:
                samples += parse_query_response(name, self._query(query))
            except (OSError, ValueError) as exc:
                problem = (
                    f"Prometheus at {self.url} unreachable: {_reason(exc)}"
                    if isinstance(exc, OSError) and not isinstance(exc, urllib.error.HTTPError)
                    else f"Prometheus at {self.url}: query {query!r} failed: {_reason(exc)}"
                )
                _log.info("cannot read telemetry from Prometheus", url=self.url, error=problem)
                return _telemetry((), [problem])
        self.answered = True
        return _telemetry(samples, self._down_targets())

    def _down_targets(self) -> list[str]:
        """Scrape targets Prometheus could not read last time: their numbers are missing."""
        try:
            down = parse_query_response("up", self._query("up == 0"))
        except (OSError, ValueError) as exc:
            return [f"Prometheus at {self.url}: cannot list scrape targets: {_reason(exc)}"]
        return [
            f"Prometheus at {self.url} cannot scrape {sample.labels.get('instance', '?')} (job {sample.labels.get('job', '?')})"
            for sample in sorted(down, key=lambda s: s.labels.get("instance", ""))
        ]

    def _query(self, query: str) -> Mapping:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            # Prometheus answers a bad query 400 with a JSON error body that says why.
            try:
                return json.loads(exc.read())
            except ValueError:
                raise exc from None


class ScrapeTelemetry:
    """Telemetry from scraping the proxies' `/metrics` directly (no Prometheus needed).

    The first `snapshot` scrapes, sleeps `window_seconds` and scrapes again. Later calls
    reuse the previous call's scrape as the start of the window, so a caller polling every
    `window_seconds` or slower never sleeps; a sooner call sleeps until the window is full.
    """

    def __init__(self, proxies: Sequence[MeshProxy]) -> None:
        self.proxies = tuple(proxies)
        self._previous: dict[MeshProxy, tuple[float, CounterValues]] = {}

    def snapshot(self, window_seconds: float) -> MeshTelemetry:
        if not self._previous:
            self._previous = self._scrape_all()[0]
        if self._previous:
            oldest = min(at for at, _ in self._previous.values())
            time.sleep(max(0.0, window_seconds - (time.monotonic() - oldest)))
        current, problems = self._scrape_all()
        samples: list[RateSample] = []
        for proxy, (at, values) in current.items():
            if proxy in self._previous:
                before_at, before = self._previous[proxy]
                samples += counter_rates(before, values, at - before_at)
        self._previous = {**self._previous, **current}
        return _telemetry(samples, problems)

    def _scrape_all(self) -> tuple[dict[MeshProxy, tuple[float, CounterValues]], list[str]]:
        scraped, problems = {}, []
        for proxy in self.proxies:
            try:
                with urllib.request.urlopen(proxy.metrics_url, timeout=HTTP_TIMEOUT_SECONDS) as response:
                    text = response.read().decode()
                scraped[proxy] = (time.monotonic(), parse_exposition(text))
            except (OSError, ValueError) as exc:
                problem = f"{proxy.kind} {proxy.name} ({proxy.metrics_url}): {_reason(exc)}"
                _log.info("cannot scrape a proxy", proxy=proxy.name, url=proxy.metrics_url, error=_reason(exc))
                problems.append(problem)
        return scraped, problems
