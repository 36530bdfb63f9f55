"""Control-plane benchmark: istiod_lite serving a large mesh to many simulated ztunnels.

    .venv/bin/python perf/cp_bench.py [--json] [--workloads 10000] [--services 1000]
        [--proxies 100] [--changes 30] [--handler record|state] [--client-processes 1]

What runs, all on loopback (see perf/README.md):
  1. a manifest directory: N pods (status as a kubelet writes it), S Services selecting them,
     ambient-enrolled namespaces and a few AuthorizationPolicies, 100 pods per YAML file;
  2. istiod_lite as its own process (`python -m istiod_lite --source files`, plaintext xDS on a
     free 127.0.x.y port, directory polled every 0.05 s);
  3. P simulated ztunnels: one DeltaXdsClient each, as ztunnel's XdsFeed builds it, in one (or
     --client-processes) worker processes;
  4. one pod label flipped per change, by an atomic rewrite of its file, timed until every
     proxy has applied (and so ACKs) the new Workload.
Every process and the temporary directory are removed at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.connection import Connection, wait
from pathlib import Path

import trio
import yaml
from envoy.config.core.v3 import base_pb2
from google.protobuf import any_pb2, struct_pb2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a checkout, installed or not

from meshcore._gen import workload_pb2  # noqa: E402
from meshcore.log import configure_logging  # noqa: E402
from meshcore.testing.procs import (  # noqa: E402
    ManagedProcess,
    ProcessError,
    cpu_seconds,
    free_port,
    http_get,
    start_process,
    wait_for_http_ok,
)
from meshcore.xds.client import DeltaXdsClient, Upsert  # noqa: E402
from meshcore.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL  # noqa: E402
from ztunnel.state.store import StateStore  # noqa: E402
from ztunnel.state.xds import XdsStateHandler  # noqa: E402

POLL_INTERVAL_SECONDS = 0.05  # the files source's scan period; part of every change's latency
DOCUMENTS_PER_FILE = 100  # pods (and Services) per YAML file
POLICY_EVERY_NAMESPACES = 10  # one AuthorizationPolicy per this many namespaces
ISTIOD_READY_TIMEOUT_SECONDS = 300.0  # parsing 10k pods of YAML takes a while
SYNC_TIMEOUT_SECONDS = 120.0
CHANGE_TIMEOUT_SECONDS = 30.0  # --handler state with many proxies is slow on the client side
WORKER_START_TIMEOUT_SECONDS = 60.0
# Pause between changes, so each lands at a random point of istiod_lite's poll cycle.
CHANGE_GAP_SECONDS = (0.05, 0.15)
RANDOM_SEED = 20240603

# The targets of issue 3.
TARGET_INITIAL_SYNC_SECONDS = 10.0
TARGET_CHANGE_P99_MS = 100.0
TARGET_ISTIOD_RSS_MB = 500.0

VERSION_LABEL = "version"  # -> the Workload's canonical_revision: a change only that pod sees


Progress = Callable[[str], None]

# What istiod_lite's files source logs (info level) once a scan found changed objects.
SOURCE_CHANGED_EVENT = "config directory changed"


class BenchError(Exception):
    """A measurement could not be taken or gave a result that cannot be trusted."""


# --- the mesh, as manifests (pure) ---


@dataclass(frozen=True, kw_only=True)
class MeshShape:
    """How many of each object, and how they are spread."""

    workloads: int
    services: int
    proxies: int  # one simulated ztunnel per node: pods are spread over this many nodes
    namespaces: int

    @property
    def policies(self) -> int:
        return math.ceil(self.namespaces / POLICY_EVERY_NAMESPACES)

    def namespace_of_pod(self, pod: int) -> int:
        return pod * self.namespaces // self.workloads

    def services_in(self, namespace: int) -> range:
        """The global indexes of the Services in a namespace (consecutive blocks)."""
        start = namespace * self.services // self.namespaces
        return range(start, (namespace + 1) * self.services // self.namespaces)

    def service_of_pod(self, pod: int) -> int | None:
        """The Service selecting a pod: round-robin over its namespace's Services."""
        namespace = self.namespace_of_pod(pod)
        services = self.services_in(namespace)
        if not services:
            return None
        first_pod = -(-namespace * self.workloads // self.namespaces)  # ceil
        return services[(pod - first_pod) % len(services)]


def namespace_name(index: int) -> str:
    return f"ns-{index:03d}"


def node_name(index: int) -> str:
    return f"node-{index:03d}"


def node_ip(index: int) -> str:
    return f"10.0.{index // 256}.{index % 256}"


def pod_ip(index: int) -> str:
    return f"10.{128 + index // 65536}.{index // 256 % 256}.{index % 256}"


def app_label(service: int | None) -> str:
    return f"app-{service:04d}" if service is not None else "app-none"


def namespace_doc(index: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": namespace_name(index),
            "labels": {
                "istio.io/dataplane-mode": "ambient",
                "kubernetes.io/metadata.name": namespace_name(index),
            },
        },
    }


