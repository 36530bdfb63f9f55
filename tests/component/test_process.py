"""The ztunnel and the demo as a user runs them: real processes, real signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ztunnel.devsetup import DevNode, DevWorkload, write_ca, write_node_config, write_state

REPO = Path(__file__).resolve().parents[2]


def test_demo_carries_a_request_over_mtls():
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "loopback_demo.py"), "--once"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hello from the server workload, through the mesh" in result.stdout
    assert "'connection_security_policy': 'mutual_tls'" in result.stdout


def test_sigterm_drains_and_exits_cleanly(tmp_path: Path):
    write_ca(tmp_path)
    write_state(tmp_path / "state.yaml", [DevWorkload("server", "127.0.66.12", "node-b")])
    config = write_node_config(tmp_path, DevNode("node-b", "127.0.66.2"), drain_seconds=1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ztunnel", "--config", str(config)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen("http://127.0.66.2:15021/healthz/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "ztunnel never became ready"
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "drain started" in output and "ztunnel stopped" in output


def test_bad_config_is_a_clear_error(tmp_path: Path):
    (tmp_path / "bad.yaml").write_text("node: a\naddress: not-an-ip\nstate: s.yaml\nca: {cert: c, key: k}\n")
    result = subprocess.run(
        [sys.executable, "-m", "ztunnel", "--config", str(tmp_path / "bad.yaml")], cwd=REPO,
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "address: 'not-an-ip' is not an IP address" in result.stderr
