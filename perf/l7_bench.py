"""L7 benchmark: our Python waypoint vs a real Envoy waypoint, HTTP/1.1 (wrk) and HTTP/2
(h2load) on loopback.

    sudo .venv/bin/python perf/l7_bench.py [--json] [--duration 5] [--quick]

Paths (all to the same nginx, see perf/README.md):
  direct          wrk -> nginx 127.0.0.1:18080
  ztunnel         wrk -> 127.0.0.2:8080 -> nftables REDIRECT -> ztunnel A outbound :15001
                  -> HBONE mTLS -> ztunnel B 127.0.0.2:15008 -> nginx 127.0.0.2:8080  (no L7)
  waypoint        wrk -> VIP 127.10.0.1:80 -> REDIRECT -> ztunnel A -> HBONE mTLS (authority
                  VIP:80) -> our waypoint 127.0.0.4:15008 (perf/waypoint_static.py: one route
                  `/` -> one cluster) -> HTTP/1.1 over TCP -> nginx 127.0.0.1:18080
  envoy-waypoint  wrk -> VIP 127.10.0.2:80 -> REDIRECT -> ztunnel A -> HBONE mTLS -> Envoy
                  127.0.0.5:15008 terminating HBONE -> TCP -> Envoy HTTP proxy 127.0.0.1:25080
                  (listener -> HCM, one route `/` -> cluster nginx) -> nginx 127.0.0.1:18080
Envoy needs two processes (one for HBONE, one for HTTP) where our waypoint does both; each
runs with --concurrency 1, like our single-threaded waypoint. Per path: wrk -c1 and -c32
(rps, p50, p99) and CPU per 1,000 requests during the c32 run, of every proxy on the path and
of the L7 proxy alone (our waypoint; both Envoys). Needs root for nftables. Every process it
starts and the nftables table are removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a checkout, installed or not

from meshcore.identity import Identity  # noqa: E402
from meshcore.testing.envoy import EnvoyProcess, hbone_server_bootstrap  # noqa: E402
from meshcore.testing.procs import cpu_seconds, start_process, wait_for_http_ok  # noqa: E402
from perf.l4_bench import (  # noqa: E402
    APP_PORT,
    CLIENT_IP,
    DIRECT,
    OUTBOUND_PORT,
    PACKET_MARK,
    READINESS_PORT,
    SERVER_IP,
    TRUST_DOMAIN,
    WARMUP_SECONDS,
    BenchError,
    Pki,
    _milliseconds,
    _nft,
    make_pki,
    print_columns,
    run_bench,
    run_wrk,
    start_ztunnel_pair,
)
from perf.nginx import start_nginx  # noqa: E402

WAYPOINT_IP = "127.0.0.4"
ENVOY_WAYPOINT_IP = "127.0.0.5"
WAYPOINT_VIP = ("127.10.0.1", 80)
ENVOY_WAYPOINT_VIP = ("127.10.0.2", 80)
ENVOY_HTTP = ("127.0.0.1", 25080)
HBONE_PORT = 15008
NFT_TABLE = "meshcore_l7bench"


@dataclass(frozen=True, kw_only=True)
class PathResult:
    """One measured path, in the shape `--json` prints."""

    path: str
    rps_c1: float
    rps_c32: float
    p50_ms_c1: float
    p99_ms_c1: float
    p50_ms_c32: float
    p99_ms_c32: float
    cpu_ms_per_1k_req: float | None  # every proxy on the path; None for direct
    l7_cpu_ms_per_1k_req: float | None  # the L7 proxy alone (our waypoint, or both Envoys)
    errors: int
    # HTTP/2 (h2c, prior knowledge) with h2load, one stream per connection at a time; only on
    # the waypoint paths (perf/nginx.py speaks HTTP/1.1 only). h2load reports no percentiles.
    h2_rps_c1: float | None = None
    h2_rps_c32: float | None = None
    h2_mean_ms_c1: float | None = None
    h2_mean_ms_c32: float | None = None
    h2_errors: int | None = None


@dataclass(frozen=True, kw_only=True)
class H2loadRun:
    """What one h2load run reported."""

    rps: float
    mean_ms: float
    errors: int  # failed, errored or timed-out requests plus 4xx/5xx responses


def run_h2load(url: str, *, connections: int, seconds: float) -> H2loadRun:
    argv = ["h2load", "-t1", f"-c{connections}", "-m1", "-D", f"{max(1, round(seconds))}", url]
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {completed.stderr.strip() or completed.stdout.strip()}")
    return parse_h2load(completed.stdout)


def parse_h2load(output: str) -> H2loadRun:
    """Parse h2load's summary (rate, request outcomes, status classes, mean request time)."""
    rps = re.search(r"^finished in [\d.]+\w+, ([\d.]+) req/s", output, re.M)
    outcomes = re.search(
        r"^requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
        output,
        re.M,
    )
    statuses = re.search(r"^status codes: \d+ 2xx, \d+ 3xx, (\d+) 4xx, (\d+) 5xx", output, re.M)
    request_time = re.search(r"^time for request:\s+\S+\s+\S+\s+([\d.]+\w+)", output, re.M)
    if rps is None or outcomes is None or statuses is None or request_time is None:
        raise BenchError(f"cannot parse h2load output:\n{output}")
    done, *failures = map(int, outcomes.groups())
    if done == 0:
        raise BenchError(f"h2load completed no request:\n{output}")
    return H2loadRun(
        rps=float(rps.group(1)),
        mean_ms=_milliseconds(request_time.group(1)),
        errors=sum(failures) + sum(map(int, statuses.groups())),
    )


