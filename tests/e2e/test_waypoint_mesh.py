"""A waypoint in the one-machine mesh, as a user runs it: `ambientctl up`, then `ambientctl waypoint apply`.

Namespace `wp-demo` (manifests/waypoint/app.yaml) is labelled ambient and holds a client pod
and a `server` Service over two pods answering their version (v1, v2). `waypoint apply
--enroll-namespace` starts a waypoint and binds the namespace's Services to it; then HTTP from
the client pod to the Service VIP goes through the waypoint (its metrics count it), a
VirtualService header route and a targetRef AuthorizationPolicy take effect within seconds.
Needs root; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ambientctl.runtime.netns import pod_netns
from .test_one_machine_mesh import Mesh, _skip_reason, ambientctl, wait_until

MANIFESTS = Path(__file__).resolve().parent / "manifests" / "waypoint"
NAMESPACE = "wp-demo"
SERVICE_PORT = 80
CONFIG_SECONDS = 5.0  # the budget from `apply` to the waypoint honouring it

pytestmark = [pytest.mark.root, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]

# Runs inside the client pod's netns: one request, prints {"status", "body"}.
_CLIENT = """
import json, sys, urllib.request, urllib.error
url, method, headers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
request = urllib.request.Request(url, method=method, headers=headers, data=b"x" if method == "POST" else None)
try:
    with urllib.request.urlopen(request, timeout=5) as response:
        print(json.dumps({"status": response.status, "body": response.read().decode()}))
except urllib.error.HTTPError as exc:
    print(json.dumps({"status": exc.code, "body": exc.read().decode()}))
"""


def request(mesh: Mesh, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, str]:
    url = f"http://{mesh.vip(NAMESPACE, 'server')}:{SERVICE_PORT}/"
    result = subprocess.run(
        ["ip", "netns", "exec", pod_netns(NAMESPACE, "client"), sys.executable, "-c", _CLIENT, url, method, json.dumps(headers or {})],
        capture_output=True, text=True, timeout=15,
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    return reply["status"], reply["body"]


def waypoint_pod(mesh: Mesh) -> dict:
    pods = yaml.safe_load(ambientctl(mesh.run_dir, "get", "pods", "-n", NAMESPACE, "-o", "yaml").stdout)["items"]
    return next(pod for pod in pods if pod["metadata"]["labels"].get("gateway.networking.k8s.io/gateway-name") == "waypoint")


def waypoint_requests(metrics_url: str) -> float:
    """istio_requests_total{reporter="waypoint"} summed over every label set."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "istio_requests_total" and sample.labels.get("reporter") == "waypoint"
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    mesh = Mesh.up(tmp_path_factory.mktemp("waypoint-mesh"), MANIFESTS / "app.yaml")
    try:
        applied = ambientctl(mesh.run_dir, "waypoint", "apply", "-n", NAMESPACE, "--enroll-namespace")
        assert applied.returncode == 0, applied.stderr
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def metrics_url(mesh: Mesh) -> str:
    """The waypoint's metrics URL, once it is ready and serves the bound `server` Service."""
    pod = wait_until(lambda: waypoint_pod(mesh).get("status", {}).get("podIP") and waypoint_pod(mesh), timeout=20, what="waypoint pod scheduled")
    ip = pod["status"]["podIP"]
    log = mesh.container_log(NAMESPACE, pod["metadata"]["name"], "waypoint")

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://{ip}:15021/healthz/ready", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    wait_until(ready, timeout=30, what=lambda: f"the waypoint did not become ready; its log:\n{log.read_text() if log.exists() else '(none)'}")
    url = f"http://{ip}:15020/metrics"

    def served_by_waypoint() -> bool:
        before = waypoint_requests(url)
        return request(mesh)[0] == 200 and waypoint_requests(url) > before

    wait_until(served_by_waypoint, timeout=CONFIG_SECONDS * 2, what="requests to the server VIP were not counted by the waypoint")
    return url


def test_waypoint_list_shows_the_running_waypoint(mesh: Mesh, metrics_url: str):
    listing = ambientctl(mesh.run_dir, "waypoint", "list", "-n", NAMESPACE)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split("\n")[1].split() == [NAMESPACE, "waypoint", "1/1", "service"]


def test_requests_to_the_service_vip_go_through_the_waypoint(mesh: Mesh, metrics_url: str):
    before = waypoint_requests(metrics_url)
    replies = [request(mesh) for _ in range(6)]
    assert all(status == 200 for status, _ in replies), replies
    assert {body for _, body in replies} == {"v1", "v2"}  # both versions behind the one VIP
    assert waypoint_requests(metrics_url) >= before + 6


def test_a_virtualservice_header_route_is_honoured_within_seconds(mesh: Mesh, metrics_url: str):
    applied = ambientctl(mesh.run_dir, "apply", "-f", str(MANIFESTS / "routes.yaml"))
    assert applied.returncode == 0, applied.stderr

    def routed() -> bool:
        return (
            all(request(mesh, headers={"end-user": "jason"}) == (200, "v2") for _ in range(3))
            and all(request(mesh) == (200, "v1") for _ in range(3))
        )

    wait_until(routed, timeout=CONFIG_SECONDS, what="jason -> v2, others -> v1 was not honoured")


def test_an_authorization_policy_on_the_waypoint_denies_posts(mesh: Mesh, metrics_url: str):
    assert request(mesh, "POST")[0] == 200
    applied = ambientctl(mesh.run_dir, "apply", "-f", str(MANIFESTS / "get-only.yaml"))
    assert applied.returncode == 0, applied.stderr
    status, body = wait_until(lambda: (reply := request(mesh, "POST"))[0] == 403 and reply, timeout=CONFIG_SECONDS, what="POST was not denied")
    assert body == "RBAC: access denied"
    assert request(mesh, "GET")[0] == 200
