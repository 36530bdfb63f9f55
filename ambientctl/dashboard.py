"""ambientctl/dashboard: `ambientctl dashboard`, the mesh's built-in web page.

    ambientctl dashboard [--address 127.0.0.1] [--port 20001] [--prometheus URL]

A small HTTP server (meshcore/admin.py's h11-on-trio server) serves one page
(dashboard_static/: plain JS and SVG, nothing fetched from elsewhere) and `/api/snapshot`, the
JSON the page polls: the service graph (nodes = workloads and services, edges = traffic with
rps, error rate, p99 and mTLS), per-service golden signals over the last 15 minutes, enrolled
namespaces, waypoints with readiness, certificate expiry, and plain problem sentences.

Every SAMPLE_SECONDS a sampler takes, in a worker thread (the data layer is synchronous),
the mesh's telemetry (Prometheus with --prometheus, else scraping the proxies directly), the
run dir's namespaces, waypoints and root CA, and the ztunnels' workload certificates from their
/config_dump; the snapshot is then built by pure functions, and requests only read the latest.
A source that fails becomes a problem sentence on the page; the rest keeps updating.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import prometheus_client
import trio
from cryptography import x509

from ambientctl.proxies import MeshProxy, local_proxies
from ambientctl.runtime import RunDir, running_supervisor
from ambientctl.runtime.manifests import is_builtin
from ambientctl.runtime.store import ObjectStore, StoreError
from ambientctl.telemetry import GoldenSignals, MeshTelemetry, PrometheusTelemetry, ScrapeTelemetry, TrafficEdge
from ambientctl.waypoints import DATAPLANE_MODE_LABEL, USE_WAYPOINT_LABEL, WaypointInfo, list_waypoints
from istiod_lite.ca.root import CA_CERT_FILE
from meshcore.admin import HttpHandler, Request, Response, metrics_routes, serve_http
from meshcore.log import get_logger
from meshcore.metrics import UNKNOWN, new_registry

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 20001
SAMPLE_SECONDS = 5.0
HISTORY_SECONDS = 15 * 60.0
# Prometheus rates over this window: at least two scrapes at Prometheus' default 15 s interval.
PROMETHEUS_WINDOW_SECONDS = 30.0
# A sampling round that takes longer is abandoned and reported; the next one starts on time.
SAMPLE_TIMEOUT_SECONDS = 20.0
CONFIG_DUMP_TIMEOUT_SECONDS = 2.0
ZTUNNEL_ADMIN_PORT = 15000
# Certificates closer than this to expiry are flagged (workload certificates live 24 h and are
# renewed at half life, so one this close was not renewed).
EXPIRY_WARNING_SECONDS = 3600.0
STATIC_DIR = Path(__file__).resolve().parent / "dashboard_static"
_STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
EXTERNAL_NODE = UNKNOWN  # telemetry's name for a source outside the mesh

_log = get_logger("dashboard")


class CertificateReadError(Exception):
    """A certificate source could not be read; the message names the source and the field."""


# --- what one sampling round collects ---


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    name: str
    enrolled: bool  # istio.io/dataplane-mode=ambient
    use_waypoint: str | None


@dataclass(frozen=True, slots=True)
class MeshInventory:
    """What the run dir says: whether a mesh runs, its namespaces and waypoints."""

    running: bool
    namespaces: tuple[NamespaceInfo, ...] = ()
    waypoints: tuple[WaypointInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    subject: str  # a SPIFFE id, or the root's subject
    holder: str  # "istiod root CA", "ztunnel node-1"
    not_after: datetime


@dataclass(frozen=True, slots=True)
class Sample:
    """One sampling round's inputs to the page."""

    taken_at: float  # unix seconds
    telemetry: MeshTelemetry
    inventory: MeshInventory
    certificates: tuple[CertificateInfo, ...]
    problems: tuple[str, ...] = ()  # from the run dir and the proxies' config dumps
    notes: tuple[str, ...] = ()


# (taken_at, services' golden signals) per round, oldest first.
History = tuple[tuple[float, tuple[GoldenSignals, ...]], ...]


