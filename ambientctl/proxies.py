"""ambientctl/proxies: the running one-machine mesh's proxies and where their metrics are.

A ztunnel runs on every node at the node's link address (ambientctl/mesh.py writes that
address into `nodes/<node>/ztunnel.yaml`); a waypoint runs in every pod labelled
`gateway.networking.k8s.io/gateway-name`, at its pod IP (ambientctl/waypoints.py). Both
addresses are reachable from the host through the mesh-net router, and both proxies serve
Prometheus metrics on :15020.

A proxy is listed from what `up` decided, not from whether it answers now: a ztunnel that
crashed is still listed, so callers can say that it does not answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import yaml

from ambientctl.runtime import RunDir, running_supervisor
from ambientctl.runtime.manifests import is_builtin
from ambientctl.runtime.netns import NetworkError, RunState, node_netns
from ambientctl.runtime.store import ObjectStore
from ambientctl.waypoints import GATEWAY_NAME_LABEL
from meshcore.log import get_logger

METRICS_PORT = 15020

_log = get_logger("ambientctl")


@dataclass(frozen=True, slots=True)
class MeshProxy:
    """One proxy whose metrics can be scraped."""

    kind: Literal["ztunnel", "waypoint"]
    name: str  # node name for a ztunnel ("node-1"); "namespace/pod" for a waypoint
    address: str  # an IP reachable from the host

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{METRICS_PORT}/metrics"


def local_proxies(run_dir: RunDir) -> list[MeshProxy]:
    """The running one-machine mesh's ztunnels (by node name) then waypoints (by pod); [] if none runs."""
    try:
        if running_supervisor(run_dir) is None:
            return []
        state = RunState.load(run_dir.state_file)
    except NetworkError as exc:  # an unreadable journal: no mesh we can speak for
        _log.warning("cannot tell whether a mesh runs", run_dir=str(run_dir.root), error=str(exc))
        return []
    return [*_ztunnels(run_dir, set(state.netns)), *_waypoints(run_dir)]


def _ztunnels(run_dir: RunDir, live_netns: set[str]) -> list[MeshProxy]:
    proxies = []
    for config_path in sorted((run_dir.root / "nodes").glob("*/ztunnel.yaml")):
        node = config_path.parent.name
        if node_netns(node) not in live_netns:
            continue  # a node of an earlier run with more nodes
        try:
            address = (yaml.safe_load(config_path.read_text()) or {}).get("address")
        except (OSError, yaml.YAMLError) as exc:
            _log.warning("cannot read a ztunnel's config", path=str(config_path), error=str(exc))
            continue
        if isinstance(address, str) and address:
            proxies.append(MeshProxy(kind="ztunnel", name=node, address=address))
    return proxies


def _waypoints(run_dir: RunDir) -> list[MeshProxy]:
    proxies = []
    for key, pod in sorted(ObjectStore(run_dir.store).objects().items()):
        if not is_builtin(key, "Pod") or GATEWAY_NAME_LABEL not in (pod["metadata"].get("labels") or {}):
            continue
        status = pod.get("status") or {}
        if status.get("phase") == "Running" and status.get("podIP"):
            proxies.append(MeshProxy(kind="waypoint", name=f"{key.namespace}/{key.name}", address=status["podIP"]))
    return proxies
