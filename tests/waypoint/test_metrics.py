"""waypoint/metrics: what a Prometheus scrape of the request families shows."""

from __future__ import annotations

import dataclasses

import prometheus_client

from waypoint.metrics import PeerLabels, RequestRecord, WaypointMetrics

REQUEST = RequestRecord(
    source=PeerLabels(workload="productpage-v1", namespace="default"), source_address="10.0.0.1:40000",
    destination=PeerLabels(workload="reviews-v2", namespace="default"), destination_address="10.0.0.2:9080",
    service_host="reviews.default.svc.cluster.local", service_name="reviews", service_namespace="default",
    method="GET", authority="reviews:9080", path="/", protocol="http", http_version="HTTP/2",
    response_code=200, response_flags="-", response_code_details="via_upstream", grpc_status="",
    duration_ms=1.0, request_bytes=0, response_bytes=615, upstream_cluster=None, attempts=1, trace_id="0" * 32,
)  # fmt: skip


def test_histograms_count_each_value_in_the_first_bucket_whose_bound_holds_it():
    registry = prometheus_client.CollectorRegistry()
    metrics = WaypointMetrics(registry)
    for duration in (0.5, 0.6, 1.0, 7000.0):
        metrics.record(dataclasses.replace(REQUEST, duration_ms=duration))
    labels = {"destination_workload": "reviews-v2", "response_code": "200", "reporter": "waypoint"}

    def bucket(le: str) -> float | None:
        return _sample(registry, "istio_request_duration_milliseconds_bucket", {**labels, "le": le})

    assert [bucket(le) for le in ("0.5", "1.0", "5.0", "5000.0", "10000.0", "+Inf")] == [1, 3, 3, 3, 4, 4]
    assert _sample(registry, "istio_request_duration_milliseconds_count", labels) == 4
    assert _sample(registry, "istio_request_duration_milliseconds_sum", labels) == 7002.1
    assert _sample(registry, "istio_requests_total", labels) == 4
    assert _sample(registry, "istio_response_bytes_sum", labels) == 4 * 615


def test_each_label_set_is_its_own_series():
    registry = prometheus_client.CollectorRegistry()
    metrics = WaypointMetrics(registry)
    metrics.record(REQUEST)
    metrics.record(dataclasses.replace(REQUEST, response_code=503, response_flags="UF"))
    metrics.record(dataclasses.replace(REQUEST, response_code=503, response_flags="UF"))
    assert _sample(registry, "istio_requests_total", {"response_code": "200"}) == 1
    assert _sample(registry, "istio_requests_total", {"response_code": "503", "response_flags": "UF"}) == 2
    exposition = prometheus_client.generate_latest(registry).decode()
    assert "# TYPE istio_requests_total counter" in exposition
    assert "# TYPE istio_request_bytes histogram" in exposition


def _sample(registry: prometheus_client.CollectorRegistry, name: str, labels: dict[str, str]) -> float | None:
    """The one sample named `name` whose labels include `labels`."""
    found = [
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]
    assert len(found) <= 1, found
    return found[0] if found else None