def extend_history(history: History, taken_at: float, services: tuple[GoldenSignals, ...], *, keep_seconds: float = HISTORY_SECONDS) -> History:
    """`history` plus one round, without rounds older than `keep_seconds` before it."""
    return (*(entry for entry in history if entry[0] > taken_at - keep_seconds), (taken_at, services))


# --- the service graph ---


@dataclass(frozen=True, slots=True)
class GraphNode:
    id: str  # "<kind>:<namespace>/<name>", or EXTERNAL_NODE
    kind: str  # "service" | "workload" | "waypoint" (a waypoint's workload) | "external"
    namespace: str
    name: str
    layer: int  # column, left to right, following traffic
    x: float
    y: float


@dataclass(frozen=True, slots=True)
class GraphEdge:
    """The traffic from one node to another: HTTP (from a waypoint) and TCP (from ztunnels) merged."""

    source: str  # node ids
    destination: str
    source_name: str  # telemetry's names: "namespace/name" or "unknown"
    destination_name: str
    protocols: tuple[str, ...]  # ("http", "tcp"), ("tcp",), ...
    rps: float  # HTTP requests/s when HTTP was seen, else TCP connections/s
    error_rate: float | None  # HTTP 5xx share
    p99_ms: float | None
    mtls: bool  # every part of it was mutual TLS
    connections_per_second: float
    bytes_per_second: float


@dataclass(frozen=True, slots=True)
class GraphLayout:
    nodes: tuple[GraphNode, ...]
    edges: tuple[GraphEdge, ...]
    width: float
    height: float


COLUMN_WIDTH = 420.0
ROW_HEIGHT = 110.0
GRAPH_MARGIN = 90.0


def _node_id(kind: str, name: str) -> str:
    return EXTERNAL_NODE if name == EXTERNAL_NODE else f"{kind}:{name}"


def merge_edges(edges: Iterable[TrafficEdge], service_names: set[str]) -> tuple[GraphEdge, ...]:
    """One edge per (source, destination) with traffic in the window, sorted by names."""
    pairs: dict[tuple[str, str], list[TrafficEdge]] = {}
    for edge in edges:
        if edge.rps > 0 or edge.bytes_per_second > 0:  # series that only exist from earlier traffic
            pairs.setdefault((edge.source, edge.destination), []).append(edge)
    merged = []
    for (source, destination), parts in sorted(pairs.items()):
        http = next((part for part in parts if part.protocol == "http"), None)
        tcp = [part for part in parts if part.protocol != "http"]
        merged.append(GraphEdge(
            source=_node_id("workload", source),
            destination=_node_id("service" if destination in service_names else "workload", destination),
            source_name=source,
            destination_name=destination,
            protocols=tuple(sorted({part.protocol for part in parts})),
            rps=http.rps if http else sum((part.rps for part in tcp), 0.0),
            error_rate=http.error_rate if http else None,
            p99_ms=http.p99_ms if http else None,
            mtls=all(part.mtls for part in parts),
            connections_per_second=sum((part.rps for part in tcp), 0.0),
            bytes_per_second=sum((part.bytes_per_second for part in parts), 0.0),
        ))
    return tuple(merged)


