"""Both telemetry sources read the same numbers from real proxy metrics: a waypoint's and a
ztunnel's metric families (the proxies' own classes) served on loopback while a thread makes
traffic, read once by scraping directly and once through a real Prometheus (Debian package)
that also has a target that never answers."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest

from ambientctl.proxies import METRICS_PORT, MeshProxy
from ambientctl.telemetry import MeshTelemetry, PrometheusTelemetry, ScrapeTelemetry
from meshcore.metrics import TCP_LABELS, new_registry
from meshcore.testing.procs import free_port
from meshcore.testing.prometheus import prometheus_skip_reason, start_prometheus
from waypoint.metrics import PeerLabels, RequestRecord, WaypointMetrics
from ztunnel.metrics import ZtunnelMetrics

REQUESTS_PER_SECOND = 20  # every 10th answered 503
CONNECTIONS_PER_SECOND = 4
WINDOW_SECONDS = 4.0
LATENCY_MS = 7.0  # every request: in Envoy's (5, 10] bucket


def _request(status: int) -> RequestRecord:
    return RequestRecord(
        source=PeerLabels(workload="client", namespace="demo", principal="spiffe://cluster.local/ns/demo/sa/client"),
        source_address="198.18.1.2:40000",
        destination=PeerLabels(workload="web", namespace="demo"),
        destination_address="198.18.2.2:8080",
        service_host="web.demo.svc.cluster.local", service_name="web", service_namespace="demo",
        method="GET", authority="web", path="/", protocol="http", http_version="HTTP/1.1",
        response_code=status, response_flags="-", response_code_details="via_upstream", grpc_status="",
        duration_ms=LATENCY_MS, request_bytes=0, response_bytes=2, upstream_cluster="web", attempts=1, trace_id="0" * 32,
    )


_TCP_LABELS = {
    **dict.fromkeys(TCP_LABELS, "unknown"),
    "reporter": "destination", "source_workload": "client", "source_workload_namespace": "demo",
    "destination_workload": "db", "destination_workload_namespace": "demo", "destination_service_name": "db",
    "destination_service_namespace": "demo", "request_protocol": "tcp", "response_flags": "-",
    "connection_security_policy": "mutual_tls",
}


@pytest.fixture(scope="module")
def proxies() -> Iterator[list[MeshProxy]]:
    """A waypoint's and a ztunnel's metrics on 127.x addresses at :15020, with live traffic."""
    waypoint_registry, ztunnel_registry = new_registry(), new_registry()
    waypoint, ztunnel = WaypointMetrics(waypoint_registry), ZtunnelMetrics(ztunnel_registry)
    addresses = [f"127.{random.randrange(1, 255)}.{random.randrange(1, 255)}.{index}" for index in (1, 2)]
    servers = [
        prometheus_client.start_http_server(METRICS_PORT, addr=address, registry=registry)[0]
        for address, registry in zip(addresses, (waypoint_registry, ztunnel_registry))
    ]
    stop = threading.Event()

    def traffic() -> None:
        tick = 0
        while not stop.wait(1 / REQUESTS_PER_SECOND):
            tick += 1
            waypoint.record(_request(503 if tick % 10 == 0 else 200))
            if tick % (REQUESTS_PER_SECOND // CONNECTIONS_PER_SECOND) == 0:
                ztunnel.connections_opened.labels(**_TCP_LABELS).inc()
                ztunnel.sent_bytes.labels(**_TCP_LABELS).inc(300)
                ztunnel.received_bytes.labels(**_TCP_LABELS).inc(100)

    driver = threading.Thread(target=traffic, daemon=True)
    driver.start()
    try:
        yield [MeshProxy(kind="waypoint", name="demo/waypoint-0", address=addresses[0]),
               MeshProxy(kind="ztunnel", name="node-1", address=addresses[1])]
    finally:
        stop.set()
        driver.join()
        for server in servers:
            server.shutdown()
            server.server_close()


def _assert_matches_the_traffic(telemetry: MeshTelemetry) -> None:
    (web,) = [s for s in telemetry.services if s.name == "web"]
    assert web.rps == pytest.approx(REQUESTS_PER_SECOND, rel=0.35)
    assert web.success_rate == pytest.approx(0.9, abs=0.03)
    assert web.p50_ms == pytest.approx(7.5)  # the middle of (5, 10], as histogram_quantile interpolates
    assert web.p99_ms == pytest.approx(9.95)
    (db,) = [s for s in telemetry.services if s.name == "db"]
    assert db.tcp_connections_per_second == pytest.approx(CONNECTIONS_PER_SECOND, rel=0.35)
    edges = {(e.source, e.destination, e.protocol): e for e in telemetry.edges}
    http = edges[("demo/client", "demo/web", "http")]
    assert http.mtls and http.error_rate == pytest.approx(0.1, abs=0.03)
    tcp = edges[("demo/client", "demo/db", "tcp")]
    assert tcp.mtls and tcp.bytes_per_second == pytest.approx(400 * CONNECTIONS_PER_SECOND, rel=0.35)
    assert [(w.namespace, w.name) for w in telemetry.workloads] == [("demo", "db"), ("demo", "web")]


def test_scraping_the_proxies_directly(proxies: list[MeshProxy]):
    source = ScrapeTelemetry(proxies)
    started = time.monotonic()
    first = source.snapshot(WINDOW_SECONDS)
    assert time.monotonic() - started >= WINDOW_SECONDS  # the first call waits one window
    assert first.problems == ()
    _assert_matches_the_traffic(first)
    time.sleep(WINDOW_SECONDS)
    started = time.monotonic()
    second = source.snapshot(WINDOW_SECONDS)
    assert time.monotonic() - started < 1.0  # the previous scrape starts this window
    _assert_matches_the_traffic(second)


def test_a_proxy_that_does_not_answer_is_named_and_the_rest_still_counts(proxies: list[MeshProxy]):
    dead = MeshProxy(kind="ztunnel", name="node-9", address="127.0.0.9")  # nothing listens there
    telemetry = ScrapeTelemetry([*proxies, dead]).snapshot(1.0)
    assert telemetry.problems == (f"ztunnel node-9 (http://127.0.0.9:{METRICS_PORT}/metrics): Connection refused",)
    assert {s.name for s in telemetry.services} == {"web", "db"}


@pytest.mark.skipif(prometheus_skip_reason() is not None, reason=str(prometheus_skip_reason()))
def test_through_a_real_prometheus(proxies: list[MeshProxy], tmp_path: Path):
    dead_target = f"127.0.0.1:{free_port()}"
    targets_wanted = [f"{proxy.address}:{METRICS_PORT}" for proxy in proxies]
    with start_prometheus([*targets_wanted, dead_target], folder=tmp_path / "prometheus") as prometheus:
        targets = prometheus.wait_for_first_scrapes(timeout=20)
        assert sorted(t["labels"]["instance"] for t in targets if t["health"] == "up") == sorted(targets_wanted)
        time.sleep(WINDOW_SECONDS + 1)  # enough 1 s scrapes for rate() over the window
        telemetry = PrometheusTelemetry(prometheus.url).snapshot(WINDOW_SECONDS)
    _assert_matches_the_traffic(telemetry)
    assert telemetry.problems == (f"Prometheus at {prometheus.url} cannot scrape {dead_target} (job mesh)",)


def test_an_unreachable_prometheus_is_a_problem_not_an_exception():
    url = f"http://127.0.0.1:{free_port()}"
    source = PrometheusTelemetry(url)
    telemetry = source.snapshot(WINDOW_SECONDS)
    assert telemetry == MeshTelemetry(edges=(), services=(), workloads=(), problems=(f"Prometheus at {url} unreachable: Connection refused",))
    assert not source.answered
