"""The whole mesh on one machine, as a user runs it: `ambientctl up`, real namespaces, real capture.

Two namespaces from `manifests/`: `mesh-a` (labelled ambient) and `plain` (not enrolled), each
with a client pod on node-1 and an echo server on node-2 behind a Service. Clients run inside
the client pods' network namespaces, so the pods' capture rules apply to them. What is
checked is what a user sees: the echo servers' logs, the replies, the ztunnels' Prometheus
metrics (at the URLs `up` prints), tcpdump on the node link, and what `down` leaves behind.

One mesh at a time can exist (namespace names are global): each test class gets its own
two-namespace mesh (the test that may leave a ztunnel dead has one to itself), and the
bookinfo demo comes up last. Needs root; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ambientctl.runtime.netns import NODE_LINK, RunState, node_netns, pod_netns, preflight_problems
from ambientctl.runtime.processes import ProcessRecord, pids_in_netns

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = Path(__file__).resolve().parent / "manifests"
NODES = ("node-1", "node-2")
ECHO_PORT = 8080
SERVICE_PORT = 80
CAPTURE_PORTS = {15001, 15006, 15008}  # ztunnel's in-pod listeners: present = the pod is captured
MESH_A_CLIENT = "spiffe://cluster.local/ns/mesh-a/sa/client"
MESH_A_SERVER = "spiffe://cluster.local/ns/mesh-a/sa/server"
ENROLMENT_SECONDS = 2.0  # the budget from a label change to capture/release
RESTART_SECONDS = 5.0

T = TypeVar("T")


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


# --- driving ambientctl ---


def ambientctl(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ambientctl", *args, "--run-dir", str(run_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )


@dataclass
class Mesh:
    """A running `ambientctl up` (foreground supervisor) and its run dir."""

    run_dir: Path
    process: subprocess.Popen[bytes]
    output_path: Path
    nft_tables_before: set[str]

    @classmethod
    def up(cls, folder: Path, manifests: Path | None) -> Mesh:
        """`ambientctl up [manifests]`, returned once it says the mesh is up."""
        output_path = folder / "up.out"
        nft_tables_before = host_nft_tables()
        with output_path.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "ambientctl", "up", *([str(manifests)] if manifests else []), "--run-dir", str(folder / "run")],
                cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
            )
        mesh = cls(run_dir=folder / "run", process=process, output_path=output_path, nft_tables_before=nft_tables_before)
        deadline = time.monotonic() + 60
        while "the mesh is up" not in mesh.output:
            if process.poll() is not None or time.monotonic() > deadline:
                mesh.stop()
                pytest.fail(f"`ambientctl up` did not come up:\n{mesh.output}")
            time.sleep(0.1)
        return mesh

    @property
    def output(self) -> str:
        return self.output_path.read_text()

    def metrics_url(self, node: str) -> str:
        """The ztunnel metrics URL `up` printed for `node`."""
        return self._printed_url(rf"ztunnel {node}: metrics (\S+?),")

    def ready_url(self, node: str) -> str:
        return self._printed_url(rf"ztunnel {node}: .* ready (\S+?),")

    def frontend_url(self) -> str:
        return self._printed_url(r"curl (\S+)\s+# bookinfo/frontend, from this host")

    def _printed_url(self, pattern: str) -> str:
        match = re.search(pattern, self.output)
        assert match, f"`ambientctl up` did not print {pattern!r}:\n{self.output}"
        return match.group(1)

    def get(self, kind: str, namespace: str, name: str) -> dict:
        result = ambientctl(self.run_dir, "get", kind, "-n", namespace, name, "-o", "yaml")
        assert result.returncode == 0, result.stderr
        return yaml.safe_load(result.stdout)

    def pod_ip(self, namespace: str, name: str) -> str:
        return self.get("pods", namespace, name)["status"]["podIP"]

    def vip(self, namespace: str, service: str) -> str:
        return self.get("services", namespace, service)["spec"]["clusterIP"]

    def container_log(self, namespace: str, pod: str, container: str) -> Path:
        return self.run_dir / "logs" / "pods" / namespace / pod / f"{container}.log"

    def label_namespace(self, namespace: str, *changes: str) -> float:
        """`ambientctl label namespace`; returns when (monotonic) the change was stored."""
        result = ambientctl(self.run_dir, "label", "namespace", namespace, *changes)
        assert result.returncode == 0, result.stderr
        return time.monotonic()

    def process_record(self, name: str) -> ProcessRecord | None:
        """A process of the run as its journal lists it, e.g. "node/node-2/ztunnel"."""
        return RunState.load(self.run_dir / "state.json").processes.get(name)

    def every_pid(self) -> set[int]:
        """The supervisor, every journaled process, and every process in one of the mesh's namespaces."""
        state = RunState.load(self.run_dir / "state.json")
        pids = {record.pid for record in state.processes.values()} | {self.process.pid}
        return pids | pids_in_netns([Path("/var/run/netns") / name for name in state.netns])

    def stop(self) -> None:
        ambientctl(self.run_dir, "down")
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


