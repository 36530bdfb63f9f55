"""waypoint/settings: the waypoint proxy's settings, parsed once from a YAML file into frozen values.

    name: waypoint                # the Waypoint (or Gateway) this proxy serves; also its
    namespace: bookinfo           #   ServiceAccount, so its identity is .../ns/bookinfo/sa/waypoint
    address: 198.18.1.5           # pod IP: HBONE, metrics and readiness bind here
    trustDomain: cluster.local
    controlPlane: {address: "198.18.0.1:15012", rootCert: root-cert.pem, tokenFile: node.token}
    ports: {hbone: 15008, metrics: 15020, readiness: 15021, admin: 15000}   # 0 disables one
                                                       # (hbone 0: any free port)
    drainSeconds: 5
    http:                         # limits on what downstream clients may send
      maxHeaderBytes: 65536       # request head larger than this: 431
      maxBodyBytes: 67108864      # request body larger than this: 413
      headerTimeoutSeconds: 10    # a started request head must be complete by then: 408
      idleTimeoutSeconds: 300     # an idle downstream connection is closed after this
    tracing:                      # a span per request (waypoint/tracing.py), exported over OTLP/HTTP
      otlpEndpoint: http://collector.observability:4318   # spans are POSTed to {otlpEndpoint}/v1/traces;
                                  #   default $OTEL_EXPORTER_OTLP_ENDPOINT; neither: no export, but
                                  #   traceparent is still passed on
      samplingPercent: 100        # share of new traces (requests without a traceparent) recorded
      serviceName: waypoint.bookinfo   # the spans' resource service.name; default <name>.<namespace>

Relative paths are relative to the config file. Errors name the file and the field.
(Named settings.py because `waypoint/config/` is the package of the xDS model.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from meshcore.config import ConfigError, ConfigReader, ControlPlane, load_yaml_file
from meshcore.identity.spiffe import Identity, InvalidIdentity

DEFAULT_PORTS = {"hbone": 15008, "metrics": 15020, "readiness": 15021, "admin": 15000}
_TOP_LEVEL = ("name", "namespace", "address", "trustDomain", "controlPlane", "ports", "drainSeconds", "http", "tracing")
_HTTP_FIELDS = {
    "maxHeaderBytes": "max_header_bytes",
    "maxBodyBytes": "max_body_bytes",
    "headerTimeoutSeconds": "header_timeout",
    "idleTimeoutSeconds": "idle_timeout",
}
_TRACING_FIELDS = ("otlpEndpoint", "samplingPercent", "serviceName")
OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"  # the OpenTelemetry SDKs' standard variable


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one downstream client may send; breaking a limit costs that client only."""

    max_header_bytes: int = 64 * 1024  # Envoy's max_request_headers_kb default (60 KiB) rounded up
    max_body_bytes: int = 64 * 1024 * 1024
    header_timeout: float = 10.0  # slow-loris guard: from a request's first byte to its last header
    idle_timeout: float = 300.0
    # HTTP/2: streams a client may have open at once (Istio's waypoint: 100).
    max_concurrent_streams: int = 100
    # HTTP/2 rapid reset (CVE-2023-44487): this many streams reset by the client before their
    # response completed, within `rapid_reset_window` seconds, ends the connection with
    # GOAWAY ENHANCE_YOUR_CALM.
    rapid_reset_limit: int = 100
    rapid_reset_window: float = 10.0
    # Request bytes kept to replay on a retry; a longer body makes the request not retriable
    # (Envoy: the retry buffer is the connection buffer limit, 1 MiB by default).
    retry_buffer_bytes: int = 1024 * 1024


@dataclass(frozen=True, slots=True)
class OtlpEndpoint:
    """Where spans are sent: OTLP/HTTP (protobuf) POSTs to http://host:port/path."""

    host: str
    port: int
    path: str  # the configured base path + "/v1/traces", as the OTLP exporters build it

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.authority}{self.path}"


@dataclass(frozen=True, slots=True)
class TracingSettings:
    otlp_endpoint: OtlpEndpoint | None = None  # None: no spans, traceparent still propagated
    # Istio's default is 1% (meshConfig defaultConfig.tracing.sampling). Ours is 100: export
    # is off unless an endpoint is configured, so whoever sets one wants to see traces, and
    # the span queue is bounded, so the cost under load is capped; set 1 for Istio's.
    sampling_percent: float = 100.0
    service_name: str | None = None  # None: "<name>.<namespace>"


@dataclass(frozen=True, slots=True)
class Ports:
    hbone: int = 15008
    metrics: int = 15020
    readiness: int = 15021
    admin: int = 15000


@dataclass(frozen=True, slots=True)
class WaypointSettings:
    name: str
    namespace: str
    address: str
    control_plane: ControlPlane | None  # None only when the app is given a feed (tests)
    trust_domain: str = "cluster.local"
    ports: Ports = field(default_factory=Ports)
    drain_seconds: float = 5.0
    http: HttpLimits = field(default_factory=HttpLimits)
    tracing: TracingSettings = field(default_factory=TracingSettings)

    @property
    def identity(self) -> Identity:
        """The waypoint's own workload identity (its ServiceAccount is named after it)."""
        return Identity(self.trust_domain, self.namespace, self.name)

    @property
    def waypoint_key(self) -> str:
        """"<namespace>/<name>": the xDS node metadata WAYPOINT istiod_lite selects config by."""
        return f"{self.namespace}/{self.name}"

    @property
    def node_id(self) -> str:
        """The Envoy node id an Istio waypoint presents (xDS node, spans' node_id tag)."""
        return f"waypoint~{self.address}~{self.name}.{self.namespace}~{self.namespace}.svc.cluster.local"

    @property
    def service_name(self) -> str:
        """The spans' resource `service.name`."""
        return self.tracing.service_name or f"{self.name}.{self.namespace}"


