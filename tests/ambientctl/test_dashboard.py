"""`ambientctl dashboard` without a mesh: the graph layout, the snapshot the page renders, the
certificate and inventory readers, and the server on loopback (no root, no browser)."""

from __future__ import annotations

import json
import random
import socket
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ambientctl import cli, dashboard
from ambientctl.dashboard import (
    CertificateInfo,
    CertificateReadError,
    Dashboard,
    MeshInventory,
    NamespaceInfo,
    Sample,
    build_snapshot,
    certificates_from_config_dump,
    extend_history,
    layout_graph,
    read_inventory,
    read_root_certificate,
)
from ambientctl.runtime import RunDir
from ambientctl.telemetry import GoldenSignals, MeshTelemetry, TrafficEdge
from ambientctl.waypoints import WaypointInfo

NOW = 1_800_000_000.0


def edge(source: str, destination: str, protocol: str = "tcp", **fields) -> TrafficEdge:
    values = {"rps": 1.0, "error_rate": None, "p99_ms": None, "mtls": True, "bytes_per_second": 100.0, **fields}
    return TrafficEdge(source=source, destination=destination, protocol=protocol, **values)


def service(namespace: str, name: str, **fields) -> GoldenSignals:
    values = {"rps": 0.0, "success_rate": None, "p50_ms": None, "p95_ms": None, "p99_ms": None, "tcp_connections_per_second": 1.0, **fields}
    return GoldenSignals(namespace=namespace, name=name, kind="service", **values)


BOOKINFO_EDGES = [
    edge("unknown", "bookinfo/frontend", mtls=False),
    edge("bookinfo/trafficgen", "bookinfo/frontend"),
    edge("bookinfo/frontend-v1", "bookinfo/details"),
    edge("bookinfo/frontend-v1", "bookinfo/reviews"),
    edge("bookinfo/reviews-v2", "bookinfo/ratings"),
]
BOOKINFO_SERVICES = [service("bookinfo", name) for name in ("frontend", "details", "reviews", "ratings")]


def telemetry(edges=(), services=(), problems=()) -> MeshTelemetry:
    return MeshTelemetry(edges=tuple(edges), services=tuple(services), workloads=(), problems=tuple(problems))


# --- layout ---


def positions(edges, services) -> dict[str, tuple[int, float, float]]:
    return {node.id: (node.layer, node.x, node.y) for node in layout_graph(edges, services).nodes}


def test_callers_are_left_of_what_they_call_and_every_node_has_its_own_place():
    placed = positions(BOOKINFO_EDGES, BOOKINFO_SERVICES)

    assert set(placed) == {
        "unknown", "workload:bookinfo/trafficgen", "workload:bookinfo/frontend-v1", "workload:bookinfo/reviews-v2",
        "service:bookinfo/frontend", "service:bookinfo/details", "service:bookinfo/reviews", "service:bookinfo/ratings",
    }
    for item in BOOKINFO_EDGES:
        source = "unknown" if item.source == "unknown" else f"workload:{item.source}"
        assert placed[source][1] < placed[f"service:{item.destination}"][1], item
    assert len({(x, y) for _, x, y in placed.values()}) == len(placed)


def test_the_same_traffic_in_any_order_gives_the_same_picture():
    shuffled_edges, shuffled_services = BOOKINFO_EDGES[:], BOOKINFO_SERVICES[:]
    random.Random(7).shuffle(shuffled_edges)
    random.Random(8).shuffle(shuffled_services)

    assert layout_graph(shuffled_edges, shuffled_services) == layout_graph(BOOKINFO_EDGES, BOOKINFO_SERVICES)


def test_a_chain_gets_one_column_per_hop():
    placed = positions([edge("ns/a", "ns/b"), edge("ns/b", "ns/c"), edge("ns/a", "ns/c")], [])

    assert [placed[f"workload:ns/{name}"][0] for name in "abc"] == [0, 1, 2]


def test_callees_are_ordered_by_their_callers_rows_so_edges_do_not_cross():
    placed = positions([edge("ns/a", "ns/z"), edge("ns/b", "ns/y"), edge("ns/c", "ns/x")], [])

    rows = {node: y for node, (_, _, y) in placed.items()}
    assert rows["workload:ns/a"] < rows["workload:ns/b"] < rows["workload:ns/c"]
    assert rows["workload:ns/z"] < rows["workload:ns/y"] < rows["workload:ns/x"]


def test_a_cycle_is_laid_out_without_looping():
    layout = layout_graph([edge("ns/a", "ns/b"), edge("ns/b", "ns/a"), edge("ns/c", "ns/a")], [])

    layers = {node.id: node.layer for node in layout.nodes}
    assert layers == {"workload:ns/c": 0, "workload:ns/a": 1, "workload:ns/b": 2}
    assert len(layout.edges) == 3