def measure(
    path: str, url: str, *, proxy_pids: list[int], l7_pids: list[int], seconds: float, h2: bool = False
) -> PathResult:
    """Warm up, then c1 and c32 (with CPU of the proxies) on one path; then h2load if `h2`."""
    run_wrk(url, connections=32, seconds=min(WARMUP_SECONDS, seconds))
    c1 = run_wrk(url, connections=1, seconds=seconds)
    pids = proxy_pids + [pid for pid in l7_pids if pid not in proxy_pids]
    before = {pid: cpu_seconds(pid) for pid in pids}
    c32 = run_wrk(url, connections=32, seconds=seconds)
    used = {pid: cpu_seconds(pid) - before[pid] for pid in pids}
    if c32.requests == 0:
        raise BenchError(f"{path}: no request completed in the c32 run")

    def per_1k(selected: list[int]) -> float | None:
        # CPU seconds * 1e6 / requests = CPU milliseconds per 1,000 requests.
        return sum(used[pid] for pid in selected) * 1e6 / c32.requests if selected else None

    return PathResult(
        path=path,
        rps_c1=c1.rps,
        rps_c32=c32.rps,
        p50_ms_c1=c1.p50_ms,
        p99_ms_c1=c1.p99_ms,
        p50_ms_c32=c32.p50_ms,
        p99_ms_c32=c32.p99_ms,
        cpu_ms_per_1k_req=per_1k(pids),
        l7_cpu_ms_per_1k_req=per_1k(l7_pids),
        errors=c1.errors + c32.errors,
        **(measure_h2(url, seconds=seconds) if h2 else {}),
    )


def measure_h2(url: str, *, seconds: float) -> dict[str, float | int]:
    c1 = run_h2load(url, connections=1, seconds=seconds)
    c32 = run_h2load(url, connections=32, seconds=seconds)
    return {
        "h2_rps_c1": c1.rps,
        "h2_rps_c32": c32.rps,
        "h2_mean_ms_c1": c1.mean_ms,
        "h2_mean_ms_c32": c32.mean_ms,
        "h2_errors": c1.errors + c32.errors,
    }


# --- the set-up ---


def _state() -> str:
    def workload(name: str, ip: str, node: str) -> str:
        return f"""\
- uid: Kubernetes//Pod/default/{name}
  name: {name}
  namespace: default
  serviceAccount: {name}
  workloadIps: [{ip}]
  protocol: HBONE
  node: {node}
"""

    def service(name: str, vip: tuple[str, int], waypoint_ip: str) -> str:
        return f"""\
- name: {name}
  namespace: default
  hostname: {name}.default.svc.cluster.local
  vips: ["/{vip[0]}"]
  ports: {{{vip[1]}: {DIRECT[1]}}}
  waypoint: {{destination: "/{waypoint_ip}", hboneMtlsPort: {HBONE_PORT}}}
"""

    return (
        "workloads:\n"
        + workload("client", CLIENT_IP, "node-a")
        + workload("server", SERVER_IP, "node-b")
        + workload("waypoint", WAYPOINT_IP, "node-w")
        + workload("envoy-waypoint", ENVOY_WAYPOINT_IP, "node-w")
        + "services:\n"
        + service("bench", WAYPOINT_VIP, WAYPOINT_IP)
        + service("envoy-bench", ENVOY_WAYPOINT_VIP, ENVOY_WAYPOINT_IP)
        + "policies: []\n"
    )


