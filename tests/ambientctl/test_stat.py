"""`ambientctl stat`: window parsing, the store's inventory, rows and the table (pure parts),
and the command against a Prometheus that does not answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from ambientctl.cli import main
from ambientctl.runtime.manifests import ObjectKey
from ambientctl.stat import Inventory, inventory, parse_window, render_table, stat_rows
from ambientctl.telemetry import GoldenSignals, MeshTelemetry, TrafficEdge


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("1m", 60), ("500ms", 0.5), ("2", 2), ("1.5s", 1.5), ("1h", 3600)])
def test_parse_window(text, seconds):
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "-1s", "thirty", "5d"])
def test_parse_window_refuses_nonsense_naming_the_option(text):
    with pytest.raises(ValueError, match="--window"):
        parse_window(text)


def _pod(namespace, name, labels, *, meshed, replica_set=None):
    metadata = {"name": name, "namespace": namespace, "labels": labels}
    if meshed:
        metadata["annotations"] = {"ambient.istio.io/redirection": "enabled"}
    if replica_set:
        metadata["ownerReferences"] = [{"kind": "ReplicaSet", "name": replica_set, "controller": True}]
    return ObjectKey(group="", kind="Pod", namespace=namespace, name=name), {"metadata": metadata}


_OBJECTS = dict([
    (ObjectKey(group="apps", kind="Deployment", namespace="demo", name="web"), {"metadata": {"name": "web", "namespace": "demo"}}),
    (ObjectKey(group="apps", kind="Deployment", namespace="demo", name="idle"), {"metadata": {"name": "idle", "namespace": "demo"}}),
    _pod("demo", "web-abc12-xyz9k", {"app": "web", "pod-template-hash": "abc12"}, meshed=True, replica_set="web-abc12"),
    _pod("demo", "web-abc12-qqq2z", {"app": "web", "pod-template-hash": "abc12"}, meshed=False, replica_set="web-abc12"),
    _pod("demo", "client", {"app": "client"}, meshed=True),
    (ObjectKey(group="", kind="Service", namespace="demo", name="web"), {"metadata": {"name": "web"}, "spec": {"selector": {"app": "web"}}}),
])


def test_inventory_counts_captured_pods_of_workloads_and_services():
    assert inventory(_OBJECTS, "workload") == [
        Inventory(namespace="demo", name="client", meshed_pods=1, pods=1),
        Inventory(namespace="demo", name="idle", meshed_pods=0, pods=0),
        Inventory(namespace="demo", name="web", meshed_pods=1, pods=2),
    ]
    assert inventory(_OBJECTS, "service") == [Inventory(namespace="demo", name="web", meshed_pods=1, pods=2)]


_TELEMETRY = MeshTelemetry(
    edges=(
        TrafficEdge(source="demo/client", destination="demo/web", protocol="http", rps=4.0, error_rate=0.25,
                    p99_ms=48.0, mtls=True, bytes_per_second=0.0),
    ),
    services=(
        GoldenSignals(namespace="demo", name="web", kind="service", rps=4.0, success_rate=0.75, p50_ms=3.2,
                      p95_ms=20.0, p99_ms=48.0, tcp_connections_per_second=0.5),
        GoldenSignals(namespace="other", name="db", kind="service", rps=0.0, success_rate=None, p50_ms=None,
                      p95_ms=None, p99_ms=None, tcp_connections_per_second=1.0),
    ),
    workloads=(),
    problems=(),
)


def test_rows_join_the_store_and_the_metrics():
    rows = stat_rows("service", _TELEMETRY, inventory(_OBJECTS, "service"), namespace=None, name=None)
    assert [(r.namespace, r.name, r.meshed, r.rps, r.success_rate, r.clients, r.mtls) for r in rows] == [
        ("demo", "web", "1/2", 4.0, 0.75, ("demo/client",), True),
        ("other", "db", None, None, None, (), None),  # only in the metrics; TCP only: no requests
    ]
    assert stat_rows("service", _TELEMETRY, [], namespace="demo", name="nope") == []


def test_table_like_linkerd_viz_stat_with_dashes_for_no_traffic():
    rows = stat_rows("workload", _TELEMETRY, inventory(_OBJECTS, "workload"), namespace="demo", name=None)
    assert render_table(rows, all_namespaces=False, wide=False).splitlines() == [
        "NAME     MESHED   SUCCESS   RPS   LATENCY_P50   LATENCY_P95   LATENCY_P99   TCP_CONN",
        "client   1/1      -         -     -             -             -             -",
        "idle     0/0      -         -     -             -             -             -",
        "web      1/2      -         -     -             -             -             -",
    ]
    rows = stat_rows("service", _TELEMETRY, inventory(_OBJECTS, "service"), namespace=None, name=None)
    assert render_table(rows, all_namespaces=True, wide=True).splitlines() == [
        "NAMESPACE   NAME   MESHED   SUCCESS   RPS       LATENCY_P50   LATENCY_P95   LATENCY_P99   TCP_CONN   MTLS   FROM",
        "demo        web    1/2      75.00%    4.00rps   3.2ms         20ms          48ms          0.50/s     yes    demo/client",
        "other       db     -        -         -         -             -             -             1.00/s     -      -",
    ]


def test_stat_with_an_unreachable_prometheus_warns_and_fails(tmp_path: Path, capsys):
    status = main(["stat", "svc", "-A", "--prometheus", "http://127.0.0.1:9", "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 1
    assert "warning: Prometheus at http://127.0.0.1:9 unreachable: Connection refused" in err
    assert "No services found, and no traffic in the last 30s." in err


def test_stat_without_a_mesh_says_so(tmp_path: Path, capsys):
    assert main(["stat", "--run-dir", str(tmp_path)]) == 1
    assert f"no mesh running in {tmp_path}" in capsys.readouterr().err
