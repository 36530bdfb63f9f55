"""`ambientctl check` on the one-machine mesh: passes on a running mesh, names what breaks.

One small mesh (`manifests/mesh-a.yaml`, two nodes): check passes; a ztunnel that stops
answering (SIGSTOP: `up` restarts a ztunnel that exits, like a DaemonSet, but not a frozen
one) is named with its node; istiod_lite killed is named; after `down` check names the
runtime. Needs root; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_one_machine_mesh import MANIFESTS, REPO, Mesh, _skip_reason

pytestmark = [pytest.mark.root, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


def check(run_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "KUBECONFIG"}  # the local mesh, not a cluster
    return subprocess.run(
        [sys.executable, "-m", "ambientctl", "check", "--run-dir", str(run_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def failures(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("×")]


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    mesh = Mesh.up(tmp_path, MANIFESTS / "mesh-a.yaml")
    try:
        yield mesh
    finally:
        mesh.stop()


def test_check_passes_on_a_running_mesh_and_names_what_breaks(mesh: Mesh):
    result = check(mesh.run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    for line in (
        f"√ the one-machine mesh is up: ambientctl up, pid {mesh.process.pid}",
        "√ istiod_lite is ready: http://198.19.0.1:15014/ready",
        "√ ztunnel on node-1 is ready: http://198.19.0.2:15021/healthz/ready",
        "√ ztunnel on node-2 is ready: http://198.19.0.3:15021/healthz/ready",
        "√ root CA certificate is valid and not near expiry: expires ",
        "√ enrolled namespaces: 1: mesh-a",
        "√ waypoints are ready: none defined",
        "Status check results are √",
    ):
        assert line in result.stdout, result.stdout

    ztunnel = mesh.process_record("node/node-2/ztunnel")
    assert ztunnel is not None
    os.kill(ztunnel.pid, signal.SIGSTOP)
    try:
        result = check(mesh.run_dir)
    finally:
        os.kill(ztunnel.pid, signal.SIGCONT)
    assert result.returncode == 1
    [line] = failures(result)
    assert line.startswith("× ztunnel on node-2 is ready: http://198.19.0.3:15021/healthz/ready: ")
    assert line.endswith(f"see {mesh.run_dir / 'logs' / 'services' / 'node-2' / 'ztunnel.log'}")

    istiod = mesh.process_record("cluster/istiod-lite")
    assert istiod is not None
    os.kill(istiod.pid, signal.SIGKILL)
    result = check(mesh.run_dir)
    assert result.returncode == 1
    assert [line.split(":")[0] for line in failures(result)] == ["× istiod_lite is ready"], result.stdout

    mesh.stop()
    result = check(mesh.run_dir)
    assert result.returncode == 1
    assert failures(result) == [
        f"× the one-machine mesh is up: no `ambientctl up` is running for {mesh.run_dir}; "
        "start one (or pass --run-dir, or --kubeconfig for a cluster)"
    ]
