"""ztunnel/config: the node proxy's settings, parsed once from a YAML file into frozen values.

    node: node-a                 # workloads in the state file on this node are served here
    address: 127.0.0.1           # node address: outbound, socks5, plaintext, metrics, admin bind here
    trustDomain: cluster.local
    # Either a local state file and a dev CA (no control plane) ...
    state: state.yaml            # workloads/services/policies in ztunnel's local-config format
    ca: {cert: ca.pem, key: ca-key.pem}   # dev CA that mints local workloads' certificates
    # ... or istiod_lite: delta xDS for the state, its CA for certificates
    controlPlane: {address: "127.0.0.1:15012", rootCert: root-cert.pem, tokenFile: node-a.token}
    ports: {outbound: 15001, inboundPlaintext: 15006, inbound: 15008, socks5: 15080,
            metrics: 15020, readiness: 15021, admin: 15000}      # 0 disables a listener
    # In-pod mode: the node agent hands over enrolled pods' netns on this ZDS socket, and
    # 15001/15006/15008 are bound inside each pod instead of on the node address.
    inpod: {socket: /var/run/ztunnel/ztunnel.sock}
    drainSeconds: 5

Relative paths are relative to the config file. Errors name the file and the field.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PORTS = {
    "outbound": 15001,
    "inboundPlaintext": 15006,
    "inbound": 15008,
    "socks5": 15080,
    "metrics": 15020,
    "readiness": 15021,
    "admin": 15000,
}
_TOP_LEVEL = ("node", "address", "trustDomain", "state", "ca", "controlPlane", "ports", "drainSeconds", "inpod")


class ConfigError(ValueError):
    """The ztunnel configuration is unusable; the message names file and field."""


@dataclass(frozen=True, slots=True)
class Ports:
    outbound: int = 15001
    inbound_plaintext: int = 15006
    inbound: int = 15008
    socks5: int = 15080
    metrics: int = 15020
    readiness: int = 15021
    admin: int = 15000

    @property
    def own(self) -> frozenset[int]:
        """Ports a workload may never be addressed on: forwarding there would loop."""
        return frozenset(p for p in (self.outbound, self.inbound_plaintext, self.inbound, self.socks5) if p)


@dataclass(frozen=True, slots=True)
class LocalSource:
    """State from a file, certificates minted with a dev CA: a mesh without a control plane."""

    state_path: Path
    ca_cert_path: Path
    ca_key_path: Path


@dataclass(frozen=True, slots=True)
class ControlPlane:
    """State over delta xDS and certificates from istiod_lite's CA (TLS when root_cert_path)."""

    address: str
    token_path: Path
    root_cert_path: Path | None = None


@dataclass(frozen=True, slots=True)
class ZtunnelConfig:
    node: str
    address: str
    source: LocalSource | ControlPlane
    trust_domain: str = "cluster.local"
    ports: Ports = field(default_factory=Ports)
    drain_seconds: float = 5.0
    inpod_socket: Path | None = None  # in-pod mode when set


def load_config(path: Path) -> ZtunnelConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(raw, source=str(path), base=path.parent)


def parse_config(raw: Any, *, source: str, base: Path) -> ZtunnelConfig:
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

    address = text("address", required("address"))
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(f"{source}: address: {address!r} is not an IP address") from None
    if "controlPlane" in raw:
        if "state" in raw or "ca" in raw:
            raise ConfigError(f"{source}: controlPlane: cannot be combined with state/ca (choose one source)")
        cp = raw["controlPlane"]
        if not isinstance(cp, dict) or not {"address", "tokenFile"} <= set(cp) or set(cp) - {"address", "tokenFile", "rootCert"}:
            raise ConfigError(f"{source}: controlPlane: expected {{address: HOST:PORT, tokenFile: PATH, rootCert: PATH}}, got {cp!r}")
        host, _, port = text("controlPlane.address", cp["address"]).rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"{source}: controlPlane.address: expected HOST:PORT, got {cp['address']!r}")
        origin: LocalSource | ControlPlane = ControlPlane(
            address=cp["address"],
            token_path=base / text("controlPlane.tokenFile", cp["tokenFile"]),
            root_cert_path=base / text("controlPlane.rootCert", cp["rootCert"]) if "rootCert" in cp else None,
        )
    else:
        ca = required("ca")
        if not isinstance(ca, dict) or set(ca) != {"cert", "key"}:
            raise ConfigError(f"{source}: ca: expected {{cert: PATH, key: PATH}}, got {ca!r}")
        origin = LocalSource(
            state_path=base / text("state", required("state")),
            ca_cert_path=base / text("ca.cert", ca["cert"]),
            ca_key_path=base / text("ca.key", ca["key"]),
        )
    ports_raw = raw.get("ports") or {}
    if not isinstance(ports_raw, dict):
        raise ConfigError(f"{source}: ports: expected a mapping, got {ports_raw!r}")
    ports: dict[str, int] = dict(DEFAULT_PORTS)
    for name, value in ports_raw.items():
        if name not in DEFAULT_PORTS:
            raise ConfigError(f"{source}: ports.{name}: unknown port (known: {', '.join(DEFAULT_PORTS)})")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
            raise ConfigError(f"{source}: ports.{name}: expected a port number 0-65535, got {value!r}")
        ports[name] = value
    inpod = raw.get("inpod")
    if inpod is not None and (not isinstance(inpod, dict) or set(inpod) != {"socket"}):
        raise ConfigError(f"{source}: inpod: expected {{socket: PATH}}, got {inpod!r}")
    drain = raw.get("drainSeconds", 5.0)
    if not isinstance(drain, (int, float)) or isinstance(drain, bool) or drain < 0:
        raise ConfigError(f"{source}: drainSeconds: expected a non-negative number, got {drain!r}")
    return ZtunnelConfig(
        node=text("node", required("node")),
        address=address,
        trust_domain=text("trustDomain", raw.get("trustDomain", "cluster.local")),
        source=origin,
        ports=Ports(
            outbound=ports["outbound"],
            inbound_plaintext=ports["inboundPlaintext"],
            inbound=ports["inbound"],
            socks5=ports["socks5"],
            metrics=ports["metrics"],
            readiness=ports["readiness"],
            admin=ports["admin"],
        ),
        drain_seconds=float(drain),
        inpod_socket=base / text("inpod.socket", inpod["socket"]) if inpod else None,
    )
