"""ztunnel L4 metrics and access log, read back the way Prometheus and a log reader see them."""

from ipaddress import ip_address

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from meshcore.identity.spiffe import Identity
from meshcore.metrics import TCP_LABELS, new_registry
from ztunnel.metrics import ConnectionInfo, ZtunnelMetrics
from ztunnel.state.model import Service, Workload

SLEEP = Workload(
    uid="Kubernetes//Pod/default/sleep-7d9f",
    name="sleep-7d9f",
    namespace="default",
    addresses=(ip_address("10.0.0.5"),),
    node="node-a",
    service_account="sleep",
    canonical_name="sleep",
    canonical_revision="latest",
    workload_name="sleep",
)
REVIEWS = Workload(
    uid="Kubernetes//Pod/bookinfo/reviews-v1-5b4c",
    name="reviews-v1-5b4c",
    namespace="bookinfo",
    addresses=(ip_address("10.0.1.7"),),
    node="node-b",
    service_account="bookinfo-reviews",
    canonical_name="reviews",
    canonical_revision="v1",
    workload_name="reviews-v1",
)
REVIEWS_SERVICE = Service(
    name="reviews",
    namespace="bookinfo",
    hostname="reviews.bookinfo.svc.cluster.local",
    vips=(),
    ports=(),
)
SLEEP_ID = Identity("cluster.local", "default", "sleep")
REVIEWS_ID = Identity("cluster.local", "bookinfo", "bookinfo-reviews")

PEER_LABELS = {
    "source_workload": "sleep",
    "source_canonical_service": "sleep",
    "source_canonical_revision": "latest",
    "source_workload_namespace": "default",
    "source_principal": "spiffe://cluster.local/ns/default/sa/sleep",
    "source_app": "sleep",
    "source_version": "latest",
    "source_cluster": "Kubernetes",
    "destination_service": "reviews.bookinfo.svc.cluster.local",
    "destination_service_namespace": "bookinfo",
    "destination_service_name": "reviews",
    "destination_workload": "reviews-v1",
    "destination_canonical_service": "reviews",
    "destination_canonical_revision": "v1",
    "destination_workload_namespace": "bookinfo",
    "destination_principal": "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
    "destination_app": "reviews",
    "destination_version": "v1",
    "destination_cluster": "Kubernetes",
    "request_protocol": "tcp",
    "connection_security_policy": "mutual_tls",
}


class Denied(Exception):
    response_flag = "DENY"


def sleep_to_reviews(reporter):
    return ConnectionInfo(
        reporter=reporter,
        src_addr=("10.0.0.5", 41234),
        dst_addr=("10.0.1.7", 15008),
        hbone_target="10.0.1.7:9080",
        source_workload=SLEEP,
        source_identity=SLEEP_ID,
        destination_workload=REVIEWS,
        destination_service=REVIEWS_SERVICE,
        destination_identity=REVIEWS_ID,
        mtls=True,
    )


def scrape(registry):
    """{sample name: [(labels, value)]} parsed from the Prometheus text exposition."""
    samples = {}
    text = prometheus_client.generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def tcp(reporter, response_flags="-"):
    return {"reporter": reporter, **PEER_LABELS, "response_flags": response_flags}


@pytest.fixture
def registry():
    return new_registry()


@pytest.fixture
def metrics(registry):
    return ZtunnelMetrics(registry)


def test_outbound_connection_is_counted_with_istio_labels(registry, metrics):
    recorder = metrics.connection(sleep_to_reviews("source"))
    recorder.opened()
    assert scrape(registry)["istio_tcp_sockets_open"] == [({"reporter": "source"}, 1.0)]

    recorder.closed(sent=100, received=2500, error=None)

    samples = scrape(registry)
    assert samples["istio_tcp_connections_opened_total"] == [(tcp("source"), 1.0)]
    assert samples["istio_tcp_connections_closed_total"] == [(tcp("source"), 1.0)]
    # Istio counts the response direction as "sent" whichever side reports.
    assert samples["istio_tcp_sent_bytes_total"] == [(tcp("source"), 2500.0)]
    assert samples["istio_tcp_received_bytes_total"] == [(tcp("source"), 100.0)]
    assert "istio_tcp_connections_failed_total" not in samples
    assert samples["istio_tcp_sockets_open"] == [({"reporter": "source"}, 0.0)]


def test_inbound_connection_reports_destination(registry, metrics):
    recorder = metrics.connection(sleep_to_reviews("destination"))
    recorder.opened()
    recorder.closed(sent=2500, received=100, error=None)

    samples = scrape(registry)
    assert samples["istio_tcp_connections_opened_total"] == [(tcp("destination"), 1.0)]
    assert samples["istio_tcp_connections_closed_total"] == [(tcp("destination"), 1.0)]
    assert samples["istio_tcp_sent_bytes_total"] == [(tcp("destination"), 2500.0)]
    assert samples["istio_tcp_received_bytes_total"] == [(tcp("destination"), 100.0)]


