"""`ambientctl stat`: golden signals per workload or service over a window, like `linkerd viz stat`.

    ambientctl stat [deploy|svc] [NAME] [-n NS | -A] [--window 30s] [--prometheus URL] [-o wide|json]

Rows are the workloads (Deployments, and Pods no controller owns: Istio's workloads) or the
Services of the one-machine mesh's object store, plus whatever else the metrics mention.
The numbers are the inbound traffic of each row over the window: from Prometheus with
`--prometheus`, else scraped from the running mesh's ztunnels and waypoints (which takes one
window). SUCCESS, RPS and latencies count HTTP requests (seen by waypoints); TCP_CONN counts
new TCP connections per second (seen by the destination's ztunnel). "-" means no traffic.

A proxy or Prometheus that cannot be read is a warning naming it; the rest is still printed.
Exit status: 0 printed; 1 no metrics source could be read at all, no mesh runs, or NAME was
not found; 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ambientctl.mesh import REDIRECTION_ANNOTATION
from ambientctl.proxies import local_proxies
from ambientctl.runtime import RunDir
from ambientctl.runtime.manifests import DEFAULT_NAMESPACE, is_builtin, owning_replica_set
from ambientctl.runtime.store import ObjectStore
from ambientctl.telemetry import GoldenSignals, MeshTelemetry, PrometheusTelemetry, ScrapeTelemetry, TrafficEdge

DEFAULT_WINDOW = "30s"
_KINDS = {
    **{alias: "workload" for alias in ("deploy", "deployment", "deployments", "workload", "workloads")},
    **{alias: "service" for alias in ("svc", "service", "services")},
}
_WINDOW_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_NO_VALUE = "-"


@dataclass(frozen=True, slots=True)
class Inventory:
    """A workload or service the object store knows, and how many of its pods are captured."""

    namespace: str
    name: str
    meshed_pods: int
    pods: int


@dataclass(frozen=True, slots=True)
class StatRow:
    namespace: str
    name: str
    kind: str  # "workload" | "service"
    meshed: str | None  # "1/2": captured pods / pods; None when the store does not know it
    success_rate: float | None
    rps: float | None  # None: no requests in the window
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    tcp_connections_per_second: float | None  # None: no new connections in the window
    clients: tuple[str, ...]  # source workloads of edges into the row
    mtls: bool | None  # every edge into the row is mutual TLS; None without edges


# --- pure ---


def parse_window(text: str) -> float:
    """Seconds in "30s", "1m", "500ms", "1.5" (seconds); ValueError names --window."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    seconds = float(match.group(1)) * _WINDOW_UNITS[match.group(2) or "s"] if match else 0.0
    if not match or seconds <= 0:
        raise ValueError(f"--window: expected a positive duration such as 30s, 1m or 500ms, got {text!r}")
    return seconds


def workload_name(pod: Mapping[str, Any]) -> str:
    """The workload a pod belongs to, as istiod_lite names it: its Deployment, else itself."""
    metadata = pod["metadata"]
    replica_set = owning_replica_set(pod)
    template_hash = (metadata.get("labels") or {}).get("pod-template-hash", "")
    if replica_set and template_hash and replica_set.endswith(f"-{template_hash}"):
        return replica_set[: -len(template_hash) - 1]
    return metadata["name"]


def inventory(objects: Mapping[Any, Mapping[str, Any]], kind: str) -> list[Inventory]:
    """The store's workloads or services with their captured/total pod counts."""
    pods = [body for key, body in objects.items() if is_builtin(key, "Pod")]

    def meshed(body: Mapping[str, Any]) -> bool:
        return (body["metadata"].get("annotations") or {}).get(REDIRECTION_ANNOTATION) == "enabled"

    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    if kind == "workload":
        for key, body in objects.items():
            if is_builtin(key, "Deployment"):
                groups.setdefault((key.namespace, key.name), [])
        for pod in pods:
            groups.setdefault((pod["metadata"]["namespace"], workload_name(pod)), []).append(pod)
    else:
        for key, body in objects.items():
            if not is_builtin(key, "Service"):
                continue
            selector = (body.get("spec") or {}).get("selector") or {}
            groups[(key.namespace, key.name)] = [
                pod for pod in pods
                if selector and pod["metadata"]["namespace"] == key.namespace
                and selector.items() <= (pod["metadata"].get("labels") or {}).items()
            ]
    return [
        Inventory(namespace=namespace, name=name, meshed_pods=sum(map(meshed, members)), pods=len(members))
        for (namespace, name), members in sorted(groups.items())
    ]


def stat_rows(
    kind: str, telemetry: MeshTelemetry, known: Sequence[Inventory], *, namespace: str | None, name: str | None
) -> list[StatRow]:
    """One row per known object and per object with traffic, in `namespace` (None: all), named `name` (None: any)."""
    signals = {(s.namespace, s.name): s for s in (telemetry.services if kind == "service" else telemetry.workloads)}
    known_by_key = {(i.namespace, i.name): i for i in known}
    rows = []
    for key in sorted(signals.keys() | known_by_key.keys()):
        if (namespace is not None and key[0] != namespace) or (name is not None and key[1] != name):
            continue
        item, signal = known_by_key.get(key), signals.get(key)
        edges = [edge for edge in telemetry.edges if edge.destination == f"{key[0]}/{key[1]}"]
        rows.append(_row(kind, key, item, signal, edges))
    return rows


