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

Relative paths are relative to the config file. Errors name the file and the field.
(Named settings.py because `waypoint/config/` is the package of the xDS model.)
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meshcore.identity.spiffe import Identity, InvalidIdentity

DEFAULT_PORTS = {"hbone": 15008, "metrics": 15020, "readiness": 15021, "admin": 15000}
_TOP_LEVEL = ("name", "namespace", "address", "trustDomain", "controlPlane", "ports", "drainSeconds", "http")
_HTTP_FIELDS = {
    "maxHeaderBytes": "max_header_bytes",
    "maxBodyBytes": "max_body_bytes",
    "headerTimeoutSeconds": "header_timeout",
    "idleTimeoutSeconds": "idle_timeout",
}


class ConfigError(ValueError):
    """The waypoint configuration is unusable; the message names file and field."""


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
class Ports:
    hbone: int = 15008
    metrics: int = 15020
    readiness: int = 15021
    admin: int = 15000


@dataclass(frozen=True, slots=True)
class ControlPlane:
    """Routes over delta xDS and certificates from istiod_lite's CA (TLS when root_cert_path)."""

    address: str
    token_path: Path
    root_cert_path: Path | None = None


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

    @property
    def identity(self) -> Identity:
        """The waypoint's own workload identity (its ServiceAccount is named after it)."""
        return Identity(self.trust_domain, self.namespace, self.name)

    @property
    def waypoint_key(self) -> str:
        """"<namespace>/<name>": the xDS node metadata WAYPOINT istiod_lite selects config by."""
        return f"{self.namespace}/{self.name}"


def load_settings(path: Path) -> WaypointSettings:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_settings(raw, source=str(path), base=path.parent)


def parse_settings(raw: Any, *, source: str, base: Path) -> WaypointSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    unknown = sorted(set(raw) - set(_TOP_LEVEL))
    if unknown:
        raise ConfigError(f"{source}: unknown field {unknown[0]!r} (known: {', '.join(_TOP_LEVEL)})")

    def text(key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {key}: expected a non-empty string, got {value!r}")
        return value

    def required(key: str) -> Any:
        if key not in raw:
            raise ConfigError(f"{source}: {key}: required")
        return raw[key]

    def number(key: str, value: Any, *, integer: bool = False) -> float:
        kinds = (int,) if integer else (int, float)
        if not isinstance(value, kinds) or isinstance(value, bool) or value <= 0:
            kind = "a positive integer" if integer else "a positive number"
            raise ConfigError(f"{source}: {key}: expected {kind}, got {value!r}")
        return value

    address = text("address", required("address"))
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(f"{source}: address: {address!r} is not an IP address") from None

    cp = required("controlPlane")
    if not isinstance(cp, dict) or not {"address", "tokenFile"} <= set(cp) or set(cp) - {"address", "tokenFile", "rootCert"}:
        raise ConfigError(f"{source}: controlPlane: expected {{address: HOST:PORT, tokenFile: PATH, rootCert: PATH}}, got {cp!r}")
    host, _, port = text("controlPlane.address", cp["address"]).rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{source}: controlPlane.address: expected HOST:PORT, got {cp['address']!r}")
    control_plane = ControlPlane(
        address=cp["address"],
        token_path=base / text("controlPlane.tokenFile", cp["tokenFile"]),
        root_cert_path=base / text("controlPlane.rootCert", cp["rootCert"]) if "rootCert" in cp else None,
    )

    ports_raw = raw.get("ports") or {}
    if not isinstance(ports_raw, dict):
        raise ConfigError(f"{source}: ports: expected a mapping, got {ports_raw!r}")
    ports = dict(DEFAULT_PORTS)
    for name, value in ports_raw.items():
        if name not in DEFAULT_PORTS:
            raise ConfigError(f"{source}: ports.{name}: unknown port (known: {', '.join(DEFAULT_PORTS)})")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
            raise ConfigError(f"{source}: ports.{name}: expected a port number 0-65535, got {value!r}")
        ports[name] = value

    http_raw = raw.get("http") or {}
    if not isinstance(http_raw, dict):
        raise ConfigError(f"{source}: http: expected a mapping, got {http_raw!r}")
    http: dict[str, float] = {}
    for name, value in http_raw.items():
        if name not in _HTTP_FIELDS:
            raise ConfigError(f"{source}: http.{name}: unknown field (known: {', '.join(_HTTP_FIELDS)})")
        http[_HTTP_FIELDS[name]] = number(f"http.{name}", value, integer=name.endswith("Bytes"))

    drain = raw.get("drainSeconds", 5.0)
    if not isinstance(drain, (int, float)) or isinstance(drain, bool) or drain < 0:
        raise ConfigError(f"{source}: drainSeconds: expected a non-negative number, got {drain!r}")

    settings = WaypointSettings(
        name=text("name", required("name")),
        namespace=text("namespace", required("namespace")),
        address=address,
        control_plane=control_plane,
        trust_domain=text("trustDomain", raw.get("trustDomain", "cluster.local")),
        ports=Ports(**ports),
        drain_seconds=float(drain),
        http=HttpLimits(**http),  # type: ignore[arg-type]
    )
    try:
        settings.identity
    except InvalidIdentity as exc:
        raise ConfigError(f"{source}: name/namespace/trustDomain do not make a workload identity: {exc}") from None
    return settings
