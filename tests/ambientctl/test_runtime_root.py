"""`ambientctl up`/`down` for real: nodes and pods as network namespaces, processes, kube-proxy rules.

Needs root (network namespaces, nftables); every test removes what it created, also on failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import yaml

from ambientctl.cli import DEMO_DIR
from ambientctl.runtime import NodeContext, RunDir, Runtime, RunningPod
from ambientctl.runtime.manifests import ObjectKey, load_manifests
from ambientctl.runtime.netns import node_netns, preflight_problems
from ambientctl.runtime.store import ObjectStore

REPO = Path(__file__).resolve().parents[2]
APPS = DEMO_DIR.parent / "apps"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: creates network namespaces, veths and nftables rules"
    problems = preflight_problems()
    if problems:
        return "; ".join(problems)
    if Path("/var/run/netns/mesh-net").exists() or Path("/sys/class/net/mesh-host").exists():
        return "a mesh is already up on this machine (mesh-net exists); run `ambientctl down` first"
    return None


pytestmark = [pytest.mark.root, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]

MANIFEST = f"""\
apiVersion: v1
kind: Namespace
metadata: {{name: demo}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo, namespace: demo}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: echo}}}}
  template:
    metadata: {{labels: {{app: echo}}}}
    spec:
      containers:
        - name: echo
          command: [{sys.executable}, details.py]
          workingDir: {APPS}
          ports: [{{name: http, containerPort: 9080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: demo}}
spec:
  selector: {{app: echo}}
  ports: [{{port: 80, targetPort: http}}]
---
apiVersion: v1
kind: Service
metadata: {{name: nobody, namespace: demo}}
spec:
  selector: {{app: nothing-matches}}
  ports: [{{port: 80}}]
"""


def ambientctl(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ambientctl", *args, "--run-dir", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@dataclass
class Up:
    """A running `ambientctl up` and its run dir."""

    run_dir: Path
    process: subprocess.Popen[bytes]
    output: Path

    @classmethod
    def start(cls, tmp: Path, manifests: Path) -> Up:
        output = tmp / "up.out"
        with output.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "ambientctl", "up", str(manifests), "--run-dir", str(tmp / "run")],
                cwd=REPO,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        up = cls(run_dir=tmp / "run", process=process, output=output)
        deadline = time.monotonic() + 30
        while "the mesh is up" not in output.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                up.stop()
                pytest.fail(f"`ambientctl up` did not come up:\n{output.read_text()}")
            time.sleep(0.1)
        return up

    def pods(self) -> dict[str, dict]:
        listing = yaml.safe_load(ambientctl(self.run_dir, "get", "pods", "-A", "-o", "yaml").stdout)
        return {pod["metadata"]["name"]: pod for pod in listing["items"]}

    def recorded_pids(self) -> list[int]:
        state = json.loads((self.run_dir / "state.json").read_text())
        return [record["pid"] for record in state["processes"].values()] + [state["supervisor"]["pid"]]

    def stop(self) -> None:
        ambientctl(self.run_dir, "down")
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def fetch_in(netns: str, url: str) -> str:
    """GET `url` from inside a network namespace."""
    script = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())"
    result = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", script, url], capture_output=True, text=True, timeout=15)
    assert result.returncode == 0, result.stderr
    return result.stdout


def served_by(body: str) -> str:
    return json.loads(body)["pod"]


def assert_nothing_left(pids: list[int]) -> None:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not re.search(r"^mesh-", netns, re.MULTILINE), netns
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert "mesh-host" not in links
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "ambient_kubeproxy" not in tables
    deadline = time.monotonic() + 5
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"processes still running: {alive}"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    path = tmp_path / "manifests"
    path.mkdir()
    (path / "echo.yaml").write_text(MANIFEST)
    return path


@pytest.fixture(scope="class")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("mesh")
    (tmp / "echo.yaml").write_text(MANIFEST)
    up = Up.start(tmp, tmp / "echo.yaml")
    yield up
    up.stop()


class TestRunningMesh:
    def test_pods_are_spread_over_nodes_and_reported_like_kubernetes(self, mesh: Up):
        pods = mesh.pods()
        assert len(pods) == 2
        assert {pod["spec"]["nodeName"] for pod in pods.values()} == {"node-1", "node-2"}
        for pod in pods.values():
            status = pod["status"]
            node = int(pod["spec"]["nodeName"].split("-")[1])
            assert status["phase"] == "Running"
            assert status["podIP"].startswith(f"198.18.{node}.")
            assert status["hostIP"] == f"198.19.0.{1 + node}"
            assert {"type": "Ready", "status": "True"}.items() <= next(c for c in status["conditions"] if c["type"] == "Ready").items()

    def test_pod_on_one_node_reaches_pod_on_the_other_by_ip(self, mesh: Up):
        (first, first_pod), (second, second_pod) = sorted(mesh.pods().items(), key=lambda item: item[1]["spec"]["nodeName"])
        assert served_by(fetch_in(f"mesh-pod-demo-{first}", f"http://{second_pod['status']['podIP']}:9080/")) == second
        assert served_by(fetch_in(f"mesh-pod-demo-{second}", f"http://{first_pod['status']['podIP']}:9080/")) == first

    def test_service_vip_reaches_every_ready_endpoint_from_a_pod(self, mesh: Up):
        vip = self._vip(mesh, "echo")
        client = next(iter(mesh.pods()))
        seen = set()
        for _ in range(40):  # random choice per connection: both pods (the client itself too) answer
            seen.add(served_by(fetch_in(f"mesh-pod-demo-{client}", f"http://{vip}:80/")))
            if len(seen) == 2:
                break
        assert seen == set(mesh.pods())

    def test_host_reaches_pods_and_services(self, mesh: Up):
        for name, pod in mesh.pods().items():
            with urllib.request.urlopen(f"http://{pod['status']['podIP']}:9080/", timeout=3) as response:
                assert served_by(response.read().decode()) == name
        with urllib.request.urlopen(f"http://{self._vip(mesh, 'echo')}:80/", timeout=3) as response:
            assert served_by(response.read().decode()) in mesh.pods()

    def test_service_without_endpoints_refuses_at_once(self, mesh: Up):
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((self._vip(mesh, "nobody"), 80), timeout=3)
        assert time.monotonic() - started < 1

    def test_nothing_routes_to_a_real_network(self, mesh: Up):
        for netns in ("mesh-net", "mesh-node-1", "mesh-node-2"):
            result = subprocess.run(["ip", "-n", netns, "route", "get", "1.1.1.1"], capture_output=True, text=True)
            assert result.returncode != 0 and "unreachable" in result.stderr, (netns, result.stdout)
        host_routes = subprocess.run(["ip", "route", "show", "dev", "mesh-host"], capture_output=True, text=True).stdout
        assert sorted(line.split()[0] for line in host_routes.splitlines()) == ["198.18.0.0/15", "198.19.255.0/30"]

    def test_pods_come_and_go_with_the_store(self, mesh: Up, tmp_path: Path):
        solo = tmp_path / "solo.yaml"
        solo.write_text(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: solo, namespace: demo}\n"
            "spec: {containers: [{name: sleeper, command: [sleep, '300']}]}\n"
        )
        assert ambientctl(mesh.run_dir, "apply", "-f", str(solo)).returncode == 0
        deadline = time.monotonic() + 5
        while (mesh.pods().get("solo") or {}).get("status", {}).get("phase") != "Running":
            assert time.monotonic() < deadline, mesh.pods().get("solo")
            time.sleep(0.1)
        pid = json.loads((mesh.run_dir / "state.json").read_text())["processes"]["demo/solo/sleeper"]["pid"]
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/var/run/netns/mesh-pod-demo-solo").st_ino
        assert ambientctl(mesh.run_dir, "delete", "-f", str(solo)).returncode == 0
        deadline = time.monotonic() + 10
        while Path("/var/run/netns/mesh-pod-demo-solo").exists() or _alive(pid):
            assert time.monotonic() < deadline, "deleted pod still has its namespace or process"
            time.sleep(0.1)

    def test_a_container_that_exits_shows_in_its_status_and_log(self, mesh: Up, tmp_path: Path):
        broken = tmp_path / "broken.yaml"
        broken.write_text(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: broken, namespace: demo}\n"
            "spec: {containers: [{name: main, command: [sh, -c, 'echo cannot start >&2; exit 3']}]}\n"
        )
        assert ambientctl(mesh.run_dir, "apply", "-f", str(broken)).returncode == 0
        try:
            deadline = time.monotonic() + 5
            while (mesh.pods().get("broken") or {}).get("status", {}).get("phase") != "Failed":
                assert time.monotonic() < deadline, mesh.pods().get("broken")
                time.sleep(0.1)
            [state] = [c["state"] for c in mesh.pods()["broken"]["status"]["containerStatuses"]]
            assert state["terminated"]["exitCode"] == 3
            row = next(line for line in ambientctl(mesh.run_dir, "get", "pods", "-n", "demo").stdout.splitlines() if line.startswith("broken"))
            assert row.split()[1:3] == ["0/1", "Error"]
            assert (mesh.run_dir / "logs/pods/demo/broken/main.log").read_text() == "cannot start\n"
        finally:
            ambientctl(mesh.run_dir, "delete", "-f", str(broken))

    def test_a_second_up_is_refused_while_the_mesh_runs(self, mesh: Up, manifests: Path):
        result = ambientctl(mesh.run_dir, "up", str(manifests))
        assert result.returncode == 1 and "already up" in result.stderr
        assert mesh.process.poll() is None

    @staticmethod
    def _vip(mesh: Up, service: str) -> str:
        listing = yaml.safe_load(ambientctl(mesh.run_dir, "get", "svc", "-n", "demo", service, "-o", "yaml").stdout)
        return listing["spec"]["clusterIP"]


def test_down_removes_everything_and_twice_is_safe(tmp_path: Path, manifests: Path):
    up = Up.start(tmp_path, manifests)
    try:
        pids = up.recorded_pids()
        result = ambientctl(up.run_dir, "down")
        assert result.returncode == 0, result.stderr
        assert up.process.wait(timeout=10) == 0
        assert_nothing_left(pids)
        again = ambientctl(up.run_dir, "down")
        assert again.returncode == 0 and "nothing to remove" in again.stdout
    finally:
        up.stop()


def test_killed_up_is_cleaned_by_the_next_up_and_by_down(tmp_path: Path, manifests: Path):
    up = Up.start(tmp_path, manifests)
    try:
        ips = {name: pod["status"]["podIP"] for name, pod in up.pods().items()}
        orphans = up.recorded_pids()[:-1]
        up.process.kill()  # SIGKILL: no chance to clean up
        up.process.wait()
        assert all(_alive(pid) for pid in orphans)
        up = Up.start(tmp_path, manifests)  # removes the leftovers, then builds again
        assert not any(_alive(pid) for pid in orphans)
        assert {name: pod["status"]["podIP"] for name, pod in up.pods().items()} == ips
        pids = up.recorded_pids()
        os.kill(up.process.pid, signal.SIGKILL)
        up.process.wait()
        result = ambientctl(up.run_dir, "down")
        assert result.returncode == 0, result.stderr
        assert_nothing_left(pids)
    finally:
        up.stop()


def test_bad_manifests_create_nothing(tmp_path: Path, manifests: Path):
    (manifests / "extra.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings, namespace: demo}\n")
    result = ambientctl(tmp_path / "run", "up", str(manifests))
    assert result.returncode == 1
    assert f"{manifests / 'extra.yaml'}: ConfigMap demo/settings: kind: unknown kind v1 ConfigMap" in result.stderr
    assert not (tmp_path / "run" / "state.json").exists() and not (tmp_path / "run" / "store").exists()
    assert_nothing_left([])


def test_without_net_admin_up_says_so_and_creates_nothing(tmp_path: Path, manifests: Path):
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop capabilities")
    result = subprocess.run(
        ["setpriv", "--bounding-set=-net_admin,-sys_admin", "--inh-caps=-net_admin,-sys_admin",
         sys.executable, "-m", "ambientctl", "up", str(manifests), "--run-dir", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "missing CAP_NET_ADMIN and CAP_SYS_ADMIN" in result.stderr
    assert not (tmp_path / "run").exists()


class _PodWatcher:
    """A node service that records what its node's pods look like, as the node agent will."""

    name = "watcher"

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[RunningPod, ...]]] = {}
        self.helper_pids: dict[str, int] = {}

    async def run(self, node: NodeContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            record = await nursery.start(node.run_process, "sleeper", ["sleep", "300"])
            self.helper_pids[node.name] = record.pid
            task_status.started([f"watching {node.name}"])
            pods: tuple[RunningPod, ...] = ()
            while True:
                pods = await node.next_pods(pods)
                self.seen.setdefault(node.name, []).append(pods)


async def test_node_services_run_in_their_node_and_see_its_pods_and_labels(tmp_path: Path, manifests: Path):
    run_dir = RunDir(tmp_path / "run")
    store = ObjectStore(run_dir.store)
    store.apply(load_manifests(manifests))
    watcher = _PodWatcher()
    runtime = Runtime(run_dir=run_dir, node_names=["node-1", "node-2"], node_services=[watcher], grace=2)

    async def latest(node: str) -> tuple[RunningPod, ...]:
        return watcher.seen[node][-1] if watcher.seen.get(node) else ()

    async with trio.open_nursery() as nursery:
        summary = await nursery.start(runtime.run)
        assert summary.hints == ("watching node-1", "watching node-2")
        for node in ("node-1", "node-2"):
            pid = watcher.helper_pids[node]
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/var/run/netns/{node_netns(node)}").st_ino
        with trio.fail_after(2):
            while not (await latest("node-1") and await latest("node-2")):
                await trio.sleep(0.05)
        [pod] = await latest("node-1")
        assert pod.namespace == "demo" and pod.node == "node-1" and pod.ip.startswith("198.18.1.")
        assert pod.netns_path.exists() and pod.service_account == "default" and pod.uid
        assert pod.namespace_labels == {}
        demo = ObjectKey(group="", kind="Namespace", namespace="", name="demo")
        await trio.to_thread.run_sync(
            lambda: store.label(demo, set_labels={"istio.io/dataplane-mode": "ambient"}, remove=(), overwrite=False)
        )
        with trio.fail_after(2):  # enrolment by label has 2 seconds end to end
            while (await latest("node-2"))[0].namespace_labels != {"istio.io/dataplane-mode": "ambient"}:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert_nothing_left(list(watcher.helper_pids.values()))
    assert not run_dir.state_file.exists()