def test_a_workload_and_a_service_of_the_same_name_are_two_nodes():
    layout = layout_graph([edge("ns/web", "ns/web")], [service("ns", "web")])

    assert {(node.kind, node.name) for node in layout.nodes} == {("workload", "web"), ("service", "web")}
    assert [(e.source, e.destination) for e in layout.edges] == [("workload:ns/web", "service:ns/web")]


def test_a_waypoint_s_workload_is_drawn_as_a_waypoint():
    layout = layout_graph([edge("ns/waypoint", "ns/web"), edge("ns/client", "ns/web")], [service("ns", "web")], ["ns/waypoint"])

    assert {node.id: node.kind for node in layout.nodes} == {
        "workload:ns/waypoint": "waypoint", "workload:ns/client": "workload", "service:ns/web": "service",
    }


def test_a_service_with_signals_but_no_edge_is_still_drawn():
    layout = layout_graph([], [service("ns", "quiet")])

    assert [(node.id, node.layer) for node in layout.nodes] == [("service:ns/quiet", 0)]


# --- history and snapshot ---


def test_history_keeps_only_the_last_window():
    history = ()
    for second in range(0, 100, 5):
        history = extend_history(history, NOW + second, (service("ns", "web", rps=second),), keep_seconds=30)

    assert [at - NOW for at, _ in history] == [70, 75, 80, 85, 90, 95]


def sample(*, running=True, edges=(), services=(), problems=(), certificates=(), inventory=None) -> Sample:
    return Sample(
        taken_at=NOW,
        telemetry=telemetry(edges, services, problems),
        inventory=inventory or MeshInventory(running=running),
        certificates=tuple(certificates),
    )


def snapshot(item: Sample | None, history=(), **options) -> dict:
    document = build_snapshot(item, history, source="scraping", run_dir="/run/x", now=NOW, **options)
    json.dumps(document, allow_nan=False)  # what the server sends
    return document


def test_no_mesh_running_is_a_problem_sentence_naming_the_run_dir():
    document = snapshot(sample(running=False))

    assert document["mesh"]["running"] is False
    assert document["problems"] == ["No mesh is running (run dir /run/x): start one with `ambientctl up`."]


def test_a_running_mesh_without_traffic_says_so_and_keeps_telemetry_problems():
    problem = "ztunnel node-2 (http://198.18.0.3:15020/metrics): Connection refused"
    document = snapshot(sample(problems=[problem]))

    assert document["problems"] == [problem]
    assert document["notes"][0].startswith("No traffic right now")
    assert document["graph"]["nodes"] == [] and document["graph"]["edges"] == []


def test_before_the_first_sample_the_page_says_it_is_collecting_and_shows_why_a_round_failed():
    document = snapshot(None, extra_problems=["Sampling the mesh took longer than 20 s"])

    assert document["mesh"]["running"] is None
    assert document["problems"] == ["Sampling the mesh took longer than 20 s"]
    assert document["notes"] == ["Collecting the first sample ..."]


def test_http_and_tcp_between_the_same_pair_are_one_edge_and_idle_series_are_left_out():
    edges = [
        edge("bookinfo/frontend-v1", "bookinfo/reviews", "http", rps=4.0, error_rate=0.25, p99_ms=float("nan"), bytes_per_second=0.0),
        edge("bookinfo/frontend-v1", "bookinfo/reviews", "tcp", rps=0.5, bytes_per_second=800.0, mtls=False),
        edge("unknown", "bookinfo/frontend", mtls=False, rps=2.0, bytes_per_second=50.0),
        edge("bookinfo/waypoint", "bookinfo/details", rps=0.0, bytes_per_second=0.0),
    ]
    document = snapshot(sample(edges=edges, services=BOOKINFO_SERVICES))

    assert document["graph"]["edges"] == [
        {
            "source": "workload:bookinfo/frontend-v1", "destination": "service:bookinfo/reviews",
            "sourceName": "bookinfo/frontend-v1", "destinationName": "bookinfo/reviews", "protocols": ["http", "tcp"],
            "rps": 4.0, "errorRate": 0.25, "p99Ms": None, "mtls": False, "connectionsPerSecond": 0.5, "bytesPerSecond": 800.0,
        },
        {
            "source": "unknown", "destination": "service:bookinfo/frontend",
            "sourceName": "unknown", "destinationName": "bookinfo/frontend", "protocols": ["tcp"],
            "rps": 2.0, "errorRate": None, "p99Ms": None, "mtls": False, "connectionsPerSecond": 2.0, "bytesPerSecond": 50.0,
        },
    ]
    assert "workload:bookinfo/waypoint" not in {node["id"] for node in document["graph"]["nodes"]}
    assert document["notes"] == []


