"""Grafana dashboards and `ambientctl stat` against a real Prometheus scraping a running mesh.

The mesh (manifests/observability-metrics/app.yaml) carries traffic of a known shape: per
client cycle, 3 requests answered 200 and 1 answered 500 by `web` (through a waypoint), and
one TCP connection of 100 bytes each way to `echo` (ztunnel to ztunnel, mTLS). A real
Prometheus (Debian package) scrapes every proxy `local_proxies` lists. Every panel of every
dashboard in deploy/grafana/, its variables substituted, is evaluated at one instant and
must return the series and values that shape implies, relative to C, the measured cycle rate.
Then `ambientctl stat` shows the same, from Prometheus and from scraping, and names a proxy
that does not answer. Needs root and the prometheus binary; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ambientctl import promql
from ambientctl.proxies import METRICS_PORT, MeshProxy, local_proxies
from ambientctl.runtime import RunDir
from meshcore.testing.prometheus import RunningPrometheus, prometheus_skip_reason, start_prometheus
from .test_one_machine_mesh import Mesh, _skip_reason, ambientctl, wait_until

MANIFESTS = Path(__file__).resolve().parent / "manifests" / "observability-metrics"
DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
WINDOW = "10s"
REL = 0.3  # rate tolerance: a 10 s window holds ~25 client cycles, Prometheus extrapolates the edges

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
    pytest.mark.skipif(prometheus_skip_reason() is not None, reason=str(prometheus_skip_reason())),
]

Result = list[dict]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    mesh = Mesh.up(tmp_path_factory.mktemp("observability-mesh"), MANIFESTS / "app.yaml")
    try:
        applied = ambientctl(mesh.run_dir, "waypoint", "apply", "-n", "obs", "--enroll-namespace")
        assert applied.returncode == 0, applied.stderr
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def proxies(mesh: Mesh) -> list[MeshProxy]:
    """Both ztunnels and the waypoint, once the waypoint is listed (scheduled with an IP)."""
    return wait_until(
        lambda: (found := local_proxies(RunDir(mesh.run_dir))) and any(p.kind == "waypoint" for p in found) and found,
        timeout=30, what="local_proxies did not list the waypoint",
    )


@pytest.fixture(scope="module")
def prometheus(proxies: list[MeshProxy], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPrometheus]:
    with start_prometheus([f"{p.address}:{METRICS_PORT}" for p in proxies], folder=tmp_path_factory.mktemp("prometheus")) as running:
        targets = running.wait_for_first_scrapes(timeout=30)
        assert all(target["health"] == "up" for target in targets), targets
        yield running


@pytest.fixture(scope="module")
def instant(prometheus: RunningPrometheus) -> float:
    """An evaluation time with a full window of steady traffic: requests to web through the
    waypoint with both answers, and connections to echo, for longer than the window."""

    def steady() -> bool:
        at = time.time() - 1
        window = f"{int(WINDOW[:-1]) + 5}s"
        codes = {r["metric"]["response_code"] for r in prometheus.query(
            f'count_over_time({promql.REQUESTS}{{destination_service_name="web"}}[{window}])', at=at)
            if float(r["value"][1]) >= int(WINDOW[:-1])}
        echo = prometheus.query(promql.rate_sum(promql.TCP_OPENED, ['destination_service_name="echo"'], WINDOW), at=at)
        return codes == {"200", "500"} and bool(echo) and float(echo[0]["value"][1]) > 0

    wait_until(steady, timeout=90, what="no steady traffic through the waypoint and to echo in Prometheus")
    return time.time() - 1


@pytest.fixture(scope="module")
def cycles(prometheus: RunningPrometheus, instant: float) -> float:
    """C: client cycles per second, as the echo connections the destination ztunnel counted."""
    (series,) = prometheus.query(
        promql.rate_sum(promql.TCP_OPENED, [promql.TCP_REPORTER, 'destination_service_name="echo"'], WINDOW), at=instant
    )
    rate = float(series["value"][1])
    assert rate > 0.5, f"the client made only {rate:.2f} cycles/s"
    return rate


# --- the dashboards' panels and what each must show ---

BINDINGS = {
    "mesh": {},
    "web": {"namespace": "obs", "service": "web"},
    "echo": {"namespace": "obs-tcp", "service": "echo"},
    "web-workload": {"namespace": "obs", "workload": "web"},
    "client-workload": {"namespace": "obs", "workload": "client"},
    "echo-workload": {"namespace": "obs-tcp", "workload": "echo"},
}


def one(result: Result) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def at_labels(result: Result, **labels: str) -> float:
    matches = [float(r["value"][1]) for r in result if all(r["metric"].get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, f"expected one series with {labels}, got {result}"
    return matches[0]


def near(value: float, expected: float, rel: float = REL) -> None:
    assert value == pytest.approx(expected, rel=rel), f"{value:.3f} is not {expected:.3f} +/- {rel:.0%}"


def nothing(result: Result) -> None:
    assert all(float(r["value"][1]) == 0 for r in result), result


def ordered_latencies(p50: Result, p90: Result, p99: Result) -> None:
    values = [one(p50), one(p90), one(p99)]
    # web answers after 30 ms: never below the (25, 50] bucket, and far from a timeout.
    assert 25 <= values[0] <= values[1] <= values[2] <= 2500, values


def only_mtls(result: Result) -> None:
    assert result and {r["metric"]["connection_security_policy"] for r in result} == {"mutual_tls"}, result


def per_ztunnel(result: Result) -> set[str]:
    return {r["metric"]["instance"] for r in result if float(r["value"][1]) > 0}


def ztunnel_instances(proxies: list[MeshProxy]) -> set[str]:
    return {f"{p.address}:{METRICS_PORT}" for p in proxies if p.kind == "ztunnel"}


Check = Callable[[list[Result], float, list[MeshProxy]], None]

# (dashboard file, panel title) -> (binding, check(results per target, C, proxies))
PANELS: dict[tuple[str, str], tuple[str, Check]] = {
    ("istio-mesh-dashboard.json", "Global Request Volume"): ("mesh", lambda r, c, _: near(one(r[0]), 4 * c)),
    ("istio-mesh-dashboard.json", "Global Success Rate (non-5xx responses)"): ("mesh", lambda r, c, _: near(one(r[0]), 0.75, 0.1)),
    ("istio-mesh-dashboard.json", "4xxs"): ("mesh", lambda r, c, _: nothing(r[0])),
    ("istio-mesh-dashboard.json", "5xxs"): ("mesh", lambda r, c, _: near(one(r[0]), c)),
    # echo's connections plus the waypoint's to web, all seen by a destination ztunnel
    ("istio-mesh-dashboard.json", "TCP Connections Opened"): ("mesh", lambda r, c, _: assert_at_least(one(r[0]), 0.99 * c)),
    ("istio-mesh-dashboard.json", "mTLS Share of TCP Connections"): ("mesh", lambda r, c, _: near(one(r[0]), 1.0, 0.001)),
    ("istio-mesh-dashboard.json", "HTTP/gRPC Services"): ("mesh", lambda r, c, _: (
        near(at_labels(r[0], destination_service_name="web", destination_service_namespace="obs"), 4 * c),
        ordered_latencies(*[[s for s in result if s["metric"]["destination_service_name"] == "web"] for result in r[1:4]]),
        near(at_labels(r[4], destination_service_name="web"), 0.75, 0.1),
    )),
    ("istio-mesh-dashboard.json", "TCP Services"): ("mesh", lambda r, c, _: (
        near(at_labels(r[0], destination_service_name="echo", destination_service_namespace="obs-tcp"), c, 0.01),
        near(at_labels(r[1], destination_service_name="echo"), 100 * c),
        near(at_labels(r[2], destination_service_name="echo"), 100 * c),
    )),
    ("istio-mesh-dashboard.json", "Request Rate by Service"): ("mesh", lambda r, c, _: near(at_labels(r[0], destination_service_name="web"), 4 * c)),
    ("istio-service-dashboard.json", "Client Request Volume"): ("web", lambda r, c, _: near(one(r[0]), 4 * c)),
    ("istio-service-dashboard.json", "Client Success Rate (non-5xx responses)"): ("web", lambda r, c, _: near(one(r[0]), 0.75, 0.1)),
    ("istio-service-dashboard.json", "TCP Connections Opened"): ("echo", lambda r, c, _: near(one(r[0]), c, 0.01)),
    ("istio-service-dashboard.json", "Client Request Duration"): ("web", lambda r, c, _: ordered_latencies(*r)),
    ("istio-service-dashboard.json", "Incoming Requests by Source and Response Code"): ("web", lambda r, c, _: (
        near(at_labels(r[0], source_workload="client", source_workload_namespace="obs", response_code="200"), 3 * c),
        near(at_labels(r[0], source_workload="client", response_code="500"), c),
    )),
    ("istio-service-dashboard.json", "Incoming Success Rate (non-5xx responses) by Source"): (
        "web", lambda r, c, _: near(at_labels(r[0], source_workload="client"), 0.75, 0.1)),
    ("istio-service-dashboard.json", "Incoming Requests by Security Policy"): ("web", lambda r, c, _: (
        only_mtls(r[0]), near(at_labels(r[0], connection_security_policy="mutual_tls"), 4 * c))),
    ("istio-service-dashboard.json", "TCP Connections Opened by Source and Security Policy"): ("echo", lambda r, c, _: (
        only_mtls(r[0]), near(at_labels(r[0], source_workload="client", source_workload_namespace="obs"), c, 0.05))),
    ("istio-service-dashboard.json", "TCP Bytes Received from and Sent to Clients"): ("echo", lambda r, c, _: (
        near(at_labels(r[0], source_workload="client"), 100 * c), near(at_labels(r[1], source_workload="client"), 100 * c))),
    ("istio-workload-dashboard.json", "Incoming Request Volume"): ("web-workload", lambda r, c, _: near(one(r[0]), 4 * c)),
    ("istio-workload-dashboard.json", "Incoming Success Rate (non-5xx responses)"): (
        "web-workload", lambda r, c, _: near(one(r[0]), 0.75, 0.1)),
    # web's TCP comes from the waypoint, which keeps its connections: echo's shows the cycles
    ("istio-workload-dashboard.json", "Incoming TCP Connections Opened"): ("echo-workload", lambda r, c, _: near(one(r[0]), c, 0.01)),
    ("istio-workload-dashboard.json", "Incoming Request Duration"): ("web-workload", lambda r, c, _: ordered_latencies(*r)),
    ("istio-workload-dashboard.json", "Incoming Requests by Source and Response Code"): ("web-workload", lambda r, c, _: (
        near(at_labels(r[0], source_workload="client", response_code="200"), 3 * c),
        near(at_labels(r[0], source_workload="client", response_code="500"), c),
    )),
    ("istio-workload-dashboard.json", "Incoming TCP Connections by Source and Security Policy"): ("echo-workload", lambda r, c, _: (
        only_mtls(r[0]), near(at_labels(r[0], source_workload="client", source_workload_namespace="obs"), c, 0.01))),
    ("istio-workload-dashboard.json", "Incoming TCP Bytes"): ("echo-workload", lambda r, c, _: (
        near(one(r[0]), 100 * c), near(one(r[1]), 100 * c))),
    ("istio-workload-dashboard.json", "Outgoing Requests by Destination and Response Code"): ("client-workload", lambda r, c, _: (
        near(at_labels(r[0], destination_service_name="web", destination_service_namespace="obs", response_code="200"), 3 * c),
        near(at_labels(r[0], destination_service_name="web", response_code="500"), c),
    )),
    ("istio-workload-dashboard.json", "Outgoing TCP Connections by Destination"): ("client-workload", lambda r, c, _: (
        near(at_labels(r[0], destination_service_name="echo", destination_service_namespace="obs-tcp"), c),
        near(at_labels(r[0], destination_service_name="web"), 4 * c),  # one connection per request
    )),
    ("ztunnel-dashboard.json", "Ztunnel Versions"): ("mesh", lambda r, c, p: assert_equal(one(r[0]), len(ztunnel_instances(p)))),
    ("ztunnel-dashboard.json", "Connections Opened"): ("mesh", lambda r, c, p: (
        # node-1 reports the client's connections as source, node-2 those to web and echo as destination
        assert_equal(per_ztunnel(r[0]), ztunnel_instances(p)),
        assert_equal({(s["metric"]["instance"], s["metric"]["reporter"]) for s in r[0] if float(s["value"][1]) > 0},
                     {(f"{p[0].address}:{METRICS_PORT}", "source"), (f"{p[1].address}:{METRICS_PORT}", "destination")}),
    )),
    ("ztunnel-dashboard.json", "Connections Closed"): ("mesh", lambda r, c, p: assert_equal(per_ztunnel(r[0]), ztunnel_instances(p))),
    ("ztunnel-dashboard.json", "Failed Connections by Response Flag"): ("mesh", lambda r, c, p: nothing(r[0])),
    ("ztunnel-dashboard.json", "Bytes Sent"): ("mesh", lambda r, c, p: assert_equal(per_ztunnel(r[0]), ztunnel_instances(p))),
    ("ztunnel-dashboard.json", "Bytes Received"): ("mesh", lambda r, c, p: assert_equal(per_ztunnel(r[0]), ztunnel_instances(p))),
    ("ztunnel-dashboard.json", "Open Sockets"): ("mesh", lambda r, c, p: assert_equal(
        {s["metric"]["instance"] for s in r[0]}, ztunnel_instances(p))),
}


def assert_at_least(value: float, floor: float) -> None:
    assert value >= floor, f"{value:.3f} < {floor:.3f}"


def assert_equal(actual: object, expected: object) -> None:
    assert actual == expected


def substitute(expr: str, binding: dict[str, str]) -> str:
    """What Grafana sends for a panel: variables replaced (single values, regex-escaped names are plain)."""
    expr = expr.replace("$__rate_interval", WINDOW)
    for name, value in binding.items():
        expr = expr.replace(f"${name}", value)
    assert "$" not in expr, f"unbound variable in {expr}"
    return expr


def dashboard_panels() -> list[tuple[str, dict]]:
    return [(path.name, panel) for path in sorted(DASHBOARDS.glob("*.json")) for panel in json.loads(path.read_text())["panels"]]


@pytest.mark.parametrize(("file_name", "panel"), dashboard_panels(), ids=lambda value: value if isinstance(value, str) else value["title"])
def test_every_panel_shows_what_the_traffic_implies(file_name, panel, prometheus, instant, cycles, proxies):
    assert (file_name, panel["title"]) in PANELS, f"no expectation for panel {panel['title']!r} of {file_name}: add one"
    binding, check = PANELS[(file_name, panel["title"])]
    results = [prometheus.query(substitute(target["expr"], BINDINGS[binding]), at=instant) for target in panel["targets"]]
    check(results, cycles, proxies)


def test_every_expectation_has_a_panel():
    assert set(PANELS) == {(file_name, panel["title"]) for file_name, panel in dashboard_panels()}


def test_dashboard_variables_offer_the_mesh_namespaces_services_and_workloads(prometheus, instant):
    offered = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        for variable in json.loads(path.read_text())["templating"]["list"]:
            if variable["type"] != "query":
                continue
            selector, label = variable["definition"].removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
            offered[(path.name, variable["name"])] = set(prometheus.label_values(label, substitute(selector, {"namespace": "obs"})))
    assert {"obs", "obs-tcp"} <= offered[("istio-service-dashboard.json", "namespace")]
    assert "web" in offered[("istio-service-dashboard.json", "service")] and "echo" not in offered[("istio-service-dashboard.json", "service")]
    assert {"obs", "obs-tcp"} <= offered[("istio-workload-dashboard.json", "namespace")]
    assert {"web", "waypoint"} <= offered[("istio-workload-dashboard.json", "workload")]


# --- ambientctl stat ---


def stat(mesh: Mesh, *args: str):
    return ambientctl(mesh.run_dir, "stat", *args)


def table(stdout: str) -> dict[str, dict[str, str]]:
    lines = stdout.splitlines()
    header = lines[0].split()
    return {line.split()[header.index("NAME")]: dict(zip(header, line.split())) for line in lines[1:]}


def test_stat_from_prometheus_shows_the_services(mesh, prometheus, cycles):
    result = stat(mesh, "svc", "-A", "--prometheus", prometheus.url, "--window", WINDOW)
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    web, echo = rows["web"], rows["echo"]
    assert web["MESHED"] == "1/1"
    assert float(web["SUCCESS"].rstrip("%")) == pytest.approx(75, abs=10)
    near(float(web["RPS"].removesuffix("rps")), 4 * cycles, 0.5)
    assert all(web[column].endswith("ms") for column in ("LATENCY_P50", "LATENCY_P95", "LATENCY_P99"))
    assert (echo["SUCCESS"], echo["RPS"], echo["LATENCY_P50"]) == ("-", "-", "-")  # TCP only
    near(float(echo["TCP_CONN"].removesuffix("/s")), cycles, 0.5)


def test_stat_by_scraping_the_proxies_shows_workloads(mesh, cycles):
    result = stat(mesh, "deploy", "-A", "--window", "5s", "-o", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["problems"] == []
    rows = {(row["namespace"], row["name"]): row for row in report["rows"]}
    web, echo = rows[("obs", "web")], rows[("obs-tcp", "echo")]
    assert web["meshed"] == "1/1" and web["success_rate"] == pytest.approx(0.75, abs=0.1)
    near(web["rps"], 4 * cycles, 0.5)
    assert echo["success_rate"] is None and echo["tcp_connections_per_second"] == pytest.approx(cycles, rel=0.5)
    assert rows[("obs", "client")]["rps"] is None  # it only sends


def test_a_proxy_that_does_not_answer_is_named_and_the_rest_still_shown(mesh, proxies, prometheus):
    node2 = next(p for p in proxies if p.kind == "ztunnel" and p.name == "node-2")
    record = mesh.process_record("node/node-2/ztunnel")
    assert record is not None
    os.kill(record.pid, signal.SIGSTOP)  # alive but silent: it is not restarted, it just does not answer
    try:
        result = stat(mesh, "svc", "-A", "--window", "1s")
        assert result.returncode == 0, result.stderr
        assert f"warning: ztunnel node-2 ({node2.metrics_url}): timed out" in result.stderr
        assert "web" in table(result.stdout)  # counted by the waypoint, which still answers
        through_prometheus = wait_until(
            lambda: (r := stat(mesh, "svc", "-A", "--prometheus", prometheus.url)) and "cannot scrape" in r.stderr and r,
            timeout=15, what="Prometheus did not report node-2's ztunnel down",
        )
        assert f"warning: Prometheus at {prometheus.url} cannot scrape {node2.address}:{METRICS_PORT} (job mesh)" in through_prometheus.stderr
        assert "web" in table(through_prometheus.stdout)
    finally:
        os.kill(record.pid, signal.SIGCONT)
