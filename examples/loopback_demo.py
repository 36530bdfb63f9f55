"""A two-node mesh on this machine's loopback: two real `ztunnel` processes carry an HTTP
request from a client workload to a server workload over HBONE with mutual TLS.

    client (127.0.0.11) --SOCKS5--> ztunnel node-a (127.0.0.21)
        == HBONE: HTTP/2 CONNECT over mTLS, SPIFFE ids ==>
    ztunnel node-b (inbound on 127.0.0.12:15008) --> server app (127.0.0.12:8080)

Run with `./scripts/demo` (or `.venv/bin/python examples/loopback_demo.py [--once]`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ztunnel.devsetup import DevNode, DevWorkload, write_ca, write_node_config, write_state  # noqa: E402

CLIENT = DevWorkload("client", "127.0.0.11", "node-a")
SERVER = DevWorkload("server", "127.0.0.12", "node-b")
NODE_A = DevNode("node-a", "127.0.0.21")
NODE_B = DevNode("node-b", "127.0.0.22")
APP_PORT = 8080


def wait_ready(node: DevNode, deadline: float) -> None:
    url = f"http://{node.address}:15021/healthz/ready"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: ztunnel {node.name} did not become ready ({url})")
        time.sleep(0.1)


def metric_lines(node: DevNode, name: str) -> list[str]:
    with urllib.request.urlopen(f"http://{node.address}:15020/metrics", timeout=5) as resp:
        return [line for line in resp.read().decode().splitlines() if line.startswith(name)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true", help="send one request, show the result and exit")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mesh-demo-"))
    write_ca(work)
    write_state(work / "state.yaml", [CLIENT, SERVER])
    repo = Path(__file__).resolve().parents[1]
    procs: list[subprocess.Popen] = []
    try:
        app_dir = work / "www"
        app_dir.mkdir()
        (app_dir / "index.html").write_text("hello from the server workload, through the mesh\n")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "http.server", str(APP_PORT), "--bind", SERVER.ip, "--directory", str(app_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        for node in (NODE_A, NODE_B):
            config = write_node_config(work, node)
            log = open(work / f"ztunnel-{node.name}.log", "w")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "ztunnel", "--config", str(config)], cwd=repo, stdout=log, stderr=subprocess.STDOUT
            ))
        deadline = time.monotonic() + 20
        for node in (NODE_A, NODE_B):
            wait_ready(node, deadline)
        print(f"demo: two ztunnels are up (files and logs in {work})")

        curl = ["curl", "-sS", "--max-time", "10", "--interface", CLIENT.ip, "--socks5", f"{NODE_A.address}:15080",
                f"http://{SERVER.ip}:{APP_PORT}/"]
        print("demo: $", " ".join(curl))
        for _ in range(50):  # the app may still be starting
            result = subprocess.run(curl, capture_output=True, text=True)
            if result.returncode == 0:
                break
            time.sleep(0.1)
        print(result.stdout or result.stderr, end="")
        if result.returncode != 0:
            return 1
        time.sleep(0.5)
        for node in (NODE_A, NODE_B):
            print(f"\n--- ztunnel {node.name}: http://{node.address}:15020/metrics")
            for line in metric_lines(node, "istio_tcp_connections_closed_total"):
                labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.rindex("}")].split('",'))
                keep = ("reporter", "source_principal", "destination_principal", "connection_security_policy")
                print("istio_tcp_connections_closed_total", {k: labels[k].strip('"') for k in keep}, line.rsplit(" ", 1)[1])
        access = [json.loads(l) for l in (work / "ztunnel-node-b.log").read_text().splitlines() if '"access"' in l]
        if access:
            print("\n--- node-b access log:", json.dumps(access[-1], sort_keys=True))
        if args.once:
            return 0
        print(f"\ndemo: running. Try:  {' '.join(curl)}\n"
              f"      admin: curl http://{NODE_B.address}:15000/config_dump   Ctrl-C to stop")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def _interrupt(signum, frame):  # SIGTERM stops the demo like Ctrl-C: children are cleaned up
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