def layout_graph(
    edges: Iterable[TrafficEdge], services: Iterable[GoldenSignals], waypoints: Iterable[str] = (),
) -> GraphLayout:
    """Nodes for every end of an edge with traffic and every service with signals, in columns
    that follow traffic.

    A node's column is its longest path from a node nobody calls (edges closing a cycle are
    ignored for this, found by a depth-first walk in name order). Inside a column nodes are
    ordered by the mean row of their callers, then of their callees (one barycentre sweep each
    way, which uncrosses most edges), ties by name. Same input, same picture. Workloads named in
    `waypoints` ("namespace/name") are drawn as waypoints.
    """
    service_names = {f"{s.namespace}/{s.name}" for s in services}
    waypoint_names = set(waypoints)
    merged = merge_edges(edges, service_names)
    names: dict[str, tuple[str, str]] = {}  # node id -> (kind, "namespace/name")
    for edge in merged:
        for node_id, name in ((edge.source, edge.source_name), (edge.destination, edge.destination_name)):
            kind = "external" if node_id == EXTERNAL_NODE else node_id.partition(":")[0]
            names[node_id] = ("waypoint" if kind == "workload" and name in waypoint_names else kind, name)
    for name in service_names:
        names[_node_id("service", name)] = ("service", name)
    nodes = sorted(names)
    successors: dict[str, list[str]] = {node: [] for node in nodes}
    for edge in merged:
        if edge.destination not in successors[edge.source]:
            successors[edge.source].append(edge.destination)
    layers = _longest_path_layers(nodes, successors)

    columns: dict[int, list[str]] = {}
    for node_id in sorted(nodes, key=lambda n: (names[n][1], names[n][0])):
        columns.setdefault(layers[node_id], []).append(node_id)
    tallest = max((len(column) for column in columns.values()), default=0)
    _order_by_neighbours(columns, successors, tallest)

    placed = []
    for layer, column in sorted(columns.items()):
        top = GRAPH_MARGIN + (tallest - len(column)) * ROW_HEIGHT / 2  # centre short columns
        for row, node_id in enumerate(column):
            kind, name = names[node_id]
            namespace, _, short = name.rpartition("/")
            placed.append(GraphNode(
                id=node_id, kind=kind, namespace=namespace, name=short, layer=layer,
                x=GRAPH_MARGIN + layer * COLUMN_WIDTH, y=top + row * ROW_HEIGHT,
            ))
    return GraphLayout(
        nodes=tuple(placed),
        edges=merged,
        width=2 * GRAPH_MARGIN + max(len(columns) - 1, 0) * COLUMN_WIDTH,
        height=2 * GRAPH_MARGIN + max(tallest - 1, 0) * ROW_HEIGHT,
    )


