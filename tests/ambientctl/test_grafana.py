"""deploy/grafana: the shipped dashboards are what ambientctl/grafana.py generates, and their
PromQL uses only metric names and labels our proxies export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ambientctl import grafana
from meshcore.metrics import new_registry
from waypoint.metrics import PeerLabels, RequestRecord, WaypointMetrics
from ztunnel.metrics import ZtunnelMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
# Labels Prometheus adds to every scraped series, and the histogram bucket bound.
_PROMETHEUS_LABELS = {"instance", "job", "le", "__name__"}
_PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "label_values"}


def _exported() -> tuple[set[str], set[str]]:
    """Sample names and label names our ztunnel and waypoint expose."""
    names, labels = set(), set()
    for metrics_class in (WaypointMetrics, ZtunnelMetrics):
        registry = new_registry()
        metrics = metrics_class(registry)
        if isinstance(metrics, WaypointMetrics):  # its series exist once a request was counted
            metrics.record(_A_REQUEST)
        for family in registry.collect():
            names.add(family.name)
            if family.type == "counter":
                names.add(f"{family.name}_total")
            if family.type == "histogram":
                names |= {f"{family.name}_bucket", f"{family.name}_count", f"{family.name}_sum"}
            labels |= {label for sample in family.samples for label in sample.labels}
        # prometheus_client metrics declare their label names before any sample exists.
        labels |= {label for collector in registry._collector_to_names for label in getattr(collector, "_labelnames", ())}
    return names, labels


_A_REQUEST = RequestRecord(
    source=PeerLabels(), source_address="10.0.0.1:40000", destination=PeerLabels(), destination_address="10.0.0.2:8080",
    service_host="reviews.default.svc.cluster.local", service_name="reviews", service_namespace="default",
    method="GET", authority="reviews:9080", path="/", protocol="http", http_version="HTTP/1.1",
    response_code=200, response_flags="-", response_code_details="via_upstream", grpc_status="",
    duration_ms=1.0, request_bytes=0, response_bytes=10, upstream_cluster=None, attempts=1, trace_id="0" * 32,
)


def _all_queries() -> list[tuple[str, str, str]]:
    queries = []
    for path in sorted(DEPLOY.glob("*.json")):
        dashboard = json.loads(path.read_text())
        queries += [(path.name, variable["name"], variable["definition"]) for variable in dashboard["templating"]["list"] if variable["type"] == "query"]
        queries += [(path.name, panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]
    return queries


@pytest.mark.parametrize("build", grafana.DASHBOARDS, ids=lambda build: build.__name__)
def test_the_shipped_dashboard_is_the_generated_one(build):
    dashboard = build()
    shipped = DEPLOY / dashboard.file_name
    assert shipped.exists(), f"{shipped} is missing: run `python -m ambientctl.grafana`"
    assert shipped.read_text() == grafana.render(dashboard), f"{shipped} is stale: run `python -m ambientctl.grafana`"


def test_four_dashboards_with_istios_variables():
    by_uid = {grafana.grafana_json(build())["uid"]: grafana.grafana_json(build()) for build in grafana.DASHBOARDS}
    variables = {uid: [v["name"] for v in body["templating"]["list"]] for uid, body in by_uid.items()}
    assert variables == {
        "ambient-mesh": ["datasource"],
        "ambient-service": ["datasource", "namespace", "service"],
        "ambient-workload": ["datasource", "namespace", "workload"],
        "ambient-ztunnel": ["datasource"],
    }


def test_queries_use_only_exported_metric_names_and_labels():
    names, labels = _exported()
    assert "istio_requests_total" in names and "source_workload" in labels  # the registry was read
    for file_name, where, expr in _all_queries():
        used_names = set(re.findall(r"\b(istio_[a-z_]+)\b", expr))
        assert used_names <= names, f"{file_name} {where!r}: {used_names - names} not exported"
        grouped = {label.strip() for clause in re.findall(r"by \(([^)]*)\)", expr) for label in clause.split(",")}
        matched = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
        tail = set(re.findall(r",\s*(\w+)\)$", expr)) if expr.startswith("label_values") else set()
        used_labels = grouped | matched | tail
        assert used_labels <= labels | _PROMETHEUS_LABELS, f"{file_name} {where!r}: {used_labels - labels - _PROMETHEUS_LABELS}"


def test_every_panel_has_a_query_and_a_unique_title():
    for build in grafana.DASHBOARDS:
        body = grafana.grafana_json(build())
        titles = [panel["title"] for panel in body["panels"]]
        assert len(titles) == len(set(titles)), body["uid"]
        assert all(panel["targets"] and all(t["expr"] for t in panel["targets"]) for panel in body["panels"])
