"""ambientctl/grafana: the Grafana dashboards in deploy/grafana/, generated from ambientctl/promql.

    python -m ambientctl.grafana [DIR]     write the four dashboards (default: deploy/grafana)

Four dashboards modelled on Istio's own (manifests/addons/dashboards): mesh overview,
service, workload and ztunnel. Their panels use only Istio metric names and labels that our
ztunnels and waypoints export (and an Istio cluster exports too); request metrics come from
the waypoint (`reporter="waypoint"`), TCP metrics from the destination ztunnel
(`reporter="destination"`), outbound TCP from the source ztunnel. The templating variables
are Istio's: `namespace` plus `service` or `workload`, and the Prometheus data source.
Per-instance panels group by `instance`, which every Prometheus scrape adds.

Generating (rather than hand-editing JSON) keeps every panel's PromQL identical to what
`ambientctl stat` and the built-in dashboard compute; tests/ambientctl/test_grafana.py fails
when the files and this module disagree.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ambientctl import promql
from ambientctl.promql import (
    HTTP_REPORTER,
    MUTUAL_TLS,
    REQUESTS,
    SERVER_ERROR,
    TCP_CLOSED,
    TCP_FAILED,
    TCP_OPENED,
    TCP_RECEIVED_BYTES,
    TCP_REPORTER,
    TCP_SENT_BYTES,
    TCP_SOCKETS_OPEN,
    latency_quantile,
    rate_sum,
    success_rate,
)

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "deploy" / "grafana"
WINDOW = "$__rate_interval"
_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
_SOURCE_REPORTER = 'reporter="source"'
_QUANTILES = (0.5, 0.9, 0.99)
_SERVICE_LABELS = ("destination_service_namespace", "destination_service_name")
_SOURCE_LABELS = ("source_workload_namespace", "source_workload")
_SERVICE_LEGEND = "{{destination_service_namespace}}/{{destination_service_name}}"
_SOURCE_LEGEND = "{{source_workload_namespace}}/{{source_workload}}"
# Series that name every service and workload, with or without a waypoint in front.
_TRAFFIC_SERIES = f'{{__name__=~"{REQUESTS}|{TCP_OPENED}"}}'


@dataclass(frozen=True, slots=True)
class Target:
    expr: str
    legend: str = ""


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    kind: str  # "stat" | "timeseries" | "table"
    unit: str
    targets: tuple[Target, ...]
    description: str = ""


@dataclass(frozen=True, slots=True)
class Variable:
    name: str
    label: str
    query: str  # Grafana's label_values(selector, label)


@dataclass(frozen=True, slots=True)
class Dashboard:
    uid: str
    title: str
    file_name: str
    description: str
    variables: tuple[Variable, ...]
    panels: tuple[Panel, ...]


def _stat(title: str, expr: str, unit: str, description: str = "") -> Panel:
    return Panel(title=title, kind="stat", unit=unit, targets=(Target(expr),), description=description)


def _series(title: str, unit: str, *targets: Target, description: str = "") -> Panel:
    return Panel(title=title, kind="timeseries", unit=unit, targets=tuple(targets), description=description)


def _latency(title: str, matchers: Sequence[str]) -> Panel:
    return _series(
        title, "ms",
        *(Target(latency_quantile(q, matchers, WINDOW), f"P{q * 100:g}") for q in _QUANTILES),
        description="Request duration quantiles, interpolated in Envoy's histogram buckets",
    )


# --- the dashboards ---


def mesh_dashboard() -> Dashboard:
    four_xx = 'response_code=~"4.."'
    return Dashboard(
        uid="ambient-mesh",
        title="Istio Mesh Dashboard (ambient)",
        file_name="istio-mesh-dashboard.json",
        description="Global request volume, success rate and every service's golden signals",
        variables=(),
        panels=(
            _stat("Global Request Volume", rate_sum(REQUESTS, [HTTP_REPORTER], WINDOW), "reqps"),
            _stat("Global Success Rate (non-5xx responses)", success_rate([], WINDOW), "percentunit"),
            _stat("4xxs", rate_sum(REQUESTS, [HTTP_REPORTER, four_xx], WINDOW), "reqps"),
            _stat("5xxs", rate_sum(REQUESTS, [HTTP_REPORTER, SERVER_ERROR], WINDOW), "reqps"),
            _stat("TCP Connections Opened", rate_sum(TCP_OPENED, [TCP_REPORTER], WINDOW), "cps"),
            _stat(
                "mTLS Share of TCP Connections",
                promql.ratio(rate_sum(TCP_OPENED, [TCP_REPORTER, MUTUAL_TLS], WINDOW), rate_sum(TCP_OPENED, [TCP_REPORTER], WINDOW)),
                "percentunit",
            ),
            Panel(
                title="HTTP/gRPC Services", kind="table", unit="",
                targets=(
                    Target(rate_sum(REQUESTS, [HTTP_REPORTER], WINDOW, _SERVICE_LABELS), "Requests"),
                    *(Target(latency_quantile(q, [], WINDOW, _SERVICE_LABELS), f"P{q * 100:g} Latency") for q in _QUANTILES),
                    Target(success_rate([], WINDOW, _SERVICE_LABELS), "Success Rate"),
                ),
                description="Services behind a waypoint",
            ),
            Panel(
                title="TCP Services", kind="table", unit="",
                targets=(
                    Target(rate_sum(TCP_OPENED, [TCP_REPORTER], WINDOW, _SERVICE_LABELS), "Connections Opened"),
                    Target(rate_sum(TCP_RECEIVED_BYTES, [TCP_REPORTER], WINDOW, _SERVICE_LABELS), "Bytes Received"),
                    Target(rate_sum(TCP_SENT_BYTES, [TCP_REPORTER], WINDOW, _SERVICE_LABELS), "Bytes Sent"),
                ),
                description="Connections as the destination ztunnel sees them",
            ),
            _series("Request Rate by Service", "reqps", Target(rate_sum(REQUESTS, [HTTP_REPORTER], WINDOW, _SERVICE_LABELS), _SERVICE_LEGEND)),
        ),
    )


def service_dashboard() -> Dashboard:
    service = ['destination_service_namespace=~"$namespace"', 'destination_service_name=~"$service"']
    return Dashboard(
        uid="ambient-service",
        title="Istio Service Dashboard (ambient)",
        file_name="istio-service-dashboard.json",
        description="Inbound traffic of one service: requests through its waypoint, TCP at its pods' ztunnels",
        variables=(
            Variable("namespace", "Namespace", f"label_values({_TRAFFIC_SERIES}, destination_service_namespace)"),
            Variable(
                "service", "Service",
                f'label_values({{__name__=~"{REQUESTS}|{TCP_OPENED}", destination_service_namespace=~"$namespace"}}, destination_service_name)',
            ),
        ),
        panels=(
            _stat("Client Request Volume", rate_sum(REQUESTS, [HTTP_REPORTER, *service], WINDOW), "reqps"),
            _stat("Client Success Rate (non-5xx responses)", success_rate(service, WINDOW), "percentunit"),
            _stat("TCP Connections Opened", rate_sum(TCP_OPENED, [TCP_REPORTER, *service], WINDOW), "cps"),
            _latency("Client Request Duration", service),
            _series(
                "Incoming Requests by Source and Response Code", "reqps",
                Target(rate_sum(REQUESTS, [HTTP_REPORTER, *service], WINDOW, (*_SOURCE_LABELS, "response_code")), f"{_SOURCE_LEGEND} : {{{{response_code}}}}"),
            ),
            _series(
                "Incoming Success Rate (non-5xx responses) by Source", "percentunit",
                Target(success_rate(service, WINDOW, _SOURCE_LABELS), _SOURCE_LEGEND),
            ),
            _series(
                "Incoming Requests by Security Policy", "reqps",
                Target(rate_sum(REQUESTS, [HTTP_REPORTER, *service], WINDOW, ("connection_security_policy",)), "{{connection_security_policy}}"),
            ),
            _series(
                "TCP Connections Opened by Source and Security Policy", "cps",
                Target(
                    rate_sum(TCP_OPENED, [TCP_REPORTER, *service], WINDOW, (*_SOURCE_LABELS, "connection_security_policy")),
                    f"{_SOURCE_LEGEND} ({{{{connection_security_policy}}}})",
                ),
            ),
            _series(
                "TCP Bytes Received from and Sent to Clients", "Bps",
                Target(rate_sum(TCP_RECEIVED_BYTES, [TCP_REPORTER, *service], WINDOW, _SOURCE_LABELS), f"received from {_SOURCE_LEGEND}"),
                Target(rate_sum(TCP_SENT_BYTES, [TCP_REPORTER, *service], WINDOW, _SOURCE_LABELS), f"sent to {_SOURCE_LEGEND}"),
            ),
        ),
    )


def workload_dashboard() -> Dashboard:
    inbound = ['destination_workload_namespace=~"$namespace"', 'destination_workload=~"$workload"']
    outbound = ['source_workload_namespace=~"$namespace"', 'source_workload=~"$workload"']
    return Dashboard(
        uid="ambient-workload",
        title="Istio Workload Dashboard (ambient)",
        file_name="istio-workload-dashboard.json",
        description="One workload's inbound and outbound traffic",
        variables=(
            Variable("namespace", "Namespace", f"label_values({_TRAFFIC_SERIES}, destination_workload_namespace)"),
            Variable(
                "workload", "Workload",
                f'label_values({{__name__=~"{REQUESTS}|{TCP_OPENED}", destination_workload_namespace=~"$namespace"}}, destination_workload)',
            ),
        ),
        panels=(
            _stat("Incoming Request Volume", rate_sum(REQUESTS, [HTTP_REPORTER, *inbound], WINDOW), "reqps"),
            _stat("Incoming Success Rate (non-5xx responses)", success_rate(inbound, WINDOW), "percentunit"),
            _stat("Incoming TCP Connections Opened", rate_sum(TCP_OPENED, [TCP_REPORTER, *inbound], WINDOW), "cps"),
            _latency("Incoming Request Duration", inbound),
            _series(
                "Incoming Requests by Source and Response Code", "reqps",
                Target(rate_sum(REQUESTS, [HTTP_REPORTER, *inbound], WINDOW, (*_SOURCE_LABELS, "response_code")), f"{_SOURCE_LEGEND} : {{{{response_code}}}}"),
            ),
            _series(
                "Incoming TCP Connections by Source and Security Policy", "cps",
                Target(
                    rate_sum(TCP_OPENED, [TCP_REPORTER, *inbound], WINDOW, (*_SOURCE_LABELS, "connection_security_policy")),
                    f"{_SOURCE_LEGEND} ({{{{connection_security_policy}}}})",
                ),
            ),
            _series(
                "Incoming TCP Bytes", "Bps",
                Target(rate_sum(TCP_RECEIVED_BYTES, [TCP_REPORTER, *inbound], WINDOW), "received"),
                Target(rate_sum(TCP_SENT_BYTES, [TCP_REPORTER, *inbound], WINDOW), "sent"),
            ),
            _series(
                "Outgoing Requests by Destination and Response Code", "reqps",
                Target(rate_sum(REQUESTS, [HTTP_REPORTER, *outbound], WINDOW, (*_SERVICE_LABELS, "response_code")), f"{_SERVICE_LEGEND} : {{{{response_code}}}}"),
            ),
            _series(
                "Outgoing TCP Connections by Destination", "cps",
                Target(rate_sum(TCP_OPENED, [_SOURCE_REPORTER, *outbound], WINDOW, _SERVICE_LABELS), _SERVICE_LEGEND),
                description="As the workload's own ztunnel sees them; a destination behind a waypoint is that service",
            ),
        ),
    )


def ztunnel_dashboard() -> Dashboard:
    by_instance = ("instance",)
    return Dashboard(
        uid="ambient-ztunnel",
        title="Istio Ztunnel Dashboard (ambient)",
        file_name="ztunnel-dashboard.json",
        description="Each ztunnel's connections and bytes",
        variables=(),
        panels=(
            _series("Ztunnel Versions", "short", Target(f'sum by (tag) ({promql.BUILD}{{component="ztunnel"}})', "{{tag}}")),
            _series("Connections Opened", "cps", Target(rate_sum(TCP_OPENED, [], WINDOW, (*by_instance, "reporter")), "{{instance}} ({{reporter}})")),
            _series("Connections Closed", "cps", Target(rate_sum(TCP_CLOSED, [], WINDOW, (*by_instance, "reporter")), "{{instance}} ({{reporter}})")),
            _series(
                "Failed Connections by Response Flag", "cps",
                Target(rate_sum(TCP_FAILED, [], WINDOW, (*by_instance, "response_flags")), "{{instance}} {{response_flags}}"),
            ),
            _series("Bytes Sent", "Bps", Target(rate_sum(TCP_SENT_BYTES, [], WINDOW, by_instance), "{{instance}}")),
            _series("Bytes Received", "Bps", Target(rate_sum(TCP_RECEIVED_BYTES, [], WINDOW, by_instance), "{{instance}}")),
            _series("Open Sockets", "short", Target(f"sum by (instance, reporter) ({TCP_SOCKETS_OPEN})", "{{instance}} ({{reporter}})")),
        ),
    )


DASHBOARDS = (mesh_dashboard, service_dashboard, workload_dashboard, ztunnel_dashboard)


# --- Grafana JSON ---

_SIZES = {"stat": (6, 4), "timeseries": (12, 8), "table": (24, 8)}


def grafana_json(dashboard: Dashboard) -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (schema 38), panels laid out left to right."""
    panels, x, y, row_height = [], 0, 0, 0
    for panel_id, panel in enumerate(dashboard.panels, start=1):
        width, height = _SIZES[panel.kind]
        if x + width > 24:
            x, y, row_height = 0, y + row_height, 0
        panels.append(_panel_json(panel, panel_id, {"h": height, "w": width, "x": x, "y": y}))
        x, row_height = x + width, max(row_height, height)
    variables: list[dict[str, Any]] = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
    ]
    for variable in dashboard.variables:
        variables.append({
            "name": variable.name,
            "label": variable.label,
            "type": "query",
            "datasource": _DATASOURCE,
            "definition": variable.query,
            "query": {"query": variable.query, "refId": f"{variable.name}-query"},
            "refresh": 2,  # on time range change: new services show up
            "sort": 1,
            "includeAll": False,
            "multi": False,
            "current": {},
            "hide": 0,
        })
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["istio", "ambient"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 38,
        "time": {"from": "now-15m", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "templating": {"list": variables},
        "panels": panels,
    }


def _panel_json(panel: Panel, panel_id: int, grid: dict[str, int]) -> dict[str, Any]:
    table = panel.kind == "table"
    targets = [
        {
            "refId": chr(ord("A") + index),
            "datasource": _DATASOURCE,
            "expr": target.expr,
            "legendFormat": target.legend,
            "instant": table or panel.kind == "stat",
            "range": not table,
            "format": "table" if table else "time_series",
        }
        for index, target in enumerate(panel.targets)
    ]
    body: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": _DATASOURCE,
        "gridPos": grid,
        "fieldConfig": {"defaults": {"unit": panel.unit} if panel.unit else {}, "overrides": []},
        "targets": targets,
    }
    if panel.kind == "stat":
        body["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value"}
    elif table:
        # One row per service: the instant results joined on their labels.
        body["transformations"] = [{"id": "merge", "options": {}}, {"id": "organize", "options": {"excludeByName": {"Time": True}}}]
    else:
        body["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "lastNotNull"]}}
    return body


def render(dashboard: Dashboard) -> str:
    return json.dumps(grafana_json(dashboard), indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0].startswith("-")):
        print("usage: python -m ambientctl.grafana [DIR]   (default: deploy/grafana)", file=sys.stderr)
        return 2
    folder = Path(args[0]) if args else DEFAULT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for build in DASHBOARDS:
        dashboard = build()
        (folder / dashboard.file_name).write_text(render(dashboard))
        print(f"wrote {folder / dashboard.file_name} ({len(dashboard.panels)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