def pod_doc(shape: MeshShape, index: int, version: str) -> dict:
    """Pod `index` of a Deployment, as the API server holds it once the kubelet reported it."""
    service = shape.service_of_pod(index)
    app = app_label(service)
    replica_set = f"{app}-5d8f7c9b4"
    node = index % shape.proxies
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{replica_set}-{index:05d}",
            "namespace": namespace_name(shape.namespace_of_pod(index)),
            "labels": {"app": app, VERSION_LABEL: version, "pod-template-hash": "5d8f7c9b4"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": replica_set,
                    "controller": True,
                }
            ],
        },
        "spec": {
            "nodeName": node_name(node),
            "serviceAccountName": app,
            "containers": [
                {
                    "name": "app",
                    "image": "registry.example/app:1",
                    "ports": [{"name": "http", "containerPort": 8080}],
                }
            ],
        },
        "status": {
            "phase": "Running",
            "hostIP": node_ip(node),
            "podIP": pod_ip(index),
            "podIPs": [{"ip": pod_ip(index)}],
            "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "PodScheduled", "status": "True"},
            ],
        },
    }


def service_doc(shape: MeshShape, index: int, namespace: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": app_label(index), "namespace": namespace_name(namespace)},
        "spec": {
            "selector": {"app": app_label(index)},
            "clusterIP": f"10.96.{index // 256}.{index % 256}",
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }


def policy_doc(shape: MeshShape, index: int) -> dict:
    """Alternately: ALLOW to one app from its own namespace; namespace-wide DENY of an IP block."""
    namespace = namespace_name(index * POLICY_EVERY_NAMESPACES)
    services = shape.services_in(index * POLICY_EVERY_NAMESPACES)
    if index % 2 == 0 and services:
        spec = {
            "selector": {"matchLabels": {"app": app_label(services[0])}},
            "action": "ALLOW",
            "rules": [
                {
                    "from": [{"source": {"namespaces": [namespace]}}],
                    "to": [{"operation": {"ports": ["8080"]}}],
                }
            ],
        }
    else:
        spec = {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["192.0.2.0/24"]}}]}]}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": f"policy-{index:03d}", "namespace": namespace},
        "spec": spec,
    }


def render(document: dict) -> str:
    return yaml.dump(document, Dumper=yaml.CSafeDumper, sort_keys=False)