def start_waypoint(workdir: Path, stack: contextlib.ExitStack) -> int:
    """Our waypoint as its own process (ca.pem / ca-key.pem written by l4_bench.start_ztunnel_pair)."""
    process = start_process(
        "waypoint",
        [
            sys.executable, str(REPO / "perf" / "waypoint_static.py"),
            "--ca-cert", workdir / "ca.pem",
            "--ca-key", workdir / "ca-key.pem",
            "--address", WAYPOINT_IP,
            "--vip", f"{WAYPOINT_VIP[0]}:{WAYPOINT_VIP[1]}",
            "--backend", f"{DIRECT[0]}:{DIRECT[1]}",
        ],
        log_dir=workdir,
        cwd=REPO,
    )
    stack.enter_context(process)
    wait_for_http_ok(f"http://{WAYPOINT_IP}:{READINESS_PORT}/healthz/ready", timeout=20, process=process)
    return process.pid


def _socket_address(address: tuple[str, int]) -> dict[str, object]:
    return {"socket_address": {"address": address[0], "port_value": address[1]}}


def envoy_http_proxy_bootstrap(*, listen: tuple[str, int], backend: tuple[str, int]) -> dict[str, object]:
    """Envoy as the waypoint's L7 part: listener -> HCM with one route `/` -> cluster `nginx`."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "waypoint",
        "route_config": {
            "name": "bench",
            "virtual_hosts": [
                # No route timeout, as istiod_lite (and istiod) configure a route whose
                # VirtualService sets none; the same in perf/waypoint_static.py.
                {"name": "bench", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "nginx", "timeout": "0s"}}]}
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "admin": {"address": _socket_address(("127.0.0.1", 0))},
        "static_resources": {
            "listeners": [
                {
                    "name": "waypoint_http",
                    "address": _socket_address(listen),
                    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
                }
            ],
            "clusters": [
                {
                    "name": "nginx",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "load_assignment": {
                        "cluster_name": "nginx",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(backend)}}]}],
                    },
                }
            ],
        },
    }


def start_envoy_waypoint(pki: Pki, workdir: Path, stack: contextlib.ExitStack) -> list[int]:
    """Envoy terminating HBONE in front of an Envoy HTTP proxy; both pids."""
    http = EnvoyProcess.start(
        envoy_http_proxy_bootstrap(listen=ENVOY_HTTP, backend=DIRECT), workdir=workdir, name="envoy-http"
    )
    stack.enter_context(http)
    hbone = EnvoyProcess.start(
        hbone_server_bootstrap(
            listen=(ENVOY_WAYPOINT_IP, HBONE_PORT),
            app=ENVOY_HTTP,
            certificate=pki.ca.issue(Identity(TRUST_DOMAIN, "default", "envoy-waypoint")),
            trust_domain=TRUST_DOMAIN,
        ),
        workdir=workdir,
        name="envoy-hbone",
    )
    stack.enter_context(hbone)
    return [hbone.pid, http.pid]


def install_redirect(stack: contextlib.ExitStack) -> None:
    """Send wrk's connections to the server pod and to both VIPs into ztunnel A's outbound."""
    _nft("delete", "table", "ip", NFT_TABLE, check=False)  # left over from a killed run
    rules = "\n".join(
        f"        ip daddr {ip} tcp dport {port} meta mark != {PACKET_MARK:#x} counter redirect to :{OUTBOUND_PORT}"
        for ip, port in ((SERVER_IP, APP_PORT), WAYPOINT_VIP, ENVOY_WAYPOINT_VIP)
    )
    _nft(
        "-f",
        "-",
        script=f"""\
