"""A waypoint in the one-machine mesh, as a user runs it: `ambientctl up`, then `ambientctl waypoint apply`.

Namespace `wp-demo` (manifests/waypoint/app.yaml) is labelled ambient and holds a client pod
and a `server` Service over two pods answering their version (v1, v2). `waypoint apply
--enroll-namespace` starts a waypoint and binds the namespace's Services to it; then HTTP from
the client pod to the Service VIP goes through the waypoint (its metrics count it), a
VirtualService header route and a targetRef AuthorizationPolicy take effect within seconds, and
the VirtualService's traffic management is what the client sees: a 90/10 canary split, retries
hiding a flaky backend, a timeout answered 504, injected aborts and delays, and a route change
reaching live traffic within a second. Each test applies the VirtualService it needs (they
replace one another). Needs root; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
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
LIVE_CHANGE_SECONDS = 1.0  # the budget from `apply` returning to live traffic showing the change

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


# Runs inside the client pod's netns: `count` GETs, in a row on each of `connections` keep-alive
# connections (in parallel: one request through the mesh takes ~40 ms), prints
# [[status, body, seconds], ...].
_CLIENT_IN_A_ROW = """
import http.client, json, sys, threading, time
host, port, path, count, connections = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
replies = []
def in_a_row(share):
    connection = http.client.HTTPConnection(host, port, timeout=5)
    for _ in range(share):
        started = time.monotonic()
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read().decode()
        replies.append([response.status, body, time.monotonic() - started])