class ManifestDirectory:
    """The manifests on disk; pod files are kept as rendered documents to rewrite one cheaply."""

    def __init__(self, directory: Path, shape: MeshShape) -> None:
        self.directory = directory
        self.shape = shape
        self._pod_documents: dict[int, list[str]] = {}  # file number -> rendered pods

    def write_all(self) -> int:
        """Write every file; returns the total size in bytes."""
        shape = self.shape
        self._write("namespaces.yaml", [render(namespace_doc(n)) for n in range(shape.namespaces)])
        services = [
            render(service_doc(shape, s, n))
            for n in range(shape.namespaces)
            for s in shape.services_in(n)
        ]
        for start in range(0, len(services), DOCUMENTS_PER_FILE):
            self._write(
                f"services-{start // DOCUMENTS_PER_FILE:04d}.yaml",
                services[start : start + DOCUMENTS_PER_FILE],
            )
        self._write("policies.yaml", [render(policy_doc(shape, p)) for p in range(shape.policies)])
        for pod in range(shape.workloads):
            self._pod_documents.setdefault(pod // DOCUMENTS_PER_FILE, []).append(
                render(pod_doc(shape, pod, "v1"))
            )
        for number, documents in self._pod_documents.items():
            self._write(self._pod_file(number), documents)
        return sum(path.stat().st_size for path in self.directory.iterdir())

    def prepare_pod_change(self, pod: int, version: str) -> Path:
        """Write the pod's file with the new version label to a hidden temporary name (which the
        files source skips); `commit` then renames it into place: one atomic change."""
        number, position = divmod(pod, DOCUMENTS_PER_FILE)
        documents = self._pod_documents[number]
        documents[position] = render(pod_doc(self.shape, pod, version))
        staged = self.directory / f".{self._pod_file(number)}.tmp"
        staged.write_text("---\n".join(documents))
        return staged

    def commit(self, staged: Path) -> None:
        os.replace(staged, staged.with_name(staged.name[1:].removesuffix(".tmp")))

    @staticmethod
    def _pod_file(number: int) -> str:
        return f"pods-{number:04d}.yaml"

    def _write(self, name: str, documents: list[str]) -> None:
        (self.directory / name).write_text("---\n".join(documents))


def pod_uid(shape: MeshShape, pod: int) -> str:
    """The Workload resource name istiod_lite gives the pod."""
    metadata = pod_doc(shape, pod, "")["metadata"]
    return f"Kubernetes//Pod/{metadata['namespace']}/{metadata['name']}"


# --- the simulated ztunnels (worker processes) ---
# Messages on a worker's pipe, as tuples:
#   worker -> coordinator: ("ready",) ("connected", t) ("synced", [t per client])
#                          ("watching",) ("applied", [t per client]) ("failed", text)
#   coordinator -> worker: ("connect",) ("watch", name, revision) ("stop",)
# Times are time.monotonic(), which is CLOCK_MONOTONIC: one clock for every process here.


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    target: str
    proxy_indexes: tuple[int, ...]
    expected_addresses: int
    expected_authorizations: int
    handler: str  # "record" | "state"


class ChangeWatch:
    """One pending change: which proxies have applied `name` at `revision`, and when."""

    def __init__(self, name: str, revision: str, proxies: int) -> None:
        self.name = name
        self.revision = revision
        self.applied_at: dict[int, float] = {}
        self.done = trio.Event()
        self._proxies = proxies

    def saw(self, proxy: int, at: float) -> None:
        self.applied_at.setdefault(proxy, at)
        if len(self.applied_at) == self._proxies:
            self.done.set()