def _row(kind: str, key: tuple[str, str], item: Inventory | None, signal: GoldenSignals | None, edges: Sequence[TrafficEdge]) -> StatRow:
    def rate(value: float | None) -> float | None:
        return value if value else None  # no requests (or no new connections) in the window: "-"

    return StatRow(
        namespace=key[0],
        name=key[1],
        kind=kind,
        meshed=f"{item.meshed_pods}/{item.pods}" if item is not None else None,
        success_rate=signal.success_rate if signal else None,
        rps=rate(signal.rps if signal else None),
        p50_ms=signal.p50_ms if signal else None,
        p95_ms=signal.p95_ms if signal else None,
        p99_ms=signal.p99_ms if signal else None,
        tcp_connections_per_second=rate(signal.tcp_connections_per_second if signal else None),
        clients=tuple(sorted({edge.source for edge in edges if edge.rps > 0})),
        mtls=all(edge.mtls for edge in edges) if edges else None,
    )


def render_table(rows: Sequence[StatRow], *, all_namespaces: bool, wide: bool) -> str:
    header = ["NAME", "MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99", "TCP_CONN"]
    header = (["NAMESPACE"] if all_namespaces else []) + header + (["MTLS", "FROM"] if wide else [])
    table = [header]
    for row in rows:
        cells = [
            row.name,
            row.meshed or _NO_VALUE,
            _format(row.success_rate, lambda v: f"{v * 100:.2f}%"),
            _format(row.rps, lambda v: f"{v:.2f}rps"),
            *(_format(value, _format_ms) for value in (row.p50_ms, row.p95_ms, row.p99_ms)),
            _format(row.tcp_connections_per_second, lambda v: f"{v:.2f}/s"),
        ]
        if all_namespaces:
            cells.insert(0, row.namespace)
        if wide:
            cells += [_NO_VALUE if row.mtls is None else ("yes" if row.mtls else "no"), ",".join(row.clients) or _NO_VALUE]
        table.append(cells)
    widths = [max(len(cell) for cell in column) for column in zip(*table)]
    return "\n".join("   ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table)


def _format(value: float | None, formatter: Callable[[float], str]) -> str:
    return _NO_VALUE if value is None or math.isnan(value) else formatter(value)


def _format_ms(value: float) -> str:
    return f"{value:.0f}ms" if value >= 10 else f"{value:.2g}ms"


# --- the command ---


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    stat = commands.add_parser(
        "stat", parents=[common], help="success rate, rps and latency per workload or service (like `linkerd viz stat`)",
        description=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stat.add_argument("kind", nargs="?", default="deploy", choices=sorted(_KINDS), metavar="deploy|svc",
                      help="workloads (default) or services")
    stat.add_argument("name", nargs="?", help="only this workload or service")
    scope = stat.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", default=DEFAULT_NAMESPACE)
    scope.add_argument("-A", "--all-namespaces", action="store_true")
    stat.add_argument("--window", default=DEFAULT_WINDOW, help=f"how far back rates look (default: {DEFAULT_WINDOW}; with --prometheus, at least two scrape intervals)")
    stat.add_argument("--prometheus", metavar="URL", help="read the metrics from this Prometheus instead of scraping the proxies")
    stat.add_argument("-o", "--output", choices=("wide", "json"), help="wide: adds MTLS and FROM (client workloads)")
    stat.set_defaults(command=_stat)


def _stat(args: argparse.Namespace, run_dir: RunDir) -> int:
    try:
        window = parse_window(args.window)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kind = _KINDS[args.kind]
    namespace = None if args.all_namespaces else args.namespace
    if args.prometheus:
        source = f"Prometheus at {args.prometheus}"
        prometheus = PrometheusTelemetry(args.prometheus)
        telemetry = prometheus.snapshot(window)
        unreadable = not prometheus.answered
    else:
        proxies = local_proxies(run_dir)
        if not proxies:
            print(f"error: no mesh running in {run_dir.root} (start one with `ambientctl up`, or pass --prometheus URL)", file=sys.stderr)
            return 1
        source = f"{len(proxies)} proxies of the mesh in {run_dir.root}"
        telemetry = ScrapeTelemetry(proxies).snapshot(window)
        unreadable = len(telemetry.problems) == len(proxies)
    for problem in telemetry.problems:
        print(f"warning: {problem}", file=sys.stderr)
    rows = stat_rows(kind, telemetry, inventory(ObjectStore(run_dir.store).objects(), kind), namespace=namespace, name=args.name)
    if args.output == "json":
        print(json.dumps({
            "source": source, "window_seconds": window, "problems": list(telemetry.problems), "rows": [asdict(row) for row in rows],
        }, indent=2))
    elif rows:
        print(render_table(rows, all_namespaces=args.all_namespaces, wide=args.output == "wide"))
    if args.name and not rows:
        print(f'error: {"service" if kind == "service" else "workload"} "{args.name}" not found'
              f'{"" if namespace is None else f" in namespace {namespace}"} (neither in the store nor in the metrics)', file=sys.stderr)
        return 1
    if args.output != "json":
        _say_what_is_missing(rows, kind, namespace, window)
    return 1 if unreadable else 0


def _say_what_is_missing(rows: Sequence[StatRow], kind: str, namespace: str | None, window: float) -> None:
    where = "" if namespace is None else f" in namespace {namespace}"
    if not rows:
        print(f"No {kind}s found{where}, and no traffic in the last {window:g}s.", file=sys.stderr)
    elif all(row.rps is None and row.tcp_connections_per_second is None for row in rows):
        print(f"no traffic{where} in the last {window:g}s", file=sys.stderr)
