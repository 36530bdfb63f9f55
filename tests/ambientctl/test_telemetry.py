"""The pure parts of ambientctl/telemetry: exposition parsing, rates, quantiles, aggregation."""

from __future__ import annotations

import math

import pytest

from ambientctl import promql
from ambientctl.telemetry import (
    GoldenSignals,
    RateSample,
    TrafficEdge,
    aggregate,
    counter_rates,
    histogram_quantile,
    parse_exposition,
    parse_query_response,
)

INF = math.inf


@pytest.mark.parametrize(
    ("quantile", "buckets", "expected"),
    [
        # 10 req/s: 4 under 5 ms, 4 more under 10 ms, 2 under 25 ms.
        (0.5, [(5, 4), (10, 8), (25, 10), (INF, 10)], 5 + 5 * (5 - 4) / 4),
        (0.99, [(5, 4), (10, 8), (25, 10), (INF, 10)], 10 + 15 * (9.9 - 8) / 2),
        (0.2, [(5, 4), (10, 8), (INF, 8)], 5 * 1.6 / 4),  # the lowest bucket starts at 0
        (0.99, [(5, 1), (10, 1), (INF, 2)], 10),  # rank in +Inf: the highest finite bound
        (0.5, [(5, 0), (INF, 0)], None),  # no traffic
        (0.5, [], None),
        (0.5, [(5, 1), (10, 2)], None),  # no +Inf bucket: not a histogram
    ],
)
def test_histogram_quantile_matches_promql(quantile, buckets, expected):
    assert histogram_quantile(quantile, buckets) == (pytest.approx(expected) if expected is not None else None)


def test_histogram_quantile_ignores_bucket_order():
    assert histogram_quantile(0.5, [(INF, 10), (10, 8), (5, 4), (25, 10)]) == pytest.approx(6.25)


@pytest.mark.parametrize(
    ("before", "after", "expected_rate"),
    [
        (10.0, 30.0, 4.0),  # +20 in 5 s
        (None, 15.0, 3.0),  # a series born between the scrapes: all of it is new
        (50.0, 5.0, 1.0),  # went down: the proxy restarted, 5 since then
        (7.0, 7.0, 0.0),
    ],
)
def test_counter_rates_over_two_scrapes(before, after, expected_rate):
    key = (promql.REQUESTS, (("response_code", "200"),))
    rates = counter_rates({} if before is None else {key: before}, {key: after}, 5.0)
    assert rates == [RateSample(name=promql.REQUESTS, labels={"response_code": "200"}, rate=pytest.approx(expected_rate))]


def test_counter_rates_needs_elapsed_time():
    with pytest.raises(ValueError, match="seconds"):
        counter_rates({}, {}, 0)


_EXPOSITION = """\
# HELP istio_requests_total The total number of requests
# TYPE istio_requests_total counter
istio_requests_total{reporter="waypoint",response_code="200"} 12.0
# HELP istio_tcp_connections_opened_total The total number of TCP connections opened
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="destination"} 4.0
istio_tcp_connections_opened_total{reporter="source"} 4.0
# HELP istio_request_duration_milliseconds Request duration
# TYPE istio_request_duration_milliseconds histogram
istio_request_duration_milliseconds_bucket{le="5.0",reporter="waypoint"} 3.0
istio_request_duration_milliseconds_bucket{le="+Inf",reporter="waypoint"} 12.0
istio_request_duration_milliseconds_count{reporter="waypoint"} 12.0
istio_request_duration_milliseconds_sum{reporter="waypoint"} 80.0
# HELP istio_build Istio component build info
# TYPE istio_build gauge
istio_build{component="ztunnel",tag="0.1"} 1.0
"""


def test_parse_exposition_keeps_the_series_telemetry_rates_from_one_reporter():
    # Both ztunnels count a connection; the destination's count is the one that is read.
    assert parse_exposition(_EXPOSITION) == {
        (promql.REQUESTS, (("reporter", "waypoint"), ("response_code", "200"))): 12.0,
        (promql.TCP_OPENED, (("reporter", "destination"),)): 4.0,
        (promql.REQUEST_DURATION_BUCKETS, (("le", "5.0"), ("reporter", "waypoint"))): 3.0,
        (promql.REQUEST_DURATION_BUCKETS, (("le", "+Inf"), ("reporter", "waypoint"))): 12.0,
    }


def test_parse_exposition_rejects_what_is_not_metrics():
    with pytest.raises(ValueError):
        parse_exposition("<html>not metrics</html>\n")