class RecordingHandler:
    """A simulated ztunnel's XdsHandler: optionally applies to a real StateStore (as ztunnel's
    XdsStateHandler), and records when it holds every resource and when a watched change lands."""

    def __init__(
        self, proxy: int, spec: WorkerSpec, watch_holder: list[ChangeWatch | None]
    ) -> None:
        self.proxy = proxy
        self.synced_at: float | None = None
        self._synced = trio.Event()
        self._watch_holder = watch_holder  # [the pending change], shared by a worker's handlers
        self._expected = {
            ADDRESS_TYPE_URL: spec.expected_addresses,
            AUTHORIZATION_TYPE_URL: spec.expected_authorizations,
        }
        self._names: dict[str, set[str]] = {url: set() for url in self._expected}
        self._delegate = XdsStateHandler(StateStore()) if spec.handler == "state" else None

    def apply(self, type_url: str, upserts: list[Upsert], removals: list[str]) -> dict[str, str]:
        errors = (
            self._delegate.apply(type_url, upserts, removals) if self._delegate is not None else {}
        )
        names = self._names.setdefault(type_url, set())
        names.update(name for name, _, _ in upserts if name not in errors)
        names.difference_update(removals)
        now = time.monotonic()
        if self.synced_at is None and all(
            len(self._names[url]) == n for url, n in self._expected.items()
        ):
            self.synced_at = now
            self._synced.set()
        watch = self._watch_holder[0]
        if watch is not None and type_url == ADDRESS_TYPE_URL:
            for name, _, resource in upserts:
                if (
                    name == watch.name
                    and name not in errors
                    and _revision_of(resource) == watch.revision
                ):
                    watch.saw(self.proxy, now)
        return errors

    async def wait_synced(self) -> None:
        await self._synced.wait()


def _revision_of(resource: any_pb2.Any) -> str:
    return workload_pb2.Address.FromString(resource.value).workload.canonical_revision


def client_worker(conn: Connection, spec: WorkerSpec) -> None:
    """Process entry: run the spec's simulated ztunnels, driven by the coordinator's messages."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    try:
        trio.run(_serve_coordinator, conn, spec)
    except Exception as exc:  # noqa: BLE001 - reported to the coordinator, which fails the run
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))


def simulated_ztunnel(proxy: int, target: str, handler: RecordingHandler) -> DeltaXdsClient:
    """The xDS client of node `proxy`'s ztunnel, with the node identity ztunnel's XdsFeed sends."""
    node, address = node_name(proxy), node_ip(proxy)
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            "NAME": f"ztunnel-{node}",
            "NAMESPACE": "istio-system",
            "INSTANCE_IPS": address,
            "NODE_NAME": node,
        }
    )
    return DeltaXdsClient(
        target,
        node=base_pb2.Node(
            id=f"ztunnel~{address}~ztunnel-{node}.istio-system~istio-system.svc.cluster.local",
            metadata=metadata,
        ),
        type_urls=(ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL),
        handler=handler,
    )


async def _serve_coordinator(conn: Connection, spec: WorkerSpec) -> None:
    configure_logging("warning")
    watch_holder: list[ChangeWatch | None] = [None]
    handlers = [RecordingHandler(proxy, spec, watch_holder) for proxy in spec.proxy_indexes]
    clients = [simulated_ztunnel(h.proxy, spec.target, h) for h in handlers]

    async def receive():
        return await trio.to_thread.run_sync(conn.recv, abandon_on_cancel=True)

    conn.send(("ready",))
    if (await receive())[0] != "connect":
        return
    async with trio.open_nursery() as nursery:
        conn.send(("connected", time.monotonic()))
        for client in clients:
            await nursery.start(client.run)
        for handler in handlers:
            await handler.wait_synced()
        conn.send(("synced", [handler.synced_at for handler in handlers]))
        while True:
            message = await receive()
            if message[0] != "watch":
                break
            _, name, revision = message
            watch = watch_holder[0] = ChangeWatch(name, revision, len(handlers))
            conn.send(("watching",))
            await watch.done.wait()
            watch_holder[0] = None
            conn.send(("applied", [watch.applied_at[proxy] for proxy in spec.proxy_indexes]))
        nursery.cancel_scope.cancel()


class Workers:
    """The coordinator's handle on the worker processes."""

    def __init__(self, specs: Sequence[WorkerSpec]) -> None:
        context = multiprocessing.get_context("spawn")
        self._connections: list[Connection] = []
        self._processes = []
        for spec in specs:
            parent, child = context.Pipe()
            process = context.Process(
                target=client_worker, args=(child, spec), daemon=True, name="cp-bench-clients"
            )
            process.start()
            child.close()
            self._connections.append(parent)
            self._processes.append(process)

    def cpu_seconds(self) -> float:
        """CPU time all worker processes have used so far."""
        return sum(cpu_seconds(process.pid) for process in self._processes)

    def send_all(self, message: tuple) -> None:
        for conn in self._connections:
            conn.send(message)

    def receive_all(self, kind: str, *, timeout: float, istiod: ManagedProcess) -> list[tuple]:
        """One `kind` message from every worker; BenchError on a failure or the timeout."""
        deadline = time.monotonic() + timeout
        received: dict[int, tuple] = {}
        while len(received) < len(self._connections):
            istiod.check_running()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = len(self._connections) - len(received)
                raise BenchError(
                    f"no {kind!r} from {missing} client worker(s) within {timeout:g} s"
                )
            for conn in wait(
                [c for i, c in enumerate(self._connections) if i not in received],
                min(remaining, 1.0),
            ):
                index = self._connections.index(conn)
                try:
                    message = conn.recv()
                except EOFError:
                    code = self._processes[index].exitcode
                    raise BenchError(f"client worker {index} exited (status {code})") from None
                if message[0] == "failed":
                    raise BenchError(f"client worker {index} failed: {message[1]}")
                if message[0] != kind:
                    raise BenchError(
                        f"client worker {index} sent {message[0]!r}, expected {kind!r}"
                    )
                received[index] = message
        return [received[i] for i in range(len(self._connections))]

    def stop(self) -> None:
        for conn in self._connections:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()


