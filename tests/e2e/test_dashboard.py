"""`ambientctl dashboard` opened in headless Chromium (Debian `chromium`), as a user sees it.

With the bookinfo demo up (its trafficgen requests the frontend twice a second) and a waypoint
for the bookinfo namespace, the dashboard runs as its own process, scraping the proxies. The
page loads without a console message, draws the demo's services and the mutual-TLS edges
between them with request rates, lists the namespace, the ready waypoint and the certificates,
and a screenshot of it is a real picture. Pointed at a Prometheus that does not answer, or with
a ztunnel that stops answering, it says so plainly and keeps showing the rest. With no mesh
running, the page says that.

The mesh tests need root (skipped with the reason otherwise, like the other e2e tests); every
test needs the chromium binary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import urllib.request
import zlib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from .test_one_machine_mesh import Mesh, _skip_reason, ambientctl, wait_until

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium")
WINDOW = (1400, 900)
# Virtual time the page gets before the DOM is dumped: its first fetch and two more polls.
VIRTUAL_TIME_MS = 8000
DEMO_SERVICES = {"bookinfo/frontend", "bookinfo/details", "bookinfo/reviews", "bookinfo/ratings"}
TRAFFICGEN_RPS = 2.0  # deploy/examples/bookinfo/trafficgen.yaml: RATE

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian package chromium) to load the page headless")
needs_mesh = [pytest.mark.root, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


# --- the dashboard process ---


class Dashboard:
    """`ambientctl dashboard --port 0` as a subprocess; `url` is what it printed."""

    def __init__(self, run_dir: Path, folder: Path, *options: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "dashboard.log"
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ambientctl", "dashboard", "--run-dir", str(run_dir), "--port", "0", *options],
                cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
            )
        try:
            found = wait_until(
                lambda: re.search(r"^dashboard: (http://\S+/) ", self.log.read_text(), re.MULTILINE) or self.process.poll() is not None,
                timeout=20, what=lambda: f"the dashboard did not print its URL:\n{self.log.read_text()}",
            )
            assert found is not True and self.process.poll() is None, f"the dashboard exited:\n{self.log.read_text()}"
        except BaseException:
            self.stop()
            raise
        self.url: str = found.group(1)

    def snapshot(self) -> dict:
        with urllib.request.urlopen(f"{self.url}api/snapshot", timeout=5) as response:
            return json.load(response)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --- the browser ---


class Elements(HTMLParser):
    """Every element's tag and attributes, in document order."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, {name: value or "" for name, value in attrs}))

    def with_attribute(self, name: str) -> list[dict[str, str]]:
        return [attrs for _, attrs in self.found if name in attrs]