def test_parse_query_response_reads_an_instant_vector():
    body = {
        "status": "success",
        "data": {"resultType": "vector", "result": [
            {"metric": {"destination_service_name": "web"}, "value": [1700000000.0, "2.5"]},
            {"metric": {"destination_service_name": "idle"}, "value": [1700000000.0, "NaN"]},
        ]},
    }
    assert parse_query_response(promql.REQUESTS, body) == [
        RateSample(name=promql.REQUESTS, labels={"destination_service_name": "web"}, rate=2.5)
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"status": "error", "errorType": "bad_data", "error": "parse error at char 5"}, "bad_data: parse error at char 5"),
        ({"status": "success", "data": {"resultType": "matrix", "result": []}}, "instant vector"),
    ],
)
def test_parse_query_response_names_what_is_wrong(body, message):
    with pytest.raises(ValueError, match=message):
        parse_query_response(promql.REQUESTS, body)


def _http(code: str, rate: float, **labels: str) -> RateSample:
    return RateSample(name=promql.REQUESTS, labels={**_CLIENT_TO_WEB, "response_code": code, **labels}, rate=rate)


def _bucket(le: str, rate: float) -> RateSample:
    return RateSample(name=promql.REQUEST_DURATION_BUCKETS, labels={**_CLIENT_TO_WEB, "le": le}, rate=rate)


_CLIENT_TO_WEB = {
    "source_workload": "client", "source_workload_namespace": "demo",
    "destination_service_name": "web", "destination_service_namespace": "demo",
    "destination_workload": "web-v1", "destination_workload_namespace": "demo",
    "connection_security_policy": "mutual_tls",
}
_PLAIN_TCP = {
    "source_workload": "unknown", "source_workload_namespace": "unknown",
    "destination_service_name": "unknown", "destination_service_namespace": "unknown",
    "destination_workload": "db", "destination_workload_namespace": "data",
    "connection_security_policy": "unknown",
}


def test_aggregate_turns_rates_into_edges_and_golden_signals():
    samples = [
        _http("200", 9.0),
        _http("503", 1.0),
        _http("404", 0.5),  # not a server error: still a success
        _bucket("5", 5.25), _bucket("10", 10.0), _bucket("25", 10.5), _bucket("+Inf", 10.5),
        RateSample(name=promql.TCP_OPENED, labels=_PLAIN_TCP, rate=2.0),
        RateSample(name=promql.TCP_SENT_BYTES, labels=_PLAIN_TCP, rate=100.0),
        RateSample(name=promql.TCP_RECEIVED_BYTES, labels=_PLAIN_TCP, rate=50.0),
    ]
    edges, services, workloads = aggregate(samples)
    assert edges == (
        TrafficEdge(source="demo/client", destination="demo/web", protocol="http", rps=10.5, error_rate=pytest.approx(1 / 10.5),
                    p99_ms=pytest.approx(10 + 15 * (0.99 * 10.5 - 10) / 0.5), mtls=True, bytes_per_second=0.0),
        TrafficEdge(source="unknown", destination="data/db", protocol="tcp", rps=2.0, error_rate=None, p99_ms=None,
                    mtls=False, bytes_per_second=150.0),
    )
    assert services == (
        GoldenSignals(namespace="demo", name="web", kind="service", rps=10.5, success_rate=pytest.approx(9.5 / 10.5),
                      p50_ms=pytest.approx(5.0), p95_ms=pytest.approx(5 + 5 * (0.95 * 10.5 - 5.25) / 4.75),
                      p99_ms=pytest.approx(10 + 15 * (0.99 * 10.5 - 10) / 0.5), tcp_connections_per_second=0.0),
    )
    assert [(w.namespace, w.name, w.rps, w.tcp_connections_per_second) for w in workloads] == [
        ("data", "db", 0.0, 2.0), ("demo", "web-v1", 10.5, 0.0),
    ]
    assert workloads[0].success_rate is None and workloads[0].p99_ms is None  # TCP only: no request signals


def test_aggregate_sums_the_same_edge_across_proxies_and_flags_partial_plaintext():
    edges, _, _ = aggregate([
        _http("200", 1.0),
        _http("200", 2.0),  # the same labels from a second waypoint replica
        _http("200", 0.5, connection_security_policy="unknown"),
    ])
    assert [(e.rps, e.mtls) for e in edges] == [(3.5, False)]


def test_aggregate_of_nothing_is_empty():
    assert aggregate([]) == ((), (), ())


def test_a_series_without_traffic_still_names_its_service():
    _, services, _ = aggregate([_http("200", 0.0)])
    assert [(s.name, s.rps, s.success_rate, s.p50_ms) for s in services] == [("web", 0.0, None, None)]