# --- measuring istiod_lite ---


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MB (10^6 bytes) from /proc/PID/status."""
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return (
        int(fields["VmRSS"].split()[0]) * 1024 / 1e6,
        int(fields["VmHWM"].split()[0]) * 1024 / 1e6,
    )


def pushes_sent(metrics_url: str) -> int:
    """istiod_lite's delta xDS responses so far, all type URLs."""
    text = http_get(metrics_url)
    return int(
        sum(float(v) for v in re.findall(r"^istiod_xds_pushes_total\{[^}]*\} (\S+)$", text, re.M))
    )


class LogFollower:
    """Reads istiod_lite's JSON log lines as they are appended."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0

    def new_events(self, event: str) -> list[dict]:
        with self._path.open("rb") as log:
            log.seek(self._offset)
            data = log.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        found = []
        for line in complete.splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    found.append(record)
        return found


def _wall_seconds(iso_timestamp: str) -> float:
    return datetime.fromisoformat(iso_timestamp.replace("Z", "+00:00")).timestamp()


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (with 30 samples, p99 is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass(frozen=True, kw_only=True)
class ChangeTiming:
    total_ms: float  # rename -> the last proxy applied the new Workload
    first_ms: float  # rename -> the first proxy applied it
    detect_ms: float | None  # rename -> istiod_lite logged the directory change


# --- the run ---


def start_istiod(
    workdir: Path, manifests: Path, address: str, xds_port: int, monitoring_port: int
) -> ManagedProcess:
    return start_process(
        "istiod_lite",
        [
            sys.executable,
            "-m",
            "istiod_lite",
            "--source",
            "files",
            "--dir",
            manifests,
            "--root-dir",
            workdir / "istiod",
            "--listen-address",
            address,
            "--xds-port",
            str(xds_port),
            "--xds-tls-port",
            "0",
            "--monitoring-port",
            str(monitoring_port),
            "--poll-interval",
            str(POLL_INTERVAL_SECONDS),
        ],
        log_dir=workdir,
        cwd=REPO,
    )


def split(items: Sequence[int], parts: int) -> list[tuple[int, ...]]:
    return [tuple(items[i::parts]) for i in range(parts) if items[i::parts]]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def measure_initial_sync(
    workers: Workers, istiod: ManagedProcess, shape: MeshShape, progress: Progress
) -> dict[str, object]:
    """Connect every simulated ztunnel at once; time until each holds every resource."""
    workers.receive_all("ready", timeout=WORKER_START_TIMEOUT_SECONDS, istiod=istiod)
    istiod_cpu_before = cpu_seconds(istiod.pid)
    clients_cpu_before = workers.cpu_seconds()
    workers.send_all(("connect",))
    connected_at = min(m[1] for m in workers.receive_all("connected", timeout=10, istiod=istiod))
    messages = workers.receive_all("synced", timeout=SYNC_TIMEOUT_SECONDS, istiod=istiod)
    sync_times = [t - connected_at for m in messages for t in m[1]]
    rss, _ = memory_mb(istiod.pid)
    progress(
        f"{shape.proxies} proxies synced in {max(sync_times):.2f} s; istiod_lite RSS {rss:.0f} MB"
    )
    return {
        "initial_sync_s": round(max(sync_times), 3),
        "initial_sync_p50_s": round(statistics.median(sync_times), 3),
        "istiod_cpu_sync_s": round(cpu_seconds(istiod.pid) - istiod_cpu_before, 2),
        "clients_cpu_sync_s": round(workers.cpu_seconds() - clients_cpu_before, 2),
        "istiod_rss_mb": round(rss, 1),
    }


def measure_changes(
    workers: Workers,
    istiod: ManagedProcess,
    manifests: ManifestDirectory,
    *,
    changes: int,
    metrics_url: str,
    rng: random.Random,
) -> dict[str, object]:
    """Flip one pod's version label per change; time until every proxy applied the Workload."""
    shape = manifests.shape
    log = LogFollower(istiod.log_path)
    log.new_events(SOURCE_CHANGED_EVENT)  # skip the initial load
    pushes_before = pushes_sent(metrics_url)
    istiod_cpu_before = cpu_seconds(istiod.pid)
    clients_cpu_before = workers.cpu_seconds()
    timings: list[ChangeTiming] = []
    pods = rng.sample(range(shape.workloads), min(changes, shape.workloads))
    for number in range(changes):
        pod = pods[number % len(pods)]
        revision = f"v{number + 2}"
        staged = manifests.prepare_pod_change(pod, revision)
        workers.send_all(("watch", pod_uid(shape, pod), revision))
        workers.receive_all("watching", timeout=10, istiod=istiod)
        written_wall, written = time.time(), time.monotonic()
        manifests.commit(staged)
        messages = workers.receive_all("applied", timeout=CHANGE_TIMEOUT_SECONDS, istiod=istiod)
        applied = [t for m in messages for t in m[1]]
        seen = log.new_events(SOURCE_CHANGED_EVENT)
        timings.append(
            ChangeTiming(
                total_ms=(max(applied) - written) * 1000,
                first_ms=(min(applied) - written) * 1000,
                # One scan saw it, or the split cannot be told.
                detect_ms=(_wall_seconds(seen[0]["timestamp"]) - written_wall) * 1000
                if len(seen) == 1
                else None,
            )
        )
        time.sleep(rng.uniform(*CHANGE_GAP_SECONDS))
    if not timings:
        return {}
    totals = [t.total_ms for t in timings]
    split_timings = [t for t in timings if t.detect_ms is not None]
    detects = [t.detect_ms for t in split_timings]
    seen_to_all = [t.total_ms - t.detect_ms for t in split_timings]
    seen_to_first = [t.first_ms - t.detect_ms for t in split_timings]
    return {
        "change_p50_ms": _ms(percentile(totals, 50)),
        "change_p99_ms": _ms(percentile(totals, 99)),
        "change_max_ms": _ms(max(totals)),
        "detect_p50_ms": _ms(percentile(detects, 50)) if detects else None,
        "detect_p99_ms": _ms(percentile(detects, 99)) if detects else None,
        "seen_to_all_p50_ms": _ms(percentile(seen_to_all, 50)) if detects else None,
        "seen_to_all_p99_ms": _ms(percentile(seen_to_all, 99)) if detects else None,
        "seen_to_first_p50_ms": _ms(percentile(seen_to_first, 50)) if detects else None,
        "pushes_per_change": round((pushes_sent(metrics_url) - pushes_before) / len(timings), 2),
        "istiod_cpu_per_change_ms": _ms(
            (cpu_seconds(istiod.pid) - istiod_cpu_before) * 1000 / len(timings)
        ),
        "clients_cpu_per_change_ms": _ms(
            (workers.cpu_seconds() - clients_cpu_before) * 1000 / len(timings)
        ),
    }