def chromium(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "chromium-profile"  # inside tmp_path: nothing left in the home folder
    return subprocess.run(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--virtual-time-budget={VIRTUAL_TIME_MS}", *arguments],
        capture_output=True, text=True, timeout=120,
    )


def load_page(url: str, tmp_path: Path) -> tuple[Elements, list[str]]:
    """The page's DOM after it ran for VIRTUAL_TIME_MS, and every console line it printed."""
    result = chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", url)
    assert result.returncode == 0, result.stderr
    # Chromium logs every console message (log, warn, error, uncaught exceptions, failed
    # loads) as INFO:CONSOLE; the page itself never logs, so any such line is a fault.
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return Elements(result.stdout), console


def png_pixels(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """Width, height, channels and unfiltered rows of an 8-bit RGB(A) PNG, as Chromium writes them."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    offset, idat = 8, b""
    width = height = depth = colour = 0
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    assert depth == 8 and colour in (2, 6), f"unexpected PNG format: depth {depth}, colour type {colour}"
    channels = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * channels
    previous, rows = bytearray(stride), []
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, up_left = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + ((left + up) >> 1)) & 0xFF
            elif kind == 4:
                guess = left + up - up_left
                nearest = min((abs(guess - left), 0, left), (abs(guess - up), 1, up), (abs(guess - up_left), 2, up_left))[2]
                line[i] = (line[i] + nearest) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, channels, rows


# --- with no mesh ---


@needs_chromium
def test_with_no_mesh_running_the_page_loads_and_says_so(tmp_path: Path):
    dashboard = Dashboard(tmp_path / "run", tmp_path)
    try:
        page, console = load_page(dashboard.url, tmp_path)
    finally:
        dashboard.stop()

    assert console == []
    (body,) = [attrs for tag, attrs in page.found if tag == "body"]
    assert body == {"data-state": "loaded", "data-mesh-running": "false"}
    assert [banner["data-problem"] for banner in page.with_attribute("data-problem")] == [
        f"No mesh is running (run dir {tmp_path / 'run'}): start one with `ambientctl up`."
    ]
    assert page.with_attribute("data-node") == []


# --- with the demo mesh ---


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    mesh = Mesh.up(tmp_path_factory.mktemp("dashboard-mesh"), None)
    try:
        applied = ambientctl(mesh.run_dir, "waypoint", "apply", "-n", "bookinfo", "--enroll-namespace")
        assert applied.returncode == 0, applied.stderr
        yield mesh
    finally:
        mesh.stop()


def _demo_edges_seen(snapshot: dict) -> bool:
    edges = {(e["sourceName"], e["destinationName"]) for e in snapshot["graph"]["edges"] if "http" in e["protocols"]}
    return {("bookinfo/trafficgen", "bookinfo/frontend"), ("bookinfo/frontend-v1", "bookinfo/details")} <= edges


@pytest.fixture(scope="module")
def dashboard(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """The dashboard scraping the proxies, once it shows the waypoint's HTTP edges of the demo."""
    dashboard = Dashboard(mesh.run_dir, tmp_path_factory.mktemp("dashboard"))
    try:
        wait_until(
            lambda: _demo_edges_seen(dashboard.snapshot()), timeout=90,
            what=lambda: f"the dashboard never showed the demo's HTTP edges: {json.dumps(dashboard.snapshot()['graph']['edges'])}",
        )
        yield dashboard
    finally:
        dashboard.stop()


@needs_chromium
class TestWithTheDemoMesh:
    pytestmark = needs_mesh

    def test_the_page_draws_the_demo_services_and_their_mutual_tls_edges_without_console_messages(self, dashboard: Dashboard, tmp_path: Path):
        page, console = load_page(dashboard.url, tmp_path)

        assert console == []
        nodes = {(attrs["data-node"], attrs["data-kind"]) for attrs in page.with_attribute("data-node")}
        assert {(name, "service") for name in DEMO_SERVICES} <= nodes
        assert ("bookinfo/trafficgen", "workload") in nodes and ("bookinfo/frontend-v1", "workload") in nodes
        edges = {(attrs["data-source"], attrs["data-destination"]): attrs for attrs in page.with_attribute("data-protocols")}
        for pair in (("bookinfo/trafficgen", "bookinfo/frontend"), ("bookinfo/frontend-v1", "bookinfo/details"), ("bookinfo/frontend-v1", "bookinfo/reviews")):
            assert pair in edges, f"no edge {pair} among {sorted(edges)}"
            assert edges[pair]["data-mtls"] == "true" and "http" in edges[pair]["data-protocols"].split()
            assert float(edges[pair]["data-rps"]) > 0
        assert any(source.startswith("bookinfo/reviews-v") and destination == "bookinfo/ratings" for source, destination in edges)
        assert {attrs["data-service"] for attrs in page.with_attribute("data-service")} >= DEMO_SERVICES
        assert {attrs["data-series"] for attrs in page.with_attribute("data-series")} == {"rps", "successRate", "p99Ms", "tcpConnectionsPerSecond"}
        (waypoint,) = page.with_attribute("data-waypoint")
        assert (waypoint["data-waypoint"], waypoint["data-ready"]) == ("bookinfo/waypoint", "true")
        assert "bookinfo" in {attrs["data-namespace"] for attrs in page.with_attribute("data-namespace")}
        certificates = {attrs["data-certificate"]: attrs["data-state"] for attrs in page.with_attribute("data-certificate")}
        assert certificates.get("O=cluster.local") == "ok"
        assert certificates.get("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-frontend") == "ok"
        assert page.with_attribute("data-problem") == []

    def test_a_screenshot_of_the_page_is_a_real_picture(self, dashboard: Dashboard, tmp_path: Path):
        shot = tmp_path / "dashboard.png"

        result = chromium(tmp_path, f"--screenshot={shot}", dashboard.url)

        assert result.returncode == 0, result.stderr
        assert shot.stat().st_size > 20_000, f"{shot}: {shot.stat().st_size} bytes"
        width, height, channels, rows = png_pixels(shot.read_bytes())
        assert (width, height) == WINDOW
        # A blank or text-only page has a handful of colours; the graph, banners and tables many.
        colours = {row[x:x + 3] for row in rows[::4] for x in range(0, len(row), 4 * channels)}
        assert len(colours) > 50, f"{shot} looks blank: {len(colours)} colours"

    def test_the_api_reports_the_traffic_the_demo_sends(self, dashboard: Dashboard):
        wait_until(lambda: len(self._frontend(dashboard.snapshot())["history"]) >= 3, timeout=30, what="the frontend's history does not grow")
        snapshot = dashboard.snapshot()
        frontend = self._frontend(snapshot)

        assert TRAFFICGEN_RPS * 0.5 <= frontend["current"]["rps"] <= TRAFFICGEN_RPS * 1.5, frontend
        assert frontend["current"]["successRate"] == 1.0
        assert 0 < frontend["current"]["p50Ms"] <= frontend["current"]["p99Ms"]
        times = [point["t"] for point in frontend["history"]]
        assert times == sorted(times) and times[-1] - times[0] >= 9
        ztunnel_certificates = [c for c in snapshot["certificates"] if c["holder"].startswith("ztunnel ")]
        assert {c["holder"] for c in ztunnel_certificates} == {"ztunnel node-1", "ztunnel node-2"}
        assert all(0 < c["expiresInSeconds"] <= 24 * 3600 + 60 for c in ztunnel_certificates), ztunnel_certificates
        assert snapshot["mesh"]["running"] is True and snapshot["problems"] == []

    def test_an_unreachable_prometheus_is_a_banner_and_the_rest_still_shows(self, mesh: Mesh, tmp_path: Path):
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            closed_port = unused.getsockname()[1]  # nothing listens there once closed
        prometheus = f"http://127.0.0.1:{closed_port}"
        dashboard = Dashboard(mesh.run_dir, tmp_path, "--prometheus", prometheus)
        try:
            wait_until(lambda: dashboard.snapshot()["mesh"]["running"] is not None, timeout=30, what="the dashboard took no sample")
            page, console = load_page(dashboard.url, tmp_path)
        finally:
            dashboard.stop()

        assert console == []
        problems = [attrs["data-problem"] for attrs in page.with_attribute("data-problem")]
        assert any(problem.startswith(f"Prometheus at {prometheus} unreachable") for problem in problems), problems
        assert [attrs["data-waypoint"] for attrs in page.with_attribute("data-waypoint")] == ["bookinfo/waypoint"]
        assert "bookinfo" in {attrs["data-namespace"] for attrs in page.with_attribute("data-namespace")}
        assert "O=cluster.local" in {attrs["data-certificate"] for attrs in page.with_attribute("data-certificate")}

    def test_a_ztunnel_that_stops_answering_is_named_and_the_rest_keeps_updating(self, mesh: Mesh, dashboard: Dashboard):
        ztunnel = mesh.process_record("node/node-2/ztunnel")
        assert ztunnel is not None and ztunnel.is_alive()
        os.kill(ztunnel.pid, signal.SIGSTOP)
        try:
            stalled = wait_until(
                lambda: (snapshot := dashboard.snapshot()) and any("ztunnel node-2" in p for p in snapshot["problems"]) and snapshot,
                timeout=30, what=lambda: f"the dashboard did not name the stopped ztunnel: {dashboard.snapshot()['problems']}",
            )
        finally:
            os.kill(ztunnel.pid, signal.SIGCONT)

        assert all("node-1" not in problem for problem in stalled["problems"]), stalled["problems"]
        assert stalled["mesh"]["running"] is True and stalled["mesh"]["waypoints"][0]["name"] == "waypoint"
        assert "ztunnel node-1" in {c["holder"] for c in stalled["certificates"]}
        wait_until(
            lambda: not any("node-2" in problem for problem in dashboard.snapshot()["problems"]),
            timeout=30, what="the problem stayed after the ztunnel answered again",
        )

    @staticmethod
    def _frontend(snapshot: dict) -> dict:
        return next(s for s in snapshot["services"] if (s["namespace"], s["name"]) == ("bookinfo", "frontend"))
