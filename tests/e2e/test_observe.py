"""`ambientctl observe` on a one-machine mesh, as a user runs it.

Namespace `wp-demo` (manifests/waypoint/app.yaml): a client pod on node-1, a `server` Service
over two pods on node-2. First L4 AuthorizationPolicies (manifests/observe/l4-*.yaml) let the
client in and then deny it: `observe -o json` shows each connection with the verdict, the
policy that decided and both identities, and `--verdict denied` shows only denials. Then a
waypoint (`waypoint apply --enroll-namespace`) with an L7 policy denying POST: the events
carry the HTTP method, path and status. Last, `observe --follow` prints a new request as it
happens. Needs root; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambientctl.runtime.netns import pod_netns
from .test_one_machine_mesh import REPO, Mesh, _skip_reason, ambientctl, wait_until

MANIFESTS = Path(__file__).resolve().parent / "manifests"
NAMESPACE = "wp-demo"
CLIENT = "spiffe://cluster.local/ns/wp-demo/sa/client"
SERVER = "spiffe://cluster.local/ns/wp-demo/sa/server"
POLICY_SECONDS = 10.0  # from `apply` to the proxies deciding with the new policy

pytestmark = [pytest.mark.root, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]

# Runs inside the client pod's netns: one request, prints its status (0: the connection failed).
_CLIENT = """
import sys, urllib.request, urllib.error
url, method = sys.argv[1], sys.argv[2]
try:
    with urllib.request.urlopen(urllib.request.Request(url, method=method, data=b"x" if method == "POST" else None), timeout=3) as response:
        print(response.status)
except urllib.error.HTTPError as exc:
    print(exc.code)
except OSError:
    print(0)
"""


def request(mesh: Mesh, path: str, method: str = "GET") -> int:
    url = f"http://{mesh.vip(NAMESPACE, 'server')}:80{path}"
    result = subprocess.run(
        ["ip", "netns", "exec", pod_netns(NAMESPACE, "client"), sys.executable, "-c", _CLIENT, url, method],
        capture_output=True, text=True, timeout=15,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def observe(mesh: Mesh, *args: str) -> list[dict]:
    result = ambientctl(mesh.run_dir, "observe", "-o", "json", "--last", "1000", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def apply(mesh: Mesh, manifest: str, verb: str = "apply") -> None:
    result = ambientctl(mesh.run_dir, verb, "-f", str(MANIFESTS / manifest))
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    mesh = Mesh.up(tmp_path_factory.mktemp("observe-mesh"), MANIFESTS / "waypoint" / "app.yaml")
    try:
        yield mesh
    finally:
        mesh.stop()


def test_l4_flows_show_the_verdict_the_deciding_policy_and_identities(mesh: Mesh):
    apply(mesh, "observe/l4-allow-client.yaml")
    try:

        def allowed_by_policy() -> dict | None:
            assert request(mesh, "/l4") == 200
            return next((e for e in observe(mesh, "--namespace", NAMESPACE) if e["policy"] == "wp-demo/allow-client"), None)

        allowed = wait_until(allowed_by_policy, timeout=POLICY_SECONDS, what="no flow allowed by wp-demo/allow-client")
        assert (allowed["reporter"], allowed["verdict"], allowed["proxy"]) == ("destination", "allowed", "node-2")
        assert (allowed["source"]["workload"], allowed["source"]["identity"]) == ("client", CLIENT)
        assert allowed["destination"]["workload"] in {"server-v1", "server-v2"}
        assert allowed["destination"]["identity"] == SERVER
        assert allowed["bytes_sent"] > 0 and allowed["bytes_received"] > 0  # an HTTP request and its answer

        apply(mesh, "observe/l4-deny-client.yaml")

        def denied_by_policy() -> dict | None:
            request(mesh, "/l4")  # refused once the policy arrived
            return next((e for e in observe(mesh, "--verdict", "denied") if e["policy"] == "wp-demo/deny-client"), None)

        denied = wait_until(denied_by_policy, timeout=POLICY_SECONDS, what="no flow denied by wp-demo/deny-client")
        assert (denied["reporter"], denied["flags"], denied["source"]["identity"]) == ("destination", "DENY", CLIENT)
        assert request(mesh, "/l4") == 0
        only_denied = observe(mesh, "--verdict", "denied")
        assert only_denied and {e["verdict"] for e in only_denied} == {"denied"}
        assert any(e["verdict"] == "allowed" for e in observe(mesh))  # the filter hid them
    finally:
        apply(mesh, "observe/l4-deny-client.yaml", "delete")
        apply(mesh, "observe/l4-allow-client.yaml", "delete")


def test_waypoint_flows_carry_the_http_method_path_and_status(mesh: Mesh):
    applied = ambientctl(mesh.run_dir, "waypoint", "apply", "-n", NAMESPACE, "--enroll-namespace")
    assert applied.returncode == 0, applied.stderr
    apply(mesh, "observe/l7-deny-post.yaml")
    wait_until(
        lambda: request(mesh, "/observe-post", "POST") == 403 and request(mesh, "/observe-get") == 200,
        timeout=60, what="the waypoint did not start denying POST",
    )
    events = [e for e in observe(mesh, "--pod", "wp-demo/client") if e["reporter"] == "waypoint"]
    get = next(e for e in events if e["http"]["path"] == "/observe-get")
    post = next(e for e in events if e["http"]["path"] == "/observe-post" and e["http"]["status"] == 403)
    assert (get["proxy"], get["verdict"], get["http"]["method"], get["http"]["status"]) == ("wp-demo/waypoint", "allowed", "GET", 200)
    assert get["destination"]["service"] == "server.wp-demo.svc.cluster.local"
    assert (post["verdict"], post["policy"], post["http"]["method"]) == ("denied", "wp-demo/deny-post", "POST")
    assert post["source"]["identity"] == CLIENT
    denied = observe(mesh, "--verdict", "denied", "--namespace", NAMESPACE)
    assert any(e["http"] and e["http"]["path"] == "/observe-post" for e in denied)
    assert all(e["verdict"] == "denied" for e in denied)
    human = ambientctl(mesh.run_dir, "observe", "--verdict", "denied", "--pod", "wp-demo/client")
    assert human.returncode == 0, human.stderr
    line = next(line for line in human.stdout.splitlines() if "/observe-post" in line)
    assert "wp-demo/client -> " in line and " DENIED policy=wp-demo/deny-post (waypoint wp-demo/waypoint) http POST " in line


def test_follow_prints_new_flows_as_they_happen(mesh: Mesh):
    follower = subprocess.Popen(
        [sys.executable, "-m", "ambientctl", "observe", "--follow", "-o", "json", "--pod", "wp-demo/client", "--run-dir", str(mesh.run_dir)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True)
    reader.start()
    try:
        time.sleep(1.0)  # the follower connects to every proxy first
        path = f"/follow-{time.monotonic_ns()}"
        assert request(mesh, path) == 200
        deadline = time.monotonic() + 15
        seen = None
        while seen is None and time.monotonic() < deadline:
            try:
                event = json.loads(lines.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
            if event["http"] and event["http"]["path"] == path:
                seen = event
        assert seen is not None, f"the follower did not print {path}; stderr: {follower.stderr.read() if follower.poll() is not None else ''}"
        assert (seen["reporter"], seen["http"]["status"]) == ("waypoint", 200)
    finally:
        follower.send_signal(signal.SIGINT)
        try:
            follower.wait(timeout=10)
        except subprocess.TimeoutExpired:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0, follower.stderr.read()