def run_bench(args: argparse.Namespace, workdir: Path, progress: Progress) -> dict[str, object]:
    shape = MeshShape(
        workloads=args.workloads,
        services=args.services,
        proxies=args.proxies,
        namespaces=args.namespaces,
    )
    result: dict[str, object] = {
        "workloads": shape.workloads,
        "services": shape.services,
        "proxies": shape.proxies,
        "namespaces": shape.namespaces,
        "policies": shape.policies,
        "handler": args.handler,
        "client_processes": min(args.client_processes, shape.proxies),
        "poll_interval_s": POLL_INTERVAL_SECONDS,
        "changes": args.changes,
    }
    manifests = ManifestDirectory(workdir / "manifests", shape)
    manifests.directory.mkdir()
    manifest_bytes = manifests.write_all()
    result["manifest_mb"] = round(manifest_bytes / 1e6, 1)
    progress(f"wrote {manifest_bytes / 1e6:.1f} MB of manifests to {manifests.directory}")

    rng = random.Random(RANDOM_SEED)
    address = f"127.0.{rng.randint(1, 254)}.{rng.randint(1, 254)}"
    xds_port, monitoring_port = free_port(address), free_port(address)
    with contextlib.ExitStack() as stack:
        started = time.monotonic()
        istiod = stack.enter_context(
            start_istiod(workdir, manifests.directory, address, xds_port, monitoring_port)
        )
        # Started while istiod_lite loads: the workers' imports are not part of any timing.
        workers = Workers(
            [
                WorkerSpec(
                    target=f"{address}:{xds_port}",
                    proxy_indexes=indexes,
                    expected_addresses=shape.workloads + shape.services,
                    expected_authorizations=shape.policies,
                    handler=args.handler,
                )
                for indexes in split(range(shape.proxies), args.client_processes)
            ]
        )
        stack.callback(workers.stop)
        wait_for_http_ok(
            f"http://{address}:{monitoring_port}/ready",
            timeout=ISTIOD_READY_TIMEOUT_SECONDS,
            process=istiod,
        )
        result["istiod_ready_s"] = round(time.monotonic() - started, 2)
        result["istiod_cpu_load_s"] = round(cpu_seconds(istiod.pid), 2)
        result["istiod_rss_ready_mb"] = round(memory_mb(istiod.pid)[0], 1)
        progress(
            f"istiod_lite ready after {result['istiod_ready_s']} s "
            f"(pid {istiod.pid}, xDS {address}:{xds_port})"
        )
        try:
            result |= measure_initial_sync(workers, istiod, shape, progress)
            result |= measure_changes(
                workers,
                istiod,
                manifests,
                changes=args.changes,
                metrics_url=f"http://{address}:{monitoring_port}/metrics",
                rng=rng,
            )
        except BenchError as exc:  # the work directory goes away: keep what istiod_lite said
            raise BenchError(f"{exc}\nistiod_lite log (last lines):\n{istiod.log_tail()}") from None
        rss_end, peak = memory_mb(istiod.pid)
    result["istiod_rss_end_mb"] = round(rss_end, 1)
    result["istiod_peak_rss_mb"] = round(peak, 1)
    change_p99 = result.get("change_p99_ms")
    result["targets_met"] = {  # None: not measured (--changes 0)
        "initial_sync": result["initial_sync_s"] < TARGET_INITIAL_SYNC_SECONDS,
        "change_p99": None if change_p99 is None else change_p99 < TARGET_CHANGE_P99_MS,
        "istiod_rss": peak < TARGET_ISTIOD_RSS_MB,
    }
    return result


