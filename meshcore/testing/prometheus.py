"""A real Prometheus (Debian `prometheus`) for tests: scrapes given targets every second.

    skip = prometheus_skip_reason()          # None, or why tests cannot run one
    with start_prometheus(["198.19.0.2:15020"], folder=tmp_path) as prometheus:
        prometheus.wait_for_first_scrapes(timeout=20)
        prometheus.query('sum(rate(istio_requests_total[10s]))')

The generated config has one job (`mesh`) with a static target list, scrape interval 1 s,
and the TSDB in `folder`; Prometheus listens on a free loopback port. Stopping it ends the
process; the folder stays for the test's tmp_path to remove.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meshcore.testing.procs import ManagedProcess, ProcessError, free_port, start_process, wait_for_http_ok

SCRAPE_INTERVAL_SECONDS = 1.0
JOB = "mesh"


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def prometheus_skip_reason() -> str | None:
    """Why a test cannot start Prometheus here, or None."""
    if prometheus_binary() is None:
        return "needs the `prometheus` binary (Debian package prometheus; scripts/setup.sh installs it)"
    return None


def scrape_config(targets: Sequence[str]) -> dict[str, Any]:
    """Prometheus' configuration: scrape `targets` ("host:port", path /metrics) every second."""
    interval = f"{SCRAPE_INTERVAL_SECONDS:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": JOB, "scrape_timeout": interval, "static_configs": [{"targets": list(targets)}]},
        ],
    }


@dataclass(frozen=True, kw_only=True)
class RunningPrometheus:
    process: ManagedProcess
    url: str  # http://127.0.0.1:PORT

    def query(self, promql: str, *, at: float | None = None) -> list[dict[str, Any]]:
        """The result of an instant query (a list of {"metric", "value"}) evaluated now or at
        `at` (Unix time); raises ProcessError on an error answer."""
        params = {"query": promql} if at is None else {"query": promql, "time": f"{at:.3f}"}
        return self._api("query", params)["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        """Values of `label` on series matching `match` (Grafana's `label_values(match, label)`)."""
        return self._api(f"label/{urllib.parse.quote(label)}/values", {"match[]": match})

    def targets(self) -> list[dict[str, Any]]:
        return self._api("targets", {})["activeTargets"]

    def wait_for_first_scrapes(self, *, timeout: float) -> list[dict[str, Any]]:
        """Wait until every target was scraped (up or down) and return the targets.

        Prometheus applies new targets only every 5 s, so the first scrape comes that late.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.process.check_running()
            targets = self.targets()
            if targets and all(target["health"] != "unknown" for target in targets):
                return targets
            if time.monotonic() > deadline:
                raise ProcessError(f"Prometheus did not scrape every target within {timeout:g}s: {targets}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> RunningPrometheus:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _api(self, path: str, params: Mapping[str, str]) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise ProcessError(f"Prometheus {path} {dict(params)} failed: {body.get('errorType')}: {body.get('error')}")
        return body["data"]


def start_prometheus(targets: Sequence[str], *, folder: Path, timeout: float = 20.0) -> RunningPrometheus:
    """Start Prometheus scraping `targets`; returns once it answers ready. Raises ProcessError."""
    binary = prometheus_binary()
    if binary is None:
        raise ProcessError(prometheus_skip_reason() or "no prometheus binary")
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(targets), sort_keys=False))
    port = free_port()
    process = start_process(
        "prometheus",
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        log_dir=folder,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http_ok(f"{url}/-/ready", timeout=timeout, process=process)
    except BaseException:
        process.stop()
        raise
    return RunningPrometheus(process=process, url=url)