table ip {NFT_TABLE} {{
    chain output {{
        type nat hook output priority -100; policy accept;
{rules}
    }}
}}
""",
    )
    stack.callback(_nft, "delete", "table", "ip", NFT_TABLE, check=False)


def redirected_connections() -> list[int]:
    """Connections each REDIRECT rule (server pod, waypoint VIP, Envoy VIP) sent to ztunnel."""
    return [int(n) for n in re.findall(r"counter packets (\d+)", _nft("list", "table", "ip", NFT_TABLE))]


def run_all(args: argparse.Namespace, workdir: Path) -> list[PathResult]:
    seconds = 1.0 if args.quick else args.duration
    pki = make_pki()
    with contextlib.ExitStack() as stack:
        stack.enter_context(start_nginx([DIRECT, (SERVER_IP, APP_PORT)], workdir=workdir))
        ztunnel_a, ztunnel_b = start_ztunnel_pair(pki, workdir, stack, state=_state())
        waypoint = start_waypoint(workdir, stack)
        envoys = start_envoy_waypoint(pki, workdir, stack)
        install_redirect(stack)

        def url(address: tuple[str, int]) -> str:
            return f"http://{address[0]}:{address[1]}/"

        results = [
            measure("direct", url(DIRECT), proxy_pids=[], l7_pids=[], seconds=seconds),
            measure("ztunnel", url((SERVER_IP, APP_PORT)), proxy_pids=[ztunnel_a, ztunnel_b], l7_pids=[], seconds=seconds),
            measure("waypoint", url(WAYPOINT_VIP), proxy_pids=[ztunnel_a], l7_pids=[waypoint], seconds=seconds, h2=True),
            measure("envoy-waypoint", url(ENVOY_WAYPOINT_VIP), proxy_pids=[ztunnel_a], l7_pids=envoys, seconds=seconds, h2=True),
        ]
        bypassed = [path for path, count in zip(("ztunnel", "waypoint", "envoy-waypoint"), redirected_connections()) if count == 0]
        if bypassed:
            raise BenchError(f"paths that bypassed ztunnel (nothing hit their REDIRECT rule): {bypassed}")
        return results


# --- reporting ---


def with_ratios(results: list[PathResult]) -> list[dict[str, object]]:
    """Each result as a dict plus its ratios against the Envoy waypoint path."""
    envoy = next(result for result in results if result.path == "envoy-waypoint")

    def ratio(mine: float | None, theirs: float | None) -> float | None:
        return None if mine is None or not theirs else round(mine / theirs, 3)

    rows = []
    for result in results:
        row: dict[str, object] = {
            key: round(value, 3) if isinstance(value, float) else value for key, value in asdict(result).items()
        }
        row["rps_c1_x_envoy"] = ratio(result.rps_c1, envoy.rps_c1)
        row["rps_c32_x_envoy"] = ratio(result.rps_c32, envoy.rps_c32)
        row["p99_c32_x_envoy"] = ratio(result.p99_ms_c32, envoy.p99_ms_c32)
        row["cpu_x_envoy"] = ratio(result.cpu_ms_per_1k_req, envoy.cpu_ms_per_1k_req)
        row["l7_cpu_x_envoy"] = ratio(result.l7_cpu_ms_per_1k_req, envoy.l7_cpu_ms_per_1k_req)
        row["h2_rps_c32_x_envoy"] = ratio(result.h2_rps_c32, envoy.h2_rps_c32)
        rows.append(row)
    return rows


_TABLE_COLUMNS = (
    # (heading, row key, format)
    ("rps c1", "rps_c1", ",.0f"),
    ("rps c32", "rps_c32", ",.0f"),
    ("p50 c1 ms", "p50_ms_c1", ".3f"),
    ("p99 c1 ms", "p99_ms_c1", ".3f"),
    ("p50 c32 ms", "p50_ms_c32", ".2f"),
    ("p99 c32 ms", "p99_ms_c32", ".2f"),
    ("CPU ms/1k", "cpu_ms_per_1k_req", ".1f"),
    ("L7 ms/1k", "l7_cpu_ms_per_1k_req", ".1f"),
    ("c1 xEnv", "rps_c1_x_envoy", ".2f"),
    ("c32 xEnv", "rps_c32_x_envoy", ".2f"),
    ("p99 xEnv", "p99_c32_x_envoy", ".2f"),
    ("CPU xEnv", "cpu_x_envoy", ".2f"),
    ("L7 xEnv", "l7_cpu_x_envoy", ".2f"),
)
_H2_COLUMNS = (
    ("h2 rps c1", "h2_rps_c1", ",.0f"),
    ("h2 rps c32", "h2_rps_c32", ",.0f"),
    ("mean c1 ms", "h2_mean_ms_c1", ".3f"),
    ("mean c32 ms", "h2_mean_ms_c32", ".2f"),
    ("c32 xEnv", "h2_rps_c32_x_envoy", ".2f"),
)


def print_table(rows: list[dict[str, object]]) -> None:
    print("HTTP/1.1 (wrk)")
    print_columns(rows, _TABLE_COLUMNS, path_width=15)
    print(
        "CPU ms/1k = CPU ms per 1,000 requests in the c32 run, every proxy on the path; L7 = the\n"
        "waypoint alone (ours, or both Envoys). xEnv = this path / envoy-waypoint (for p99 and\n"
        "CPU, above 1 means worse than Envoy)."
    )
    print("\nHTTP/2 h2c (h2load -m1: one request at a time per connection; no percentiles)")
    print_columns([row for row in rows if row["h2_rps_c1"] is not None], _H2_COLUMNS, path_width=15)
    errors = {row["path"]: row["errors"] + (row["h2_errors"] or 0) for row in rows if row["errors"] or row["h2_errors"]}
    if errors:
        print(f"warning: wrk reported socket errors or non-2xx responses: {errors}")


def main(argv: list[str] | None = None) -> int:
    return run_bench(
        "l7_bench", __doc__.split("\n\n")[0], ("wrk", "h2load", "nginx", "nft"), run_all, with_ratios, print_table, argv,
        quick_help="1 s runs",
    )


if __name__ == "__main__":
    sys.exit(main())