# --- reporting ---

_TABLE = (
    # (label, key, unit, target)
    ("istiod_lite ready (load + translate)", "istiod_ready_s", "s", None),
    ("initial sync, all proxies", "initial_sync_s", "s", f"< {TARGET_INITIAL_SYNC_SECONDS:g} s"),
    ("initial sync, median proxy", "initial_sync_p50_s", "s", None),
    ("istiod_lite CPU during sync", "istiod_cpu_sync_s", "s", None),
    ("client processes' CPU during sync", "clients_cpu_sync_s", "s", None),
    ("istiod_lite RSS when ready", "istiod_rss_ready_mb", "MB", None),
    ("istiod_lite RSS after sync", "istiod_rss_mb", "MB", None),
    ("istiod_lite RSS at end", "istiod_rss_end_mb", "MB", None),
    ("istiod_lite peak RSS", "istiod_peak_rss_mb", "MB", f"< {TARGET_ISTIOD_RSS_MB:g} MB"),
    ("change -> all applied p50", "change_p50_ms", "ms", None),
    ("change -> all applied p99", "change_p99_ms", "ms", f"< {TARGET_CHANGE_P99_MS:g} ms"),
    ("change -> all applied max", "change_max_ms", "ms", None),
    ("  write -> istiod saw it p50", "detect_p50_ms", "ms", None),
    ("  write -> istiod saw it p99", "detect_p99_ms", "ms", None),
    ("  istiod saw it -> all applied p50", "seen_to_all_p50_ms", "ms", None),
    ("  istiod saw it -> all applied p99", "seen_to_all_p99_ms", "ms", None),
    ("  istiod saw it -> first applied p50", "seen_to_first_p50_ms", "ms", None),
    ("pushes per change", "pushes_per_change", "", None),
    ("istiod_lite CPU per change", "istiod_cpu_per_change_ms", "ms", None),
    ("client processes' CPU per change", "clients_cpu_per_change_ms", "ms", None),
)