threads = [threading.Thread(target=in_a_row, args=(count // connections + (i < count % connections),)) for i in range(connections)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(replies))
"""

# Runs inside the client pod's netns until stopped: GETs back to back on one keep-alive
# connection, one line per reply: when it arrived (monotonic, shared with the host), status, body.
_CLIENT_LOOP = """
import http.client, sys, time
host, port = sys.argv[1], int(sys.argv[2])
connection = http.client.HTTPConnection(host, port, timeout=5)
while True:
    connection.request("GET", "/")
    response = connection.getresponse()
    body = response.read().decode()
    print(time.monotonic(), response.status, body, flush=True)
"""


def requests_in_a_row(mesh: Mesh, path: str = "/", count: int = 1, connections: int = 1) -> list[tuple[int, str, float]]:
    """(status, body, seconds) of `count` GETs of `path` from the client pod to the server VIP."""
    result = subprocess.run(
        ["ip", "netns", "exec", pod_netns(NAMESPACE, "client"), sys.executable, "-c", _CLIENT_IN_A_ROW,
         mesh.vip(NAMESPACE, "server"), str(SERVICE_PORT), path, str(count), str(connections)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [(status, body, seconds) for status, body, seconds in json.loads(result.stdout)]


def apply(mesh: Mesh, manifest: str) -> float:
    """`ambientctl apply -f manifests/waypoint/<manifest>`; returns when (monotonic) it returned."""
    applied = ambientctl(mesh.run_dir, "apply", "-f", str(MANIFESTS / manifest))
    assert applied.returncode == 0, applied.stderr
    return time.monotonic()


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
    # The default balancer (LEAST_REQUEST) breaks ties at random, so enough requests that
    # missing a version by chance is ~2^-39, not the 1/32 that six requests gave.
    replies = requests_in_a_row(mesh, count=40, connections=4)
    assert all(status == 200 for status, _, _ in replies), replies
    assert {body for _, body, _ in replies} == {"v1", "v2"}  # both versions behind the one VIP
    assert waypoint_requests(metrics_url) >= before + 40


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


def test_a_90_10_canary_splits_2000_requests_within_3_points(mesh: Mesh, metrics_url: str):
    apply(mesh, "canary.yaml")
    wait_until(
        lambda: {body for _, body, _ in requests_in_a_row(mesh, count=40)} == {"v1", "v2"},
        timeout=CONFIG_SECONDS, what="the canary did not send requests to both v1 and v2",
    )
    replies = requests_in_a_row(mesh, count=2000, connections=20)
    assert {status for status, _, _ in replies} == {200}
    share_v1 = sum(body == "v1" for _, body, _ in replies) / len(replies)
    assert abs(share_v1 - 0.90) <= 0.03, f"{share_v1:.1%} of 2000 requests went to v1, not 90% +/- 3 points"


def test_retries_turn_a_flaky_backends_503s_into_200s(mesh: Mesh, metrics_url: str):
    apply(mesh, "no-retries.yaml")
    wait_until(
        lambda: [status for status, _, _ in requests_in_a_row(mesh, "/flaky", count=4)].count(503) == 2,
        timeout=CONFIG_SECONDS, what="without retries, every other request to /flaky was not answered 503",
    )
    apply(mesh, "retries.yaml")
    wait_until(
        lambda: all(status == 200 for status, _, _ in requests_in_a_row(mesh, "/flaky", count=6)),
        timeout=CONFIG_SECONDS, what="with retries, requests to /flaky still fail",
    )
    assert [(status, body) for status, body, _ in requests_in_a_row(mesh, "/flaky", count=20)] == [(200, "v1")] * 20


def test_a_request_slower_than_the_route_timeout_is_answered_504(mesh: Mesh, metrics_url: str):
    [(status, _, seconds)] = requests_in_a_row(mesh, "/slow")
    assert status == 200 and seconds >= 2.0  # without a timeout, /slow is answered late
    apply(mesh, "timeout.yaml")
    [(status, _, seconds)] = wait_until(
        lambda: (replies := requests_in_a_row(mesh, "/slow"))[0][0] == 504 and replies,
        timeout=CONFIG_SECONDS + 2.0, what="a request to /slow was not answered 504 under a 0.5 s timeout",
    )
    assert 0.5 <= seconds < 1.0, f"the 504 came after {seconds:.2f} s, not once the 0.5 s timeout passed"
    assert requests_in_a_row(mesh)[0][0] == 200  # fast requests are untouched


def test_an_injected_abort_answers_418_without_reaching_the_backend(mesh: Mesh, metrics_url: str):
    apply(mesh, "faults.yaml")
    wait_until(
        lambda: requests_in_a_row(mesh, "/abort")[0][0] == 418,
        timeout=CONFIG_SECONDS, what="the injected abort did not answer 418",
    )
    assert {status for status, _, _ in requests_in_a_row(mesh, "/abort", count=10)} == {418}
    assert requests_in_a_row(mesh, "/")[0][:2] in {(200, "v1"), (200, "v2")}  # other paths are untouched


def test_an_injected_delay_holds_requests_for_its_duration(mesh: Mesh, metrics_url: str):
    apply(mesh, "faults.yaml")
    [(status, body, seconds)] = wait_until(
        lambda: (replies := requests_in_a_row(mesh, "/delay"))[0][2] >= 1.0 and replies,
        timeout=CONFIG_SECONDS + 1.0, what="the injected 1 s delay was not applied to /delay",
    )
    assert status == 200 and body in {"v1", "v2"}
    assert seconds < 1.5, f"a 1 s injected delay took {seconds:.2f} s"
    assert requests_in_a_row(mesh, "/")[0][2] < 0.5  # other paths are not delayed


def test_a_route_change_reaches_live_traffic_within_a_second(mesh: Mesh, metrics_url: str, tmp_path: Path):
    apply(mesh, "routes.yaml")  # everyone but jason to v1
    output = tmp_path / "loop.out"

    def replies() -> list[tuple[float, str]]:
        rows = [line.split() for line in output.read_text().splitlines()]
        return [(float(arrived), f"{status} {body}") for arrived, status, body in rows if body]

    with output.open("wb") as sink:
        loop = subprocess.Popen(
            ["ip", "netns", "exec", pod_netns(NAMESPACE, "client"), sys.executable, "-c", _CLIENT_LOOP,
             mesh.vip(NAMESPACE, "server"), str(SERVICE_PORT)],
            stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: len(answers := replies()) >= 20 and {reply for _, reply in answers[-10:]} == {"200 v1"},
            timeout=CONFIG_SECONDS, what=lambda: f"live traffic is not all going to v1: {output.read_text()[-500:]}",
        )
        applied_at = apply(mesh, "v2-only.yaml")
        first_v2 = wait_until(
            lambda: next((arrived for arrived, reply in replies() if arrived >= applied_at and reply == "200 v2"), None),
            timeout=CONFIG_SECONDS, what="live traffic never went to v2",
        )
    finally:
        loop.terminate()
        loop.wait(timeout=10)
    assert first_v2 - applied_at <= LIVE_CHANGE_SECONDS, f"the first v2 reply came {first_v2 - applied_at:.2f} s after `apply` returned"
    assert all(reply in {"200 v1", "200 v2"} for _, reply in replies()), "live traffic saw errors while the route changed"