def test_denied_connection_is_opened_closed_and_failed_with_deny(registry, metrics):
    recorder = metrics.connection(sleep_to_reviews("destination"))
    recorder.failed(Denied("connection denied by policy bookinfo/deny-sleep"))

    samples = scrape(registry)
    assert samples["istio_tcp_connections_opened_total"] == [(tcp("destination"), 1.0)]
    assert samples["istio_tcp_connections_closed_total"] == [(tcp("destination", "DENY"), 1.0)]
    assert samples["istio_tcp_connections_failed_total"] == [(tcp("destination", "DENY"), 1.0)]
    assert samples["istio_tcp_sockets_open"] == [({"reporter": "destination"}, 0.0)]


def test_error_without_a_flag_is_a_connect_failure(registry, metrics):
    recorder = metrics.connection(sleep_to_reviews("source"))
    recorder.opened()
    recorder.closed(sent=10, received=0, error=ConnectionRefusedError("refused"))

    samples = scrape(registry)
    assert samples["istio_tcp_connections_closed_total"] == [(tcp("source", "CONNECT"), 1.0)]
    assert samples["istio_tcp_connections_failed_total"] == [(tcp("source", "CONNECT"), 1.0)]


def test_unknown_peer_over_plaintext_is_labelled_unknown(registry, metrics):
    info = ConnectionInfo(
        reporter="destination",
        src_addr=("192.168.9.9", 5555),
        dst_addr=("10.0.1.7", 9080),
        hbone_target=None,
        source_workload=None,
        source_identity=None,
        destination_workload=REVIEWS,
        destination_service=None,
        destination_identity=None,
        mtls=False,
    )
    metrics.connection(info).failed(Denied("plaintext not allowed"))

    [(labels, _)] = scrape(registry)["istio_tcp_connections_closed_total"]
    assert {k: v for k, v in labels.items() if k.startswith("source_")} == dict.fromkeys(
        [name for name in TCP_LABELS if name.startswith("source_")], "unknown"
    )
    assert labels["destination_service"] == "unknown"
    # The destination principal falls back to the local workload's own identity.
    assert labels["destination_principal"] == REVIEWS_ID.uri
    assert labels["connection_security_policy"] == "unknown"


def test_each_connection_emits_one_access_log_event(metrics):
    outbound = metrics.connection(sleep_to_reviews("source"))
    denied = metrics.connection(sleep_to_reviews("destination"))
    with capture_logs() as events:
        outbound.opened()
        outbound.closed(sent=100, received=2500, error=None)
        denied.failed(Denied("connection denied by policy bookinfo/deny-sleep"))

    completed, refused = events
    duration = completed.pop("duration_ms")
    assert isinstance(duration, float) and duration >= 0
    assert completed == {
        "event": "connection complete",
        "log_level": "info",
        "component": "access",
        "src.addr": "10.0.0.5:41234",
        "src.workload": "sleep-7d9f",
        "src.namespace": "default",
        "src.identity": "spiffe://cluster.local/ns/default/sa/sleep",
        "dst.addr": "10.0.1.7:15008",
        "dst.hbone_addr": "10.0.1.7:9080",
        "dst.service": "reviews.bookinfo.svc.cluster.local",
        "dst.workload": "reviews-v1-5b4c",
        "dst.namespace": "bookinfo",
        "dst.identity": "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
        "direction": "outbound",
        "bytes_sent": 100,
        "bytes_recv": 2500,
        "error": None,
        "response_flags": "-",
    }
    assert refused["log_level"] == "error"
    assert refused["direction"] == "inbound"
    assert refused["error"] == "connection denied by policy bookinfo/deny-sleep"
    assert refused["response_flags"] == "DENY"
    assert (refused["bytes_sent"], refused["bytes_recv"]) == (0, 0)


def test_closing_twice_counts_and_logs_once(registry, metrics):
    recorder = metrics.connection(sleep_to_reviews("source"))
    recorder.opened()
    with capture_logs() as events:
        recorder.closed(sent=1, received=2, error=None)
        recorder.closed(sent=1, received=2, error=None)
        recorder.failed(Denied("late"))

    samples = scrape(registry)
    assert len(events) == 1
    assert samples["istio_tcp_connections_closed_total"] == [(tcp("source"), 1.0)]
    assert samples["istio_tcp_sent_bytes_total"] == [(tcp("source"), 2.0)]
    assert samples["istio_tcp_sockets_open"] == [({"reporter": "source"}, 0.0)]
    assert "istio_tcp_connections_failed_total" not in samples


def test_build_info_names_the_component(registry, metrics):
    [(labels, value)] = scrape(registry)["istio_build"]
    assert labels["component"] == "ztunnel" and labels["tag"]
    assert value == 1.0