def test_each_service_has_its_signals_over_time():
    history = ()
    for second, rps in ((0, 1.0), (5, 2.0), (10, 3.0)):
        history = extend_history(history, NOW + second, (service("ns", "web", rps=rps, success_rate=0.5), service("ns", "db")))
    latest = sample(services=[service("ns", "web", rps=3.0, success_rate=0.5), service("ns", "db")])

    (db, web) = snapshot(latest, history)["services"]

    assert (web["namespace"], web["name"]) == ("ns", "web")
    assert [point["rps"] for point in web["history"]] == [1.0, 2.0, 3.0]
    assert [point["t"] for point in web["history"]] == [NOW, NOW + 5, NOW + 10]
    assert web["current"]["successRate"] == 0.5 and db["current"]["successRate"] is None


def test_namespaces_waypoints_and_certificate_expiry():
    inventory = MeshInventory(
        running=True,
        namespaces=(NamespaceInfo("bookinfo", True, "waypoint"), NamespaceInfo("plain", False, None)),
        waypoints=(WaypointInfo("bookinfo", "waypoint", "service", 1, 1), WaypointInfo("plain", "wp", "service", 0, 1)),
    )
    at = datetime.fromtimestamp(NOW, UTC)
    certificates = [
        CertificateInfo("O=cluster.local", "istiod root CA", at + timedelta(days=3650)),
        CertificateInfo("spiffe://cluster.local/ns/bookinfo/sa/a", "ztunnel node-1", at + timedelta(minutes=10)),
        CertificateInfo("spiffe://cluster.local/ns/bookinfo/sa/b", "ztunnel node-2", at - timedelta(seconds=1)),
    ]

    document = snapshot(sample(inventory=inventory, certificates=certificates))

    assert document["mesh"]["namespaces"] == [
        {"name": "bookinfo", "enrolled": True, "useWaypoint": "waypoint"},
        {"name": "plain", "enrolled": False, "useWaypoint": None},
    ]
    assert [(w["name"], w["ready"]) for w in document["mesh"]["waypoints"]] == [("waypoint", True), ("wp", False)]
    assert [(c["holder"], c["state"], c["expiresInSeconds"]) for c in document["certificates"]] == [
        ("ztunnel node-2", "expired", -1), ("ztunnel node-1", "expiring", 600), ("istiod root CA", "ok", 3650 * 86400),
    ]


# --- reading certificates and the run dir ---