def _longest_path_layers(nodes: Sequence[str], successors: Mapping[str, list[str]]) -> dict[str, int]:
    incoming = dict.fromkeys(nodes, 0)
    for node in nodes:
        for target in successors[node]:
            incoming[target] += 1
    roots = [node for node in nodes if incoming[node] == 0]
    # Depth-first from the roots, then from whatever only a cycle reaches; an edge to a node on
    # the current path closes a cycle and is left out. Post-order reversed is a topological order.
    on_path: set[str] = set()
    done: set[str] = set()
    order: list[str] = []
    forward: dict[str, list[str]] = {node: [] for node in nodes}

    def visit(start: str) -> None:
        stack = [(start, iter(successors[start]))]
        on_path.add(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.discard(node)
                done.add(node)
                order.append(node)
            elif child not in on_path:
                forward[node].append(child)
                if child not in done:
                    on_path.add(child)
                    stack.append((child, iter(successors[child])))

    for node in [*roots, *nodes]:
        if node not in done:
            visit(node)
    layers = dict.fromkeys(nodes, 0)
    for node in reversed(order):
        for child in forward[node]:
            layers[child] = max(layers[child], layers[node] + 1)
    return layers


def _order_by_neighbours(columns: dict[int, list[str]], successors: Mapping[str, list[str]], tallest: int) -> None:
    """Reorder each column (in place) by its neighbours' mean row in the column before, then after."""
    predecessors: dict[str, list[str]] = {node: [] for column in columns.values() for node in column}
    for node, targets in successors.items():
        for target in targets:
            predecessors[target].append(node)

    def rows() -> dict[str, float]:
        # Rows as drawn: short columns are centred, so compare positions, not indexes.
        return {node: (tallest - len(column)) / 2 + index for column in columns.values() for index, node in enumerate(column)}

    layer_of = {node: layer for layer, column in columns.items() for node in column}
    down, up = sorted(columns)[1:], sorted(columns, reverse=True)[1:]
    # Down: callers (columns to the left) are placed; up: callees (to the right) are.
    for neighbours, sweep, side in ((predecessors, down, -1), (successors, up, 1)):
        for layer in sweep:
            position, column = rows(), columns[layer]
            keys = {}
            for index, node in enumerate(column):
                near = [position[other] for other in neighbours[node] if (layer_of[other] - layer) * side > 0]
                keys[node] = (sum(near) / len(near) if near else position[node], index)
            columns[layer] = sorted(column, key=keys.__getitem__)


# --- the snapshot the page renders ---


def _finite(value: float | None) -> float | None:
    """JSON has no NaN/inf; a rate over an empty window is no value."""
    return value if value is not None and math.isfinite(value) else None


def _signals_json(signals: GoldenSignals) -> dict[str, Any]:
    return {
        "rps": _finite(signals.rps),
        "successRate": _finite(signals.success_rate),
        "p50Ms": _finite(signals.p50_ms),
        "p95Ms": _finite(signals.p95_ms),
        "p99Ms": _finite(signals.p99_ms),
        "tcpConnectionsPerSecond": _finite(signals.tcp_connections_per_second),
    }


def _service_history(history: History) -> dict[tuple[str, str], list[dict[str, Any]]]:
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for taken_at, services in history:
        for signals in services:
            series.setdefault((signals.namespace, signals.name), []).append({"t": taken_at, **_signals_json(signals)})
    return series


def _certificate_json(cert: CertificateInfo, now: float) -> dict[str, Any]:
    remaining = cert.not_after.timestamp() - now
    state = "expired" if remaining <= 0 else "expiring" if remaining < EXPIRY_WARNING_SECONDS else "ok"
    return {
        "subject": cert.subject,
        "holder": cert.holder,
        "notAfter": cert.not_after.astimezone(UTC).isoformat(),
        "expiresInSeconds": round(remaining),
        "state": state,
    }


def build_snapshot(
    sample: Sample | None, history: History, *, source: str, run_dir: str, now: float, extra_problems: Sequence[str] = (),
) -> dict[str, Any]:
    """The `/api/snapshot` document for the latest complete round (None: none yet); `extra_problems`
    say why the latest round did not complete."""
    document: dict[str, Any] = {
        "generatedAt": datetime.fromtimestamp(now, UTC).isoformat(),
        "source": source,
        "runDir": run_dir,
        "sampleSeconds": SAMPLE_SECONDS,
    }
    if sample is None:
        return {
            **document, "mesh": {"running": None, "namespaces": [], "waypoints": []},
            "graph": {"width": 0, "height": 0, "nodes": [], "edges": []},
            "services": [], "certificates": [], "problems": list(extra_problems), "notes": ["Collecting the first sample ..."],
        }
    telemetry, inventory = sample.telemetry, sample.inventory
    layout = layout_graph(telemetry.edges, telemetry.services, (f"{w.namespace}/{w.name}" for w in inventory.waypoints))
    series = _service_history(history)
    problems = [*extra_problems, *sample.problems, *telemetry.problems]
    notes = list(sample.notes)
    if not inventory.running:
        problems.insert(0, f"No mesh is running (run dir {run_dir}): start one with `ambientctl up`.")
    elif not layout.edges:
        notes.insert(0, "No traffic right now: the graph fills in as soon as workloads talk to each other.")
    return {
        **document,
        "takenAt": datetime.fromtimestamp(sample.taken_at, UTC).isoformat(),
        "mesh": {
            "running": inventory.running,
            "namespaces": [
                {"name": ns.name, "enrolled": ns.enrolled, "useWaypoint": ns.use_waypoint} for ns in inventory.namespaces
            ],
            "waypoints": [
                {
                    "namespace": w.namespace, "name": w.name, "trafficType": w.traffic_type,
                    "readyPods": w.ready_pods, "pods": w.pods, "ready": w.pods > 0 and w.ready_pods == w.pods,
                }
                for w in inventory.waypoints
            ],
        },
        "graph": {
            "width": layout.width,
            "height": layout.height,
            "nodes": [
                {"id": n.id, "kind": n.kind, "namespace": n.namespace, "name": n.name, "layer": n.layer, "x": n.x, "y": n.y}
                for n in layout.nodes
            ],
            "edges": [
                {
                    "source": e.source, "destination": e.destination,
                    "sourceName": e.source_name, "destinationName": e.destination_name,
                    "protocols": list(e.protocols), "rps": _finite(e.rps), "errorRate": _finite(e.error_rate),
                    "p99Ms": _finite(e.p99_ms), "mtls": e.mtls,
                    "connectionsPerSecond": _finite(e.connections_per_second), "bytesPerSecond": _finite(e.bytes_per_second),
                }
                for e in layout.edges
            ],
        },
        "services": [
            {
                "namespace": s.namespace, "name": s.name, "current": _signals_json(s),
                "history": series.get((s.namespace, s.name), []),
            }
            for s in sorted(telemetry.services, key=lambda s: (s.namespace, s.name))
        ],
        "certificates": [_certificate_json(c, now) for c in sorted(sample.certificates, key=lambda c: (c.not_after, c.subject))],
        "problems": problems,
        "notes": notes,
    }


# --- reading the run dir and the proxies ---


def read_inventory(run_dir: RunDir) -> MeshInventory:
    """Namespaces and waypoints from the object store; whether `up` runs for this run dir."""
    running = running_supervisor(run_dir) is not None
    if not run_dir.store.exists():
        return MeshInventory(running=running)
    store = ObjectStore(run_dir.store)
    namespaces = []
    for key, body in sorted(store.objects().items()):
        if is_builtin(key, "Namespace"):
            labels = (body.get("metadata") or {}).get("labels") or {}
            namespaces.append(NamespaceInfo(
                name=key.name, enrolled=labels.get(DATAPLANE_MODE_LABEL) == "ambient", use_waypoint=labels.get(USE_WAYPOINT_LABEL),
            ))
    return MeshInventory(running=running, namespaces=tuple(namespaces), waypoints=tuple(list_waypoints(store)))


def read_root_certificate(run_dir: RunDir) -> CertificateInfo | None:
    """istiod_lite's root CA certificate from the run dir; None if the mesh never started."""
    path = run_dir.root / "istiod" / "ca" / CA_CERT_FILE
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CertificateReadError(f"root CA certificate {path}: {exc.strerror}") from exc
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertificateReadError(f"root CA certificate {path}: not a PEM certificate ({exc})") from exc
    return CertificateInfo(subject=cert.subject.rfc4514_string(), holder="istiod root CA", not_after=cert.not_valid_after_utc)


def certificates_from_config_dump(dump: Any, holder: str) -> tuple[CertificateInfo, ...]:
    """The workload certificates a ztunnel's /config_dump lists under `certificates`."""
    if not isinstance(dump, dict) or not isinstance(dump.get("certificates"), list):
        raise CertificateReadError(f"{holder} /config_dump: `certificates` is missing or not a list")
    found = []
    for index, entry in enumerate(dump["certificates"]):
        where = f"{holder} /config_dump: certificates[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("identity"), str):
            raise CertificateReadError(f"{where}.identity is missing or not a string")
        try:
            not_after = datetime.fromisoformat(entry["notAfter"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CertificateReadError(f"{where}.notAfter is not an ISO 8601 time: {entry.get('notAfter')!r}") from exc
        if not_after.tzinfo is None:
            not_after = not_after.replace(tzinfo=UTC)
        found.append(CertificateInfo(subject=entry["identity"], holder=holder, not_after=not_after))
    return tuple(found)


def fetch_workload_certificates(proxy: MeshProxy) -> tuple[CertificateInfo, ...]:
    """A ztunnel's workload certificates, from its admin port (on the node address here)."""
    url = f"http://{proxy.address}:{ZTUNNEL_ADMIN_PORT}/config_dump"
    holder = f"ztunnel {proxy.name}"
    try:
        with urllib.request.urlopen(url, timeout=CONFIG_DUMP_TIMEOUT_SECONDS) as response:
            dump = json.loads(response.read())
    except (OSError, urllib.error.URLError) as exc:
        raise CertificateReadError(f"{holder} does not answer at {url}: {getattr(exc, 'reason', exc)}") from exc
    except ValueError as exc:
        raise CertificateReadError(f"{holder} at {url}: /config_dump is not JSON ({exc})") from exc
    return certificates_from_config_dump(dump, holder)


# --- the server ---


class _TelemetrySource:
    """Prometheus, or scraping the proxies; the scraper follows the proxies as they come and go."""

    def __init__(self, prometheus_url: str | None) -> None:
        self._prometheus = PrometheusTelemetry(prometheus_url) if prometheus_url else None
        self.description = f"Prometheus at {prometheus_url}" if prometheus_url else "scraping the mesh's proxies directly"
        self._proxies: tuple[MeshProxy, ...] = ()
        self._scraper: ScrapeTelemetry | None = None

    def snapshot(self, proxies: tuple[MeshProxy, ...]) -> MeshTelemetry:
        if self._prometheus is not None:
            return self._prometheus.snapshot(PROMETHEUS_WINDOW_SECONDS)
        if self._scraper is None or proxies != self._proxies:
            # A new scraper has no previous scrape: its first rates cover one short window.
            self._proxies, self._scraper = proxies, ScrapeTelemetry(list(proxies))
        return self._scraper.snapshot(SAMPLE_SECONDS)


class Dashboard:
    """Samples the mesh every SAMPLE_SECONDS and serves the page and its JSON."""

    def __init__(self, run_dir: RunDir, prometheus_url: str | None) -> None:
        self.run_dir = run_dir
        self._telemetry = _TelemetrySource(prometheus_url)
        # An abandoned (timed-out) round may still run in its thread; rounds never overlap.
        self._sampling = threading.Lock()
        self._sample: Sample | None = None
        self._history: History = ()
        self._round_problems: tuple[str, ...] = ()  # this round's own failure (timeout, error)
        self.registry = new_registry()
        self._samples = prometheus_client.Counter(
            "ambientctl_dashboard_samples", "Sampling rounds, by outcome (ok, error, timeout).", ["outcome"], registry=self.registry,
        )
        self._problems = prometheus_client.Gauge(
            "ambientctl_dashboard_problems", "Problem sentences the page shows now.", registry=self.registry,
        )
        self._snapshot_json = self._render(time.time())
        self._static = {path: (STATIC_DIR / name).read_bytes() for path, (name, _) in _STATIC_FILES.items()}

    def routes(self) -> dict[str, HttpHandler]:
        def static(path: str, content_type: str) -> HttpHandler:
            async def serve(request: Request) -> Response:
                return Response(200, self._static[path], content_type)
            return serve

        async def snapshot(request: Request) -> Response:
            return Response(200, self._snapshot_json, "application/json")

        routes = {path: static(path, content_type) for path, (_, content_type) in _STATIC_FILES.items()}
        return {**routes, "/api/snapshot": snapshot, "/metrics": metrics_routes(self.registry)["/metrics"]}

    async def run(self, address: tuple[str, int], *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, address, self.routes())
            task_status.started(port)
            await self._sample_forever()

    @property
    def source(self) -> str:
        return self._telemetry.description

    async def _sample_forever(self) -> None:
        while True:
            started = trio.current_time()
            self._round_problems = ()
            with trio.move_on_after(SAMPLE_TIMEOUT_SECONDS) as timeout:
                try:
                    sample = await trio.to_thread.run_sync(self.take_sample, abandon_on_cancel=True)
                except Exception as exc:  # a bug in a data source must not stop the page
                    _log.exception("sampling the mesh failed")
                    self._samples.labels("error").inc()
                    self._round_problems = (f"Sampling the mesh failed ({type(exc).__name__}: {exc}); see the dashboard's log.",)
                else:
                    self._samples.labels("ok").inc()
                    problems = sample.problems + sample.telemetry.problems
                    if self._sample is None or problems != self._sample.problems + self._sample.telemetry.problems:
                        _log.info("the mesh's problems changed", problems=list(problems))
                    self._sample = sample
                    self._history = extend_history(self._history, sample.taken_at, sample.telemetry.services)
            if timeout.cancelled_caught:
                _log.warning("sampling the mesh timed out", timeout=SAMPLE_TIMEOUT_SECONDS)
                self._samples.labels("timeout").inc()
                self._round_problems = (f"Sampling the mesh took longer than {SAMPLE_TIMEOUT_SECONDS:g} s; the page shows the last complete sample.",)
            self._snapshot_json = self._render(time.time())
            await trio.sleep(max(0.0, started + SAMPLE_SECONDS - trio.current_time()))

    def _render(self, now: float) -> bytes:
        document = build_snapshot(
            self._sample, self._history, source=self.source, run_dir=str(self.run_dir.root), now=now,
            extra_problems=self._round_problems,
        )
        self._problems.set(len(document["problems"]))
        return json.dumps(document, allow_nan=False).encode()

    def take_sample(self) -> Sample:
        """One round (blocking): telemetry, inventory, certificates; failures become problems."""
        with self._sampling:
            return self._take_sample()

    def _take_sample(self) -> Sample:
        problems: list[str] = []
        notes: list[str] = []
        try:
            inventory = read_inventory(self.run_dir)
        except StoreError as exc:
            problems.append(f"Cannot read the mesh's objects in {self.run_dir.store}: {exc}")
            inventory = MeshInventory(running=running_supervisor(self.run_dir) is not None)
        proxies = tuple(local_proxies(self.run_dir)) if inventory.running else ()
        telemetry = self._telemetry.snapshot(proxies)
        certificates: list[CertificateInfo] = []
        try:
            root = read_root_certificate(self.run_dir)
            if root is not None:
                certificates.append(root)
        except CertificateReadError as exc:
            problems.append(str(exc))
        for proxy in proxies:
            if proxy.kind != "ztunnel":
                continue  # a waypoint's admin port listens on its pod's loopback only
            try:
                certificates.extend(fetch_workload_certificates(proxy))
            except CertificateReadError as exc:
                problems.append(str(exc))
        if any(proxy.kind == "waypoint" for proxy in proxies):
            notes.append("Waypoint certificates are not listed: a waypoint's admin port is reachable only inside its pod.")
        return Sample(
            taken_at=time.time(), telemetry=telemetry, inventory=inventory,
            certificates=tuple(certificates), problems=tuple(problems), notes=tuple(notes),
        )


# --- the command ---


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    dashboard = commands.add_parser("dashboard", parents=[common], help="serve the mesh's web dashboard")
    dashboard.add_argument("--address", default=DEFAULT_ADDRESS, help=f"listen address (default: {DEFAULT_ADDRESS})")
    dashboard.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"listen port, 0 for any (default: {DEFAULT_PORT})")
    dashboard.add_argument("--prometheus", metavar="URL", help="read traffic from this Prometheus (default: scrape the proxies)")
    dashboard.set_defaults(command=_dashboard)


def prometheus_url_problem(url: str) -> str | None:
    """Why `url` cannot be a Prometheus base URL, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"--prometheus must be an http(s) URL such as http://127.0.0.1:9090, got {url!r}"
    try:
        parts.port
    except ValueError:
        return f"--prometheus has an invalid port: {url!r}"
    return None


def _dashboard(args: argparse.Namespace, run_dir: RunDir) -> int:
    if not 0 <= args.port <= 65535:
        print(f"ambientctl: error: --port must be between 0 and 65535, got {args.port}", file=sys.stderr)
        return 2
    if args.prometheus is not None and (problem := prometheus_url_problem(args.prometheus)):
        print(f"ambientctl: error: {problem}", file=sys.stderr)
        return 2
    dashboard = Dashboard(run_dir, args.prometheus)
    failures: list[OSError] = []
    try:
        trio.run(_serve_until_signal, dashboard, (args.address, args.port))
    except* OSError as group:  # the listen address: taken, or not ours
        failures.extend(_leaves(group))
    for exc in failures:
        print(f"ambientctl: error: {exc.strerror if exc.strerror else exc}", file=sys.stderr)
    return 1 if failures else 0


def _leaves(group: BaseExceptionGroup) -> list[Any]:
    return [leaf for exc in group.exceptions for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])]


async def _serve_until_signal(dashboard: Dashboard, address: tuple[str, int]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(dashboard.run, address)
            host = f"[{address[0]}]" if ":" in address[0] else address[0]
            print(f"dashboard: http://{host}:{port}/ (data: {dashboard.source}; Ctrl-C stops it)", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return
