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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshcore.config import ConfigError, ConfigReader, ControlPlane, load_yaml_file
from meshcore.identity.spiffe import Identity, InvalidIdentity

DEFAULT_PORTS = {"hbone": 15008, "metrics": 15020, "readiness": 15021, "admin": 15000}
_TOP_LEVEL = ("name", "namespace", "address", "trustDomain", "controlPlane", "ports", "drainSeconds", "http")
_HTTP_FIELDS = {
    "maxHeaderBytes": "max_header_bytes",
    "maxBodyBytes": "max_body_bytes",
    "headerTimeoutSeconds": "header_timeout",
    "idleTimeoutSeconds": "idle_timeout",
}


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
    return parse_settings(load_yaml_file(path), source=str(path), base=path.parent)


def parse_settings(raw: Any, *, source: str, base: Path) -> WaypointSettings:
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

    settings = WaypointSettings(
        name=config.text("name", config.required("name")),
        namespace=config.text("namespace", config.required("namespace")),
        address=address,
        control_plane=control_plane,
        trust_domain=config.text("trustDomain", raw.get("trustDomain", "cluster.local")),
        ports=Ports(**ports),
        drain_seconds=config.seconds("drainSeconds", 5.0),
        http=HttpLimits(**http),  # type: ignore[arg-type]
    )
    try:
        settings.identity
    except InvalidIdentity as exc:
        raise ConfigError(f"{source}: name/namespace/trustDomain do not make a workload identity: {exc}") from None
    return settings