# --- looking at the machine ---


def host_nft_tables() -> set[str]:
    return set(subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout.splitlines())


def mesh_netns() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith("mesh-")]


def mesh_host_links() -> list[str]:
    listing = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0].split("@")[0] for line in listing.splitlines() if line.startswith("mesh-")]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def listening_ports(netns: str) -> set[int]:
    listing = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in listing.splitlines()}


def wait_until(condition: Callable[[], T], *, timeout: float, what: Callable[[], str] | str) -> T:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what() if callable(what) else what} (waited {timeout:g} s)")
        time.sleep(0.05)
    return value


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def connections_opened_series(metrics_url: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """The istio_tcp_connections_opened_total series (labels, value) that carry `labels`."""
    with urllib.request.urlopen(metrics_url, timeout=3) as response:
        text = response.read().decode()
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "istio_tcp_connections_opened_total" and labels.items() <= sample.labels.items()
    ]


def tcp_connections_opened(metrics_url: str, **labels: str) -> float:
    return sum(value for _, value in connections_opened_series(metrics_url, **labels))


# --- traffic ---

_EXCHANGE = """\
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
    conn.sendall(sys.argv[3].encode() + b"\\n")
    print(conn.makefile().readline().strip())
"""


def exchange(netns: str, host: str, port: int, line: str) -> str:
    """Send one line from inside `netns` and return the echo server's answer."""
    result = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", _EXCHANGE, host, str(port), line],
        capture_output=True, text=True, timeout=20,
    )
    assert result.returncode == 0, f"{line!r} from {netns} to {host}:{port} failed:\n{result.stderr}"
    return result.stdout.strip()


def peers_that_sent(log: Path, line: str) -> list[str]:
    """The peer addresses the echo server logged for `line`."""
    return re.findall(rf"^peer (\S+) sent {re.escape(line)}$", log.read_text(), re.MULTILINE)


# One new connection at a time, `pause` seconds from start to start; one output line per
# request: start time, outcome.
_CLIENT_LOOP = """\
import socket, sys, time
host, port, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n = 0
while True:
    n += 1
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.sendall(b"loop-%d\\n" % n)
            reply = conn.makefile("rb").readline()
        outcome = "ok" if reply.endswith(b" loop-%d\\n" % n) else "bad-reply %r" % reply
    except OSError as exc:
        outcome = "failed %r" % exc
    print(started, outcome, flush=True)
    time.sleep(max(0.0, started + pause - time.monotonic()))
"""


class ClientLoop:
    """The client loop running in a pod's network namespace; its results, so far."""

    def __init__(self, netns: str, host: str, port: int, output: Path, *, pause: float) -> None:
        self._output = output
        with output.open("wb") as sink:
            self._process = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, "-c", _CLIENT_LOOP, host, str(port), str(pause)],
                stdout=sink, stderr=subprocess.STDOUT,
            )

    def results(self) -> list[tuple[float, str]]:
        rows = []
        for line in self._output.read_text().splitlines():
            started, _, outcome = line.partition(" ")
            rows.append((float(started), outcome))
        return rows

    def successes(self) -> int:
        return sum(1 for _, outcome in self.results() if outcome == "ok")

    def failures(self) -> list[tuple[float, str]]:
        return [row for row in self.results() if row[1] != "ok"]

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=5)


