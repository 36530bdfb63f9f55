"""Prometheus vocabulary shared by ztunnel and the waypoint: Istio's standard label names,
Envoy's default histogram buckets, the `istio_build` gauge, and a registry factory.

Names and label sets mirror Istio so existing dashboards and alerts work unchanged
(ambient-facts §8). Missing label values are reported as "unknown", as Istio does.
"""

from __future__ import annotations

from importlib import metadata

import prometheus_client

UNKNOWN = "unknown"

# Envoy's default histogram buckets in milliseconds (source/common/stats/histogram_impl.cc);
# Istio dashboards' latency quantiles assume these boundaries.
ENVOY_DEFAULT_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
    30000, 60000, 300000, 600000, 1800000, 3600000,
)  # fmt: skip

# Labels on every istio_tcp_* family, in the order ztunnel encodes them.
TCP_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)

# Labels on istio_requests_total and the request histograms: the TCP set plus the HTTP outcome.
REQUEST_LABELS: tuple[str, ...] = (*TCP_LABELS, "response_code", "grpc_response_status")


def new_registry() -> prometheus_client.CollectorRegistry:
    """A registry of our own, so tests and co-hosted components never share global state."""
    # Istio exposes no `*_created` series; prometheus_client would double every counter with
    # one. The switch is process-wide and applies to metrics created after it.
    prometheus_client.disable_created_metrics()
    return prometheus_client.CollectorRegistry()


def register_build_info(registry: prometheus_client.CollectorRegistry, component: str) -> None:
    """Add `istio_build{component=<component>, tag=<our version>} 1` to `registry`."""
    build = prometheus_client.Gauge(
        "istio_build",
        "Istio component build info",
        ("component", "tag"),
        registry=registry,
    )
    build.labels(component, _version()).set(1)


def _version() -> str:
    try:
        return metadata.version("ambient-mesh")
    except metadata.PackageNotFoundError:
        return UNKNOWN  # running from a source tree that was never installed