def load_settings(path: Path, *, address: str | None = None) -> WaypointSettings:
    """`address` replaces the file's: a pod's IP is known only when it runs (in Kubernetes,
    `--address $(POD_IP)` from the Downward API), while its config file is written before."""
    raw = load_yaml_file(path)
    if address is not None and isinstance(raw, dict):
        raw = {**raw, "address": address}
    return parse_settings(raw, source=str(path), base=path.parent, environ=os.environ)


def parse_settings(raw: Any, *, source: str, base: Path, environ: Mapping[str, str] | None = None) -> WaypointSettings:
    """`environ` supplies OTEL_EXPORTER_OTLP_ENDPOINT when the file sets no tracing endpoint."""
    config = ConfigReader(raw, source=source, base=base, known=_TOP_LEVEL)

    def number(key: str, value: Any, *, integer: bool = False) -> float:
        kinds = (int,) if integer else (int, float)
        if not isinstance(value, kinds) or isinstance(value, bool) or value <= 0:
            kind = "a positive integer" if integer else "a positive number"
            raise config.fail(key, f"expected {kind}, got {value!r}")
        return value

    address = config.ip_address("address")
    config.required("controlPlane")
    control_plane = config.control_plane()
    ports = config.ports(DEFAULT_PORTS)
    http: dict[str, float] = {}
    for name, value in config.mapping("http").items():
        if name not in _HTTP_FIELDS:
            raise config.fail(f"http.{name}", f"unknown field (known: {', '.join(_HTTP_FIELDS)})")
        http[_HTTP_FIELDS[name]] = number(f"http.{name}", value, integer=name.endswith("Bytes"))
    tracing = _parse_tracing(config, environ or {})

    settings = WaypointSettings(
        name=config.text("name", config.required("name")),
        namespace=config.text("namespace", config.required("namespace")),
        address=address,
        control_plane=control_plane,
        trust_domain=config.text("trustDomain", raw.get("trustDomain", "cluster.local")),
        ports=Ports(**ports),
        drain_seconds=config.seconds("drainSeconds", 5.0),
        http=HttpLimits(**http),  # type: ignore[arg-type]
        tracing=tracing,
    )
    try:
        settings.identity
    except InvalidIdentity as exc:
        raise ConfigError(f"{source}: name/namespace/trustDomain do not make a workload identity: {exc}") from None
    return settings


def _parse_tracing(config: ConfigReader, environ: Mapping[str, str]) -> TracingSettings:
    section = config.mapping("tracing")
    for name in section:
        if name not in _TRACING_FIELDS:
            raise config.fail(f"tracing.{name}", f"unknown field (known: {', '.join(_TRACING_FIELDS)})")
    endpoint: OtlpEndpoint | None = None
    if "otlpEndpoint" in section:
        value = section["otlpEndpoint"]
        if not isinstance(value, str):
            raise config.fail("tracing.otlpEndpoint", f"expected an http:// URL, got {value!r}")
        try:
            endpoint = parse_otlp_endpoint(value)
        except ValueError as exc:
            raise config.fail("tracing.otlpEndpoint", str(exc)) from None
    elif environ.get(OTLP_ENDPOINT_ENV):
        try:
            endpoint = parse_otlp_endpoint(environ[OTLP_ENDPOINT_ENV])
        except ValueError as exc:
            raise ConfigError(f"environment variable {OTLP_ENDPOINT_ENV}: {exc}") from None
    percent = section.get("samplingPercent", 100)
    if not isinstance(percent, (int, float)) or isinstance(percent, bool) or not 0 <= percent <= 100:
        raise config.fail("tracing.samplingPercent", f"expected a number from 0 to 100, got {percent!r}")
    service_name = section.get("serviceName")
    if service_name is not None and (not isinstance(service_name, str) or not service_name):
        raise config.fail("tracing.serviceName", f"expected a non-empty string, got {service_name!r}")
    return TracingSettings(otlp_endpoint=endpoint, sampling_percent=float(percent), service_name=service_name)


def parse_otlp_endpoint(value: str) -> OtlpEndpoint:
    """"http://host[:port][/base]" -> where to POST spans; ValueError says what is wrong."""
    try:
        url = urlsplit(value.strip())
        port = url.port
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a URL: {exc}") from None
    if url.scheme != "http":
        raise ValueError(f"expected an http:// URL (OTLP/HTTP without TLS), got {value!r}")
    if not url.hostname:
        raise ValueError(f"{value!r} has no host")
    if url.query or url.fragment:
        raise ValueError(f"{value!r} has a query or fragment; expected http://host:port[/path]")
    return OtlpEndpoint(host=url.hostname, port=port or 80, path=url.path.rstrip("/") + "/v1/traces")