def test_workload_certificates_from_a_ztunnel_config_dump():
    dump = {"certificates": [{"identity": "spiffe://cluster.local/ns/a/sa/b", "notAfter": "2027-01-01T00:00:00+00:00"}]}

    (cert,) = certificates_from_config_dump(dump, "ztunnel node-1")

    assert cert == CertificateInfo("spiffe://cluster.local/ns/a/sa/b", "ztunnel node-1", datetime(2027, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("dump", "named"),
    [
        ({}, "`certificates`"),
        ({"certificates": [{"notAfter": "2027-01-01T00:00:00"}]}, "certificates[0].identity"),
        ({"certificates": [{"identity": "spiffe://x/ns/a/sa/b", "notAfter": "soon"}]}, "certificates[0].notAfter"),
    ],
)
def test_a_bad_config_dump_is_an_error_naming_the_field(dump, named):
    with pytest.raises(CertificateReadError, match=r"ztunnel node-1 /config_dump: .*" + named.replace("[", r"\[").replace("]", r"\]")):
        certificates_from_config_dump(dump, "ztunnel node-1")


def write_root(folder: Path, not_after: datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(not_after - timedelta(days=1)).not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True)
    (folder / "ca-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_the_root_ca_is_read_from_the_run_dir(tmp_path: Path):
    not_after = datetime(2036, 1, 1, tzinfo=UTC)
    write_root(tmp_path / "istiod" / "ca", not_after)

    assert read_root_certificate(RunDir(tmp_path)) == CertificateInfo("O=cluster.local", "istiod root CA", not_after)
    assert read_root_certificate(RunDir(tmp_path / "never-started")) is None


def test_an_unreadable_root_ca_names_the_file(tmp_path: Path):
    (tmp_path / "istiod" / "ca").mkdir(parents=True)
    (tmp_path / "istiod" / "ca" / "ca-cert.pem").write_text("not a certificate")

    with pytest.raises(CertificateReadError, match=r"root CA certificate .*/istiod/ca/ca-cert.pem: not a PEM certificate"):
        read_root_certificate(RunDir(tmp_path))


@pytest.fixture
def ambientctl(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)

    def run(*args: str) -> tuple[int, str]:
        status = cli.main([*args, "--run-dir", str(tmp_path / "run")])
        return status, capsys.readouterr().err

    return run


def test_the_inventory_lists_namespaces_and_waypoints_of_a_stopped_mesh(tmp_path: Path, ambientctl):
    (tmp_path / "ns.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n---\n"
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n"
    )
    assert ambientctl("apply", "-f", str(tmp_path / "ns.yaml"))[0] == 0
    assert ambientctl("waypoint", "apply", "-n", "demo", "--enroll-namespace")[0] == 0

    inventory = read_inventory(RunDir(tmp_path / "run"))

    assert inventory == MeshInventory(
        running=False,
        namespaces=(NamespaceInfo("default", False, None), NamespaceInfo("demo", True, "waypoint"), NamespaceInfo("plain", False, None)),
        waypoints=(WaypointInfo("demo", "waypoint", "service", 0, 1),),
    )


# --- the command and the server ---


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prometheus", "localhost:9090"], "--prometheus must be an http(s) URL such as http://127.0.0.1:9090, got 'localhost:9090'"),
        (["--prometheus", "http://prom:99999"], "--prometheus has an invalid port"),
        (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
    ],
)
def test_bad_options_are_refused_naming_the_option(ambientctl, args, message):
    status, err = ambientctl("dashboard", *args)

    assert status == 2
    assert message in err


def test_a_port_in_use_is_a_clear_error(ambientctl):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, err = ambientctl("dashboard", "--port", str(port))

    assert status == 1
    assert f"ambientctl: error: cannot listen on 127.0.0.1:{port}: Address already in use" in err


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["content-type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["content-type"], exc.read()


async def test_the_server_serves_the_page_and_a_snapshot_saying_no_mesh_runs(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(dashboard, "SAMPLE_SECONDS", 0.2)
    server = Dashboard(RunDir(tmp_path), prometheus_url=None)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run, ("127.0.0.1", 0))
        base = f"http://127.0.0.1:{port}"

        page = await trio.to_thread.run_sync(get, f"{base}/")
        script = await trio.to_thread.run_sync(get, f"{base}/app.js")
        with trio.fail_after(5):
            while (snapshot := json.loads((await trio.to_thread.run_sync(get, f"{base}/api/snapshot"))[2]))["mesh"]["running"] is None:
                await trio.sleep(0.05)
        missing = await trio.to_thread.run_sync(get, f"{base}/nothing-here")
        metrics = await trio.to_thread.run_sync(get, f"{base}/metrics")
        nursery.cancel_scope.cancel()

    assert page[:2] == (200, "text/html; charset=utf-8")
    assert b'<script src="/app.js"></script>' in page[2] and b"http" not in page[2].replace(b"http://www.w3.org", b"")
    assert script[:2] == (200, "text/javascript; charset=utf-8") and b"/api/snapshot" in script[2]
    assert snapshot["mesh"]["running"] is False
    assert snapshot["problems"] == [f"No mesh is running (run dir {tmp_path}): start one with `ambientctl up`."]
    assert missing[0] == 404
    assert b'ambientctl_dashboard_samples_total{outcome="ok"}' in metrics[2]
    assert b"ambientctl_dashboard_problems 1.0" in metrics[2]


def _slow_inventory(run_dir: RunDir) -> MeshInventory:
    time.sleep(0.5)
    return MeshInventory(running=False)


def _broken_inventory(run_dir: RunDir) -> MeshInventory:
    raise RuntimeError("the store exploded")


@pytest.mark.parametrize(
    ("read", "problem"),
    [
        (_broken_inventory, "Sampling the mesh failed (RuntimeError: the store exploded); see the dashboard's log."),
        (_slow_inventory, "Sampling the mesh took longer than 0.1 s; the page shows the last complete sample."),
    ],
)
async def test_a_failing_or_hanging_round_is_a_problem_on_the_page_and_the_server_keeps_serving(tmp_path: Path, monkeypatch, read, problem):
    monkeypatch.setattr(dashboard, "SAMPLE_SECONDS", 0.05)
    monkeypatch.setattr(dashboard, "SAMPLE_TIMEOUT_SECONDS", 0.1)
    monkeypatch.setattr(dashboard, "read_inventory", read)
    server = Dashboard(RunDir(tmp_path), prometheus_url=None)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run, ("127.0.0.1", 0))
        with trio.fail_after(5):
            while problem not in (snapshot := json.loads((await trio.to_thread.run_sync(get, f"http://127.0.0.1:{port}/api/snapshot"))[2]))["problems"]:
                await trio.sleep(0.05)
        page = await trio.to_thread.run_sync(get, f"http://127.0.0.1:{port}/")
        nursery.cancel_scope.cancel()

    assert snapshot["notes"] == ["Collecting the first sample ..."]
    assert page[0] == 200
