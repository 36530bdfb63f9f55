"""ztunnel/config: the node proxy's settings, parsed once from a YAML file into frozen values.

    node: node-a                 # workloads in the state file on this node are served here
                                 # (default: $NODE_NAME, as Istio's DaemonSet sets it)
    address: 127.0.0.1           # node address: outbound, socks5, plaintext, metrics, admin bind
                                 # here (default: $INSTANCE_IP, the pod's IP in a DaemonSet)
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

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshcore.config import ConfigError, ConfigReader, ControlPlane, load_yaml_file

# ConfigError and ControlPlane are part of this module's surface (the shared reader defines them).
__all__ = ["ConfigError", "ControlPlane", "LocalSource", "Ports", "ZtunnelConfig", "load_config", "parse_config"]

DEFAULT_PORTS = {
    "outbound": 15001,
    "inboundPlaintext": 15006,
    "inbound": 15008,
    "socks5": 15080,
    "metrics": 15020,
    "readiness": 15021,
    "admin": 15000,
}
# Fields a DaemonSet's Downward API supplies when the file leaves them out.
_FROM_ENVIRONMENT = {"node": "NODE_NAME", "address": "INSTANCE_IP"}
_TOP_LEVEL = ("node", "address", "trustDomain", "state", "ca", "controlPlane", "ports", "drainSeconds", "inpod")


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
class ZtunnelConfig:
    node: str
    address: str
    source: LocalSource | ControlPlane
    trust_domain: str = "cluster.local"
    ports: Ports = field(default_factory=Ports)
    drain_seconds: float = 5.0
    inpod_socket: Path | None = None  # in-pod mode when set


def load_config(path: Path) -> ZtunnelConfig:
    return parse_config(load_yaml_file(path), source=str(path), base=path.parent, environ=os.environ)


def parse_config(raw: Any, *, source: str, base: Path, environ: Mapping[str, str] | None = None) -> ZtunnelConfig:
    """`environ`: where `node` and `address` come from when the file leaves them out (one
    ConfigMap serves every node of a DaemonSet)."""
    if isinstance(raw, dict) and environ is not None:
        defaults = {key: environ[variable] for key, variable in _FROM_ENVIRONMENT.items() if environ.get(variable)}
        raw = {**defaults, **raw}
    config = ConfigReader(raw, source=source, base=base, known=_TOP_LEVEL)
    address = config.ip_address("address")
    if "controlPlane" in raw:
        if "state" in raw or "ca" in raw:
            raise config.fail("controlPlane", "cannot be combined with state/ca (choose one source)")
        origin: LocalSource | ControlPlane = config.control_plane()
    else:
        ca = config.required("ca")
        if not isinstance(ca, dict) or set(ca) != {"cert", "key"}:
            raise config.fail("ca", f"expected {{cert: PATH, key: PATH}}, got {ca!r}")
        origin = LocalSource(
            state_path=config.path("state", config.required("state")),
            ca_cert_path=config.path("ca.cert", ca["cert"]),
            ca_key_path=config.path("ca.key", ca["key"]),
        )
    ports = config.ports(DEFAULT_PORTS)
    inpod = raw.get("inpod")
    if inpod is not None and (not isinstance(inpod, dict) or set(inpod) != {"socket"}):
        raise config.fail("inpod", f"expected {{socket: PATH}}, got {inpod!r}")
    return ZtunnelConfig(
        node=config.text("node", config.required("node")),
        address=address,
        trust_domain=config.text("trustDomain", raw.get("trustDomain", "cluster.local")),
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
        drain_seconds=config.seconds("drainSeconds", 5.0),
        inpod_socket=config.path("inpod.socket", inpod["socket"]) if inpod else None,
    )
