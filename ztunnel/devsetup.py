"""ztunnel/devsetup: write a development mesh (dev CA, state file, per-node configs) to a folder.

Used by the loopback demo, the component tests and the benchmarks, so all three run the real
`ztunnel` with the same files an operator would write by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meshcore.identity.ca import CertificateAuthority


@dataclass(frozen=True)
class DevWorkload:
    name: str
    ip: str
    node: str
    namespace: str = "default"
    service_account: str = ""
    protocol: str = "HBONE"

    def local_config(self) -> dict[str, Any]:
        return {
            "uid": f"Kubernetes//Pod/{self.namespace}/{self.name}",
            "name": self.name,
            "namespace": self.namespace,
            "serviceAccount": self.service_account or self.name,
            "workloadIps": [self.ip],
            "protocol": self.protocol,
            "node": self.node,
            "canonicalName": self.name,
            "canonicalRevision": "v1",
            "workloadName": self.name,
        }


@dataclass(frozen=True)
class DevNode:
    name: str
    address: str
    ports: dict[str, int] = field(default_factory=dict)


def write_ca(folder: Path, trust_domain: str = "cluster.local") -> CertificateAuthority:
    ca = CertificateAuthority.generate(trust_domain)
    (folder / "ca.pem").write_bytes(ca.cert_pem)
    key = folder / "ca-key.pem"
    key.touch(mode=0o600)
    key.write_bytes(ca.key_pem)
    return ca


def write_state(path: Path, workloads: list[DevWorkload], policies: list[dict[str, Any]] = (), services: list[dict[str, Any]] = ()) -> None:
    """Write (atomically, so a watching ztunnel never reads half a file) the local state."""
    data = {"workloads": [w.local_config() for w in workloads], "services": list(services), "policies": list(policies)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


def write_node_config(
    folder: Path,
    node: DevNode,
    *,
    trust_domain: str = "cluster.local",
    drain_seconds: float = 5.0,
    control_plane: dict[str, str] | None = None,
) -> Path:
    """A ztunnel config: the local state file and dev CA, or `control_plane` (the
    `controlPlane` mapping: address, tokenFile, rootCert) when given."""
    path = folder / f"ztunnel-{node.name}.yaml"
    config: dict[str, Any] = {"node": node.name, "address": node.address, "trustDomain": trust_domain}
    if control_plane is None:
        config.update(state="state.yaml", ca={"cert": "ca.pem", "key": "ca-key.pem"})
    else:
        config["controlPlane"] = control_plane
    config.update(ports=node.ports, drainSeconds=drain_seconds)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
