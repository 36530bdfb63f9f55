"""istiod_lite/config: the controller's settings, parsed once from the command line."""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """An unusable setting; the message names the flag."""


@dataclass(frozen=True, slots=True)
class Ports:
    xds_plaintext: int = 15010  # xDS + CA without TLS (development only)
    xds_tls: int = 15012  # xDS + CA over TLS, the port proxies use
    monitoring: int = 15014  # /metrics, /ready


@dataclass(frozen=True, slots=True)
class IstiodConfig:
    source: str  # "files" | "kube"
    root_dir: Path  # persisted CA root (0600 key) and node tokens
    directory: Path | None = None  # files source
    kubeconfig: Path | None = None  # kube source (None: in-cluster, then ~/.kube/config)
    listen_address: str = "127.0.0.1"
    ports: Ports = field(default_factory=Ports)
    trust_domain: str = "cluster.local"
    # Mesh-wide policies' namespace; with the kube source also istiod's own: its CA Secret,
    # and the Service `istiod` waypoints dial (Istio's root namespace is istiod's by default).
    root_namespace: str = "istio-system"
    ca_cert: Path | None = None  # plug-in CA: operator's signing cert/key (+ chain)
    ca_key: Path | None = None
    ca_chain: Path | None = None
    poll_interval: float = 0.5  # files source
    waypoint_image: str = "ambient-mesh:latest"  # kube source: the image waypoint Deployments run

    @classmethod
    def for_files(cls, directory: Path, *, root_dir: Path, **overrides) -> IstiodConfig:
        return cls(source="files", directory=directory, root_dir=root_dir, **overrides)


def parse_args(argv: list[str] | None = None) -> tuple[IstiodConfig, str]:
    """Returns the config and the log level."""
    parser = argparse.ArgumentParser(prog="istiod-lite", description="Control plane: config sources -> delta xDS, and the mesh CA.")
    parser.add_argument("--source", choices=("files", "kube"), required=True)
    parser.add_argument("--dir", type=Path, help="files source: directory of Kubernetes YAML (watched)")
    parser.add_argument("--kubeconfig", type=Path, help="kube source: kubeconfig (default: in-cluster, then ~/.kube/config)")
    parser.add_argument("--root-dir", type=Path, default=Path("./istiod-data"), help="where the CA root and node tokens are kept")
    parser.add_argument("--listen-address", default="127.0.0.1")
    parser.add_argument("--xds-port", type=int, default=15010, help="plaintext xDS + CA (0 disables)")
    parser.add_argument("--xds-tls-port", type=int, default=15012)
    parser.add_argument("--monitoring-port", type=int, default=15014)
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument(
        "--root-namespace",
        default="istio-system",
        help="namespace of mesh-wide policies; kube source: istiod's own (CA Secret, Service istiod)",
    )
    parser.add_argument("--ca-cert", type=Path, help="plug-in CA certificate (with --ca-key)")
    parser.add_argument("--ca-key", type=Path)
    parser.add_argument("--ca-chain", type=Path, help="plug-in CA: intermediates and root")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="files source: seconds between directory scans")
    parser.add_argument(
        "--waypoint-image", default="ambient-mesh:latest", help="kube source: the image waypoint Deployments run"
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.source == "files" and args.dir is None:
        parser.error("--source files needs --dir DIR")
    if (args.ca_cert is None) != (args.ca_key is None):
        parser.error("--ca-cert and --ca-key go together")
    try:
        ipaddress.ip_address(args.listen_address)
    except ValueError:
        parser.error(f"--listen-address: {args.listen_address!r} is not an IP address")
    for flag in ("xds_port", "xds_tls_port", "monitoring_port"):
        if not 0 <= getattr(args, flag) <= 65535:
            parser.error(f"--{flag.replace('_', '-')}: {getattr(args, flag)} is not a port number")
    if args.poll_interval <= 0:
        parser.error("--poll-interval must be positive")
    if not args.waypoint_image.strip() or any(c.isspace() for c in args.waypoint_image):
        parser.error(f"--waypoint-image: {args.waypoint_image!r} is not an image reference")
    config = IstiodConfig(
        source=args.source,
        directory=args.dir,
        kubeconfig=args.kubeconfig,
        root_dir=args.root_dir,
        listen_address=args.listen_address,
        ports=Ports(args.xds_port, args.xds_tls_port, args.monitoring_port),
        trust_domain=args.trust_domain,
        root_namespace=args.root_namespace,
        ca_cert=args.ca_cert,
        ca_key=args.ca_key,
        ca_chain=args.ca_chain,
        poll_interval=args.poll_interval,
        waypoint_image=args.waypoint_image,
    )
    return config, args.log_level
