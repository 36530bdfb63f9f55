"""`local_proxies`: which proxies of a run dir's mesh are listed, and where their metrics are."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from ambientctl.proxies import MeshProxy, local_proxies
from ambientctl.runtime import RunDir
from ambientctl.runtime.manifests import ObjectKey, load_manifests
from ambientctl.runtime.processes import record_of
from ambientctl.runtime.store import ObjectStore

_OBJECTS = """
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-0, namespace: demo, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {containers: [{name: waypoint, command: ["true"]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-1, namespace: demo, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {containers: [{name: waypoint, command: ["true"]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: demo}
spec: {containers: [{name: web, command: ["true"]}]}
"""


def _run_dir(tmp_path: Path, *, supervisor_pid: int, nodes: dict[str, str], live_nodes: list[str]) -> RunDir:
    run_dir = RunDir(tmp_path / "run")
    run_dir.root.mkdir()
    for node, address in nodes.items():
        folder = run_dir.root / "nodes" / node
        folder.mkdir(parents=True)
        (folder / "ztunnel.yaml").write_text(yaml.safe_dump({"node": node, "address": address}))
    run_dir.state_file.write_text(json.dumps({
        "supervisor": record_of("ambientctl", supervisor_pid).to_json(),
        "netns": ["mesh-net", *(f"mesh-{node}" for node in live_nodes)],
    }))
    manifests_file = tmp_path / "objects.yaml"
    manifests_file.write_text(_OBJECTS)
    store = ObjectStore(run_dir.store)
    store.apply(load_manifests(manifests_file))
    # waypoint-0 runs; waypoint-1 is not scheduled yet; web runs but is no waypoint.
    for name, ip in (("waypoint-0", "198.18.1.7"), ("web", "198.18.2.3")):
        store.update(
            ObjectKey(group="", kind="Pod", namespace="demo", name=name),
            lambda pod, ip=ip: pod.__setitem__("status", {"phase": "Running", "podIP": ip}),
        )
    return run_dir


def test_lists_ztunnels_of_live_nodes_and_running_waypoints(tmp_path: Path) -> None:
    # The parent of this test process stands in for a running `ambientctl up`.
    run_dir = _run_dir(
        tmp_path,
        supervisor_pid=os.getppid(),
        nodes={"node-1": "198.19.0.2", "node-2": "198.19.0.3", "node-3": "198.19.0.4"},
        live_nodes=["node-1", "node-2"],  # node-3's folder is left from an earlier, bigger run
    )
    proxies = local_proxies(run_dir)
    assert proxies == [
        MeshProxy(kind="ztunnel", name="node-1", address="198.19.0.2"),
        MeshProxy(kind="ztunnel", name="node-2", address="198.19.0.3"),
        MeshProxy(kind="waypoint", name="demo/waypoint-0", address="198.18.1.7"),
    ]
    assert proxies[0].metrics_url == "http://198.19.0.2:15020/metrics"


def test_no_running_mesh_means_no_proxies(tmp_path: Path) -> None:
    dead_pid = 2**22 + 1  # above the kernel's pid_max: no such process
    run_dir = _run_dir(tmp_path, supervisor_pid=dead_pid, nodes={"node-1": "198.19.0.2"}, live_nodes=["node-1"])
    assert local_proxies(run_dir) == []
    assert local_proxies(RunDir(tmp_path / "never-used")) == []