def print_table(result: dict[str, object]) -> None:
    print(
        "{workloads} workloads, {services} services, {policies} AuthorizationPolicies in "
        "{namespaces} namespaces; {proxies} proxies in {client_processes} client process(es), "
        "handler {handler!r}; files source polled every {poll_interval_s} s".format(**result)
    )
    for label, key, unit, target in _TABLE:
        value = result.get(key)
        cell = "-" if value is None else f"{value:g} {unit}".strip()
        print(f"{label:<40}{cell:>14}  {target or ''}")
    missed = [name for name, met in result["targets_met"].items() if met is False]
    print("targets: " + ("missed: " + ", ".join(missed) if missed else "none missed"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )
    parser.add_argument("--workloads", type=int, default=10_000, help="pods (each one Workload)")
    parser.add_argument("--services", type=int, default=1_000)
    parser.add_argument("--proxies", type=int, default=100, help="simulated ztunnels, one per node")
    parser.add_argument("--namespaces", type=int, default=100)
    parser.add_argument("--changes", type=int, default=30, help="pod changes to time")
    parser.add_argument(
        "--handler",
        choices=("record", "state"),
        default="record",
        help="record: note names and the watched change only; state: also apply every resource "
        "to a StateStore through ztunnel's XdsStateHandler (client CPU then dominates)",
    )
    parser.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="worker processes the proxies are spread over",
    )
    args = parser.parse_args(argv)
    for name in ("workloads", "services", "proxies", "namespaces", "client_processes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.changes < 0:
        parser.error("--changes must not be negative")
    if args.namespaces > args.workloads:
        parser.error("--namespaces must not exceed --workloads (every namespace holds pods)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        with tempfile.TemporaryDirectory(prefix="cp-bench-") as workdir:
            result = run_bench(args, Path(workdir), progress)
    except (BenchError, ProcessError, OSError) as exc:
        print(f"cp_bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cp_bench: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