class PacketCapture:
    """tcpdump on a node's link, inside the node's namespace, into a pcap file."""

    def __init__(self, node: str, pcap: Path) -> None:
        self.pcap = pcap
        self._log = pcap.with_suffix(".log")
        with self._log.open("wb") as sink:
            self._process = subprocess.Popen(
                ["ip", "netns", "exec", node_netns(node), "tcpdump", "-i", NODE_LINK, "-nn", "-U", "--immediate-mode",
                 "-Z", "root", "-w", str(pcap)],
                stdout=subprocess.DEVNULL, stderr=sink,
            )
        wait_until(
            lambda: "listening on" in self._log.read_text() or self._process.poll() is not None,
            timeout=10, what="tcpdump did not start",
        )
        assert self._process.poll() is None, f"tcpdump failed: {self._log.read_text()}"

    def saw(self, payload: str) -> bool:
        return payload.encode() in self.pcap.read_bytes()

    def packets(self, expression: str) -> int:
        result = subprocess.run(["tcpdump", "-r", str(self.pcap), "-nn", expression], capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, result.stderr
        return len(result.stdout.splitlines())

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            self._process.wait(timeout=10)


# --- the two-namespace mesh ---


def _captured(namespace: str, pod: str) -> bool:
    return CAPTURE_PORTS <= listening_ports(pod_netns(namespace, pod))


@pytest.fixture(scope="class")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    mesh = Mesh.up(tmp_path_factory.mktemp("mesh"), MANIFESTS)
    try:
        for namespace in ("mesh-a", "plain"):
            wait_until(
                lambda: ECHO_PORT in listening_ports(pod_netns(namespace, "server")),
                timeout=10, what=f"the echo server in {namespace} does not listen",
            )
        for pod in ("client", "server"):
            wait_until(lambda: _captured("mesh-a", pod), timeout=10, what=f"mesh-a/{pod} was not captured")
        yield mesh
    finally:
        mesh.stop()


class TestTwoNamespaces:
    def test_enrolled_to_enrolled_across_nodes_is_mutual_tls_and_no_plaintext_on_the_wire(self, mesh: Mesh, tmp_path: Path):
        if shutil.which("tcpdump") is None:
            pytest.skip("needs tcpdump (Debian package tcpdump) to look at the node link")
        client_ip, server_ip = mesh.pod_ip("mesh-a", "client"), mesh.pod_ip("mesh-a", "server")
        secret, control = f"secret-{uuid.uuid4().hex}", f"in-the-clear-{uuid.uuid4().hex}"
        identities = {
            "connection_security_policy": "mutual_tls",
            "source_principal": MESH_A_CLIENT,
            "destination_principal": MESH_A_SERVER,
        }
        source_before = tcp_connections_opened(mesh.metrics_url("node-1"), reporter="source", **identities)
        destination_before = tcp_connections_opened(mesh.metrics_url("node-2"), reporter="destination", **identities)
        capture = PacketCapture("node-1", tmp_path / "node-1.pcap")
        try:
            reply = exchange(pod_netns("mesh-a", "client"), mesh.vip("mesh-a", "server"), SERVICE_PORT, secret)
            # The same kind of line between the non-enrolled pods shows what plaintext looks like here.
            exchange(pod_netns("plain", "client"), mesh.vip("plain", "server"), SERVICE_PORT, control)
            wait_until(lambda: capture.saw(control), timeout=5, what="tcpdump on node-1's link did not see the plaintext control line")
        finally:
            capture.stop()

        assert reply == f"server {secret}"
        assert len(peers_that_sent(mesh.container_log("mesh-a", "server", "echo"), secret)) == 1
        wait_until(
            lambda: tcp_connections_opened(mesh.metrics_url("node-1"), reporter="source", **identities) == source_before + 1
            and tcp_connections_opened(mesh.metrics_url("node-2"), reporter="destination", **identities) == destination_before + 1,
            timeout=2, what="the ztunnels did not each count one mutual_tls connection mesh-a/client -> mesh-a/server",
        )
        assert capture.packets(f"tcp port 15008 and host {client_ip} and host {server_ip}") > 0
        assert not capture.saw(secret), "the enrolled pods' payload crossed the node link in plaintext"

    def test_the_server_app_sees_the_client_pod_ip(self, mesh: Mesh):
        server_log = mesh.container_log("mesh-a", "server", "echo")
        for client_namespace in ("mesh-a", "plain"):  # over HBONE (15008) and captured plaintext (15006)
            line = f"who-am-i-{uuid.uuid4().hex}"
            exchange(pod_netns(client_namespace, "client"), mesh.vip("mesh-a", "server"), SERVICE_PORT, line)
            assert peers_that_sent(server_log, line) == [mesh.pod_ip(client_namespace, "client")], client_namespace

    def test_enrolled_to_non_enrolled_is_plain_tcp_from_the_pod_ip(self, mesh: Mesh):
        line = f"to-plain-{uuid.uuid4().hex}"
        labels = {"source_workload_namespace": "mesh-a", "destination_workload_namespace": "plain"}
        source_before = tcp_connections_opened(mesh.metrics_url("node-1"), reporter="source", connection_security_policy="unknown", **labels)

        reply = exchange(pod_netns("mesh-a", "client"), mesh.vip("plain", "server"), SERVICE_PORT, line)

        assert reply == f"server {line}"
        # ztunnel dials out from inside the client pod, so the connection leaves with the pod's IP.
        assert peers_that_sent(mesh.container_log("plain", "server", "echo"), line) == [mesh.pod_ip("mesh-a", "client")]
        wait_until(
            lambda: tcp_connections_opened(mesh.metrics_url("node-1"), reporter="source", connection_security_policy="unknown", **labels)
            == source_before + 1,
            timeout=2, what="node-1's ztunnel did not count one plaintext connection mesh-a/client -> plain/server",
        )
        assert tcp_connections_opened(mesh.metrics_url("node-2"), **labels) == 0, "the non-enrolled server's ztunnel saw the connection"

    def test_non_enrolled_to_enrolled_arrives_through_the_plaintext_inbound_port(self, mesh: Mesh):
        line = f"from-plain-{uuid.uuid4().hex}"
        labels = {
            "reporter": "destination",
            "connection_security_policy": "unknown",
            "source_principal": "unknown",
            "source_workload_namespace": "plain",
            "destination_principal": MESH_A_SERVER,
        }
        before = tcp_connections_opened(mesh.metrics_url("node-2"), **labels)

        reply = exchange(pod_netns("plain", "client"), mesh.vip("mesh-a", "server"), SERVICE_PORT, line)

        assert reply == f"server {line}"
        assert len(peers_that_sent(mesh.container_log("mesh-a", "server", "echo"), line)) == 1
        wait_until(
            lambda: tcp_connections_opened(mesh.metrics_url("node-2"), **labels) == before + 1,
            timeout=2, what="node-2's ztunnel did not count one plaintext inbound connection plain/client -> mesh-a/server",
        )

    def test_labelling_a_namespace_captures_and_releases_its_running_pods_within_2_seconds(self, mesh: Mesh, tmp_path: Path):
        plain_to_plain = {"source_workload_namespace": "plain", "destination_workload_namespace": "plain"}

        def meshed(node: str, reporter: str) -> float:
            return tcp_connections_opened(mesh.metrics_url(node), reporter=reporter, connection_security_policy="mutual_tls", **plain_to_plain)

        def seen_by_any_ztunnel() -> float:
            return sum(tcp_connections_opened(mesh.metrics_url(node), **plain_to_plain) for node in NODES)

        def still_answered() -> None:
            successes = loop.successes()
            time.sleep(1.0)
            assert loop.successes() - successes >= 5, f"the client loop is no longer answered: {loop.results()[-10:]}"

        loop = ClientLoop(pod_netns("plain", "client"), mesh.vip("plain", "server"), SERVICE_PORT, tmp_path / "loop.out", pause=0.1)
        try:
            wait_until(lambda: loop.successes() >= 5, timeout=10, what=lambda: f"the client loop is not answered: {loop.results()}")
            assert not _captured("plain", "client") and not _captured("plain", "server")
            source_before, destination_before = meshed("node-1", "source"), meshed("node-2", "destination")

            labelled_at = mesh.label_namespace("plain", "istio.io/dataplane-mode=ambient", "--overwrite")
            wait_until(
                lambda: meshed("node-1", "source") > source_before and meshed("node-2", "destination") > destination_before,
                timeout=ENROLMENT_SECONDS, what="new connections in the labelled namespace are not carried with mutual_tls",
            )
            assert time.monotonic() - labelled_at <= ENROLMENT_SECONDS
            assert _captured("plain", "client") and _captured("plain", "server")
            still_answered()

            released_at = mesh.label_namespace("plain", "istio.io/dataplane-mode-")
            time.sleep(max(0.0, released_at + ENROLMENT_SECONDS - time.monotonic()))
            seen = seen_by_any_ztunnel()
            still_answered()
            assert seen_by_any_ztunnel() == seen, f"connections still go through ztunnel {ENROLMENT_SECONDS:g} s after the label was removed"
            assert not _captured("plain", "client") and not _captured("plain", "server")
        finally:
            loop.stop()
            mesh.label_namespace("plain", "istio.io/dataplane-mode-")

    def test_a_killed_ztunnel_is_restarted_and_recaptures_every_enrolled_pod(self, mesh: Mesh):
        killed = mesh.process_record("node/node-2/ztunnel")
        assert killed is not None and killed.is_alive()
        os.kill(killed.pid, signal.SIGKILL)

        def restarted() -> ProcessRecord | None:
            record = mesh.process_record("node/node-2/ztunnel")
            return record if record is not None and record.pid != killed.pid and record.is_alive() else None

        wait_until(restarted, timeout=RESTART_SECONDS, what=f"the ztunnel on node-2 was not restarted within {RESTART_SECONDS:g} s")
        wait_until(lambda: http_ok(mesh.ready_url("node-2")), timeout=10, what="the restarted ztunnel did not become ready")
        # The agent's snapshot re-captures the only enrolled pod on node-2; traffic to it is mTLS again.
        wait_until(lambda: _captured("mesh-a", "server"), timeout=5, what="mesh-a/server was not captured again")
        line = f"after-restart-{uuid.uuid4().hex}"
        assert exchange(pod_netns("mesh-a", "client"), mesh.vip("mesh-a", "server"), SERVICE_PORT, line) == f"server {line}"
        wait_until(
            lambda: tcp_connections_opened(
                mesh.metrics_url("node-2"), reporter="destination", connection_security_policy="mutual_tls",
                source_principal=MESH_A_CLIENT, destination_principal=MESH_A_SERVER,
            ) >= 1,
            timeout=2, what="the restarted ztunnel did not count the mutual_tls connection",
        )

    def test_down_leaves_no_namespaces_links_rules_or_processes(self, mesh: Mesh):
        pids = mesh.every_pid()
        for name in ("cluster/istiod-lite", "node/node-1/ztunnel", "mesh-a/server/echo", "plain/client/sleep"):
            record = mesh.process_record(name)
            assert record is not None and record.pid in pids, name

        result = ambientctl(mesh.run_dir, "down")

        assert result.returncode == 0, result.stderr
        assert mesh.process.wait(timeout=30) == 0
        assert mesh_netns() == []
        assert mesh_host_links() == []
        assert host_nft_tables() - mesh.nft_tables_before == set()
        wait_until(lambda: not [pid for pid in pids if alive(pid)], timeout=5, what=lambda: f"processes left: {[p for p in pids if alive(p)]}")


class TestCaptureSwitchUnderLoad:
    """In a mesh of its own: when it fails, a ztunnel may be left dead."""

    def test_back_to_back_requests_never_fail_while_the_namespace_is_labelled_and_unlabelled(self, mesh: Mesh, tmp_path: Path):
        loop = ClientLoop(pod_netns("plain", "client"), mesh.vip("plain", "server"), SERVICE_PORT, tmp_path / "loop.out", pause=0)
        try:
            wait_until(lambda: loop.successes() >= 5, timeout=10, what=lambda: f"the client loop is not answered: {loop.results()}")
            for _ in range(2):
                mesh.label_namespace("plain", "istio.io/dataplane-mode=ambient", "--overwrite")
                wait_until(lambda: _captured("plain", "client") and _captured("plain", "server"), timeout=ENROLMENT_SECONDS, what="plain was not captured")
                time.sleep(0.5)
                mesh.label_namespace("plain", "istio.io/dataplane-mode-")
                wait_until(lambda: not _captured("plain", "client") and not _captured("plain", "server"), timeout=ENROLMENT_SECONDS, what="plain was not released")
                time.sleep(0.5)
        finally:
            loop.stop()
        assert loop.successes() > 100
        assert loop.failures() == [], f"{len(loop.failures())} requests failed while capture switched"
        for node in NODES:
            ztunnel = mesh.process_record(f"node/{node}/ztunnel")
            assert ztunnel is not None and ztunnel.is_alive(), f"the ztunnel on {node} died"


# --- the demo ---


def test_the_bookinfo_demo_answers_from_the_host_through_the_mesh(tmp_path: Path):
    mesh = Mesh.up(tmp_path, None)
    try:
        url = mesh.frontend_url()
        # Pods count as ready once their process runs (no readiness probes): wait for the apps to listen.
        servers = [log for log in (mesh.run_dir / "logs" / "pods" / "bookinfo").glob("*/*.log") if "trafficgen" not in log.name]
        assert len(servers) == 6, servers
        wait_until(
            lambda: all("listening on" in log.read_text() for log in servers),
            timeout=10, what=lambda: f"not every bookinfo app listens: {[str(log) for log in servers if 'listening on' not in log.read_text()]}",
        )

        def fetch() -> str | None:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return response.read().decode()
            except OSError:
                return None

        pages = [fetch() for _ in range(10)]  # reviews v2/v3 call ratings; ten pages reach one of them all but surely
        assert None not in pages, f"the frontend at {url} (printed by `up`) did not always answer 200"
        for page in pages:
            assert "<h2>Book details</h2><ul>" in page and "details from details-v1-" in page
            assert re.search(r"reviews v[123] from reviews-v[123]-", page)

        def edges(**labels: str) -> set[tuple[str, str]]:
            """(source principal, destination workload) of the connections the ztunnels received."""
            return {
                (series["source_principal"], series["destination_workload"])
                for node in NODES
                for series, _ in connections_opened_series(mesh.metrics_url(node), reporter="destination", **labels)
            }

        sa = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-"
        wanted = {(f"{sa}frontend", "details-v1"), (f"{sa}reviews", "ratings-v1")}
        meshed = wait_until(
            lambda: (found := edges(connection_security_policy="mutual_tls")) >= wanted and found,
            timeout=5, what=lambda: f"mutual_tls connections between the bookinfo workloads are missing: {edges(connection_security_policy='mutual_tls')}",
        )
        assert any(principal == f"{sa}frontend" and workload.startswith("reviews-v") for principal, workload in meshed)
        # The host is outside the mesh: its requests reach the frontend through ztunnel's plaintext inbound.
        assert ("unknown", "frontend-v1") in edges(connection_security_policy="unknown")
    finally:
        mesh.stop()
