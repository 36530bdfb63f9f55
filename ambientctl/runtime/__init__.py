"""The one-machine runtime: a Kubernetes-like cluster made of network namespaces and processes.

`Runtime.run` is the supervisor behind `ambientctl up`. It builds the network (netns.py),
starts the cluster services and, on every node, the node services (the hooks through
which the mesh's components join: istiod_lite, ztunnel, the node agent), then reconciles
the object store (store.py) with reality until it is cancelled:

- a Pod in the store gets a node and an IP (addressing.py), a network namespace on that
  node and one process per container (processes.py); its status is written back the way a
  kubelet would (phase, podIP, hostIP, Ready), and follows its containers when they exit;
- a Pod gone from the store is stopped and its namespace removed;
- Services get kube-proxy rules (kubeproxy.py) pointing at their ready Pods;
- node services see the running pods of their node, labels included, through
  `NodeContext.next_pods` (that is how label-based enrolment reaches the node agent).

Stopping (cancellation) stops every process, marks the pods `Unknown` (their node is gone;
they keep node and IP, so the next `up` puts them back where they were) and removes every
namespace, link and rule. `teardown` does the same from the journal alone, for `down` and
for leftovers of a run that was killed.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Protocol

import trio

from ambientctl.runtime import kubeproxy
from ambientctl.runtime.addressing import NodeAddresses, Placement, PlacementHint, place_pods, plan_nodes
from ambientctl.runtime.manifests import ObjectKey, is_builtin, key_of
from ambientctl.runtime.netns import (
    NetworkError,
    RunState,
    create_node,
    create_pod_network,
    create_router,
    delete_host_link,
    delete_netns,
    netns_path,
    node_netns,
    pod_netns,
)
from ambientctl.runtime.processes import (
    DEFAULT_GRACE_SECONDS,
    ProcessRecord,
    ProcessSpec,
    ProcessStartError,
    record_of,
    run_process,
    terminate,
)
from ambientctl.runtime.store import ObjectStore, now_rfc3339
from meshcore.log import get_logger

log = get_logger("runtime")

DEFAULT_POLL_SECONDS = 0.25  # how often the store is checked for changes: well inside the 2 s enrolment budget
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class RunDir:
    """Where a run keeps its journal, object store and logs."""

    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def container_log(self, namespace: str, pod: str, container: str) -> Path:
        return self.logs / "pods" / namespace / pod / f"{container}.log"

    def service_log(self, scope: str, name: str) -> Path:
        """Log of a node service (`scope` = the node's name) or a cluster service (`cluster`)."""
        return self.logs / "services" / scope / f"{name}.log"


@dataclass(frozen=True, kw_only=True)
class RunningPod:
    """A pod whose containers were started, as node services see it."""

    uid: str  # the Kubernetes pod UID (ZDS identifies pods by it)
    namespace: str
    name: str
    service_account: str
    node: str
    ip: str
    netns: str  # named network namespace; its file is `netns_path`
    labels: Mapping[str, str]
    namespace_labels: Mapping[str, str]

    @property
    def netns_path(self) -> Path:
        return netns_path(self.netns)


class NodeService(Protocol):
    """A component `up` runs once per node (ztunnel, the node agent)."""

    name: str

    async def run(self, node: NodeContext, *, task_status: trio.TaskStatus[Sequence[str]]) -> None:
        """Start; report through `task_status.started` lines telling users where to look
        (e.g. a metrics URL); then run until cancelled."""


class ClusterService(Protocol):
    """A component `up` runs once, before the node services (istiod_lite)."""

    name: str

    async def run(self, cluster: ClusterContext, *, task_status: trio.TaskStatus[Sequence[str]]) -> None:
        """As `NodeService.run`, with the whole cluster in view."""


@dataclass(frozen=True, kw_only=True)
class Summary:
    """What `up` reports once everything runs."""

    nodes: tuple[NodeAddresses, ...]
    hints: tuple[str, ...]  # from the services


@dataclass(frozen=True, kw_only=True)
class TeardownReport:
    """What a teardown removed."""

    processes: int
    namespaces: int
    links: int
    tables: int

    @property
    def anything(self) -> bool:
        return bool(self.processes or self.namespaces or self.links or self.tables)


# --- contexts handed to services ---


class _PodBoard:
    """The running pods, republished after every reconcile; waiters wake on change."""

    def __init__(self) -> None:
        self.pods: tuple[RunningPod, ...] = ()
        self._changed = trio.Event()

    def publish(self, pods: tuple[RunningPod, ...]) -> None:
        if pods != self.pods:
            self.pods = pods
            self._changed.set()
            self._changed = trio.Event()

    async def next(self, select: Callable[[RunningPod], bool], previous: tuple[RunningPod, ...]) -> tuple[RunningPod, ...]:
        while True:
            changed = self._changed
            current = tuple(pod for pod in self.pods if select(pod))
            if current != previous:
                return current
            await changed.wait()


class _Launcher:
    """Runs journaled processes with a log file each (shared by the contexts)."""

    def __init__(self, state: RunState, grace: float) -> None:
        self._state, self._grace = state, grace

    async def run(self, spec: ProcessSpec, task_status: trio.TaskStatus[ProcessRecord]) -> int:
        try:
            return await run_process(spec, on_spawn=self._state.record_process, grace=self._grace, task_status=task_status)
        finally:
            self._state.forget_process(spec.name)


class NodeContext:
    """What a node service gets: its node, a way to run processes there, the node's pods."""

    def __init__(self, addresses: NodeAddresses, run_dir: RunDir, launcher: _Launcher, board: _PodBoard) -> None:
        self.addresses = addresses
        self.netns = node_netns(addresses.name)
        self.run_dir = run_dir
        self._launcher, self._board = launcher, board

    @property
    def name(self) -> str:
        return self.addresses.name

    def pods(self) -> tuple[RunningPod, ...]:
        """The pods running on this node now."""
        return tuple(pod for pod in self._board.pods if pod.node == self.name)

    async def next_pods(self, previous: tuple[RunningPod, ...]) -> tuple[RunningPod, ...]:
        """Wait until this node's running pods (or their labels) differ from `previous`."""
        return await self._board.next(lambda pod: pod.node == self.name, previous)

    async def run_process(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        task_status: trio.TaskStatus[ProcessRecord] = trio.TASK_STATUS_IGNORED,
    ) -> int:
        """Run `argv` in this node's namespace until it exits (returns its status) or the
        caller is cancelled (it is stopped). Its log: `run_dir.service_log(node, name)`."""
        spec = ProcessSpec(
            name=f"node/{self.name}/{name}",
            argv=tuple(argv),
            env=_base_env() if env is None else env,
            log_path=self.run_dir.service_log(self.name, name),
            netns=self.netns,
            cwd=cwd,
        )
        return await self._launcher.run(spec, task_status)


class ClusterContext:
    """What a cluster service gets: the nodes, the store folder, a way to run processes."""

    def __init__(self, nodes: tuple[NodeContext, ...], run_dir: RunDir, launcher: _Launcher) -> None:
        self.nodes = nodes
        self.run_dir = run_dir
        self._launcher = launcher

    @property
    def store_dir(self) -> Path:
        """The object store folder (what istiod_lite's files source watches)."""
        return self.run_dir.store

    async def run_process(
        self,
        name: str,
        argv: Sequence[str],
        *,
        netns: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        task_status: trio.TaskStatus[ProcessRecord] = trio.TASK_STATUS_IGNORED,
    ) -> int:
        """As `NodeContext.run_process`, in `netns` (None: the host's). Log: `service_log("cluster", name)`."""
        spec = ProcessSpec(
            name=f"cluster/{name}",
            argv=tuple(argv),
            env=_base_env() if env is None else env,
            log_path=self.run_dir.service_log("cluster", name),
            netns=netns,
            cwd=cwd,
        )
        return await self._launcher.run(spec, task_status)


# --- the supervisor ---


@dataclass
class _PodHandle:
    uid: str
    cancel_scope: trio.CancelScope
    done: trio.Event = field(default_factory=trio.Event)
    owns_netns: bool = False  # its namespace name was free and it created it
    running: RunningPod | None = None  # set once its containers were started


class AlreadyRunning(Exception):
    """Another `up` is running on this run dir."""


class Runtime:
    """Builds the mesh's network and keeps pods, services and processes in step with the store."""

    def __init__(
        self,
        *,
        run_dir: RunDir,
        node_names: Sequence[str],
        node_services: Sequence[NodeService] = (),
        cluster_services: Sequence[ClusterService] = (),
        poll_interval: float = DEFAULT_POLL_SECONDS,
        grace: float = DEFAULT_GRACE_SECONDS,
    ) -> None:
        self.run_dir = run_dir
        self.nodes = plan_nodes(node_names)
        self.store = ObjectStore(run_dir.store)
        self.node_services = list(node_services)
        self.cluster_services = list(cluster_services)
        self._poll_interval = poll_interval
        self._grace = grace
        self._state = RunState(path=run_dir.state_file)
        self._launcher = _Launcher(self._state, grace)
        self._board = _PodBoard()
        self._pods: dict[ObjectKey, _PodHandle] = {}
        self._rules: tuple[kubeproxy.ServicePortRule, ...] | None = None
        self._store_signature: tuple[tuple[str, int, int], ...] = ()

    async def run(self, *, task_status: trio.TaskStatus[Summary] = trio.TASK_STATUS_IGNORED) -> None:
        """Build, start, report a Summary, then reconcile until cancelled; always cleans up."""
        supervisor = running_supervisor(self.run_dir)
        if supervisor is not None:
            raise AlreadyRunning(
                f"the mesh in {self.run_dir.root} is already up (pid {supervisor.pid}); run `ambientctl down` first"
            )
        leftovers = await trio.to_thread.run_sync(teardown, self.run_dir, self._grace)
        if leftovers.anything:
            log.warning("removed leftovers of a run that did not stop cleanly", **vars(leftovers))
        self._state.set_supervisor(record_of("ambientctl", os.getpid()))
        try:
            async with trio.open_nursery() as nursery:
                await trio.to_thread.run_sync(self._build_network)
                nodes = tuple(NodeContext(node, self.run_dir, self._launcher, self._board) for node in self.nodes)
                hints: list[str] = []
                for cluster_service in self.cluster_services:
                    hints += await nursery.start(cluster_service.run, ClusterContext(nodes, self.run_dir, self._launcher))
                for node in nodes:
                    for node_service in self.node_services:
                        hints += await nursery.start(node_service.run, node)
                await nursery.start(self._reconcile_forever)
                task_status.started(Summary(nodes=self.nodes, hints=tuple(hints)))
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._mark_pods_unknown)
                await trio.to_thread.run_sync(teardown, self.run_dir, self._grace)

    # --- network ---

    def _build_network(self) -> None:
        create_router(self._state, self.nodes)
        for node in self.nodes:
            create_node(self._state, node, self.nodes)
        # The host's table is the only kernel object outside our namespaces: journal it first.
        self._state.record_host_nft_table(kubeproxy.FAMILY, kubeproxy.TABLE)

    # --- reconciling ---

    async def _reconcile_forever(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as pods_nursery:
            await self._reconcile(pods_nursery)
            task_status.started()
            while True:
                await trio.sleep(self._poll_interval)
                signature = await trio.to_thread.run_sync(self._signature)
                if signature != self._store_signature:
                    await self._reconcile(pods_nursery)

    def _signature(self) -> tuple[tuple[str, int, int], ...]:
        entries = []
        for path in sorted(self.run_dir.store.glob("*.yaml")):
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            entries.append((path.name, info.st_mtime_ns, info.st_size))
        return tuple(entries)

    async def _reconcile(self, pods_nursery: trio.Nursery) -> None:
        self._store_signature = await trio.to_thread.run_sync(self._signature)
        objects = await trio.to_thread.run_sync(self.store.objects)
        pods = {key: body for key, body in objects.items() if is_builtin(key, "Pod")}
        await self._stop_pods_gone_from(pods)
        await self._start_new_pods(pods, objects, pods_nursery)
        # Starting pods wrote their status: read again so rules and the board see it (the
        # signature first, so that a write in between is not mistaken for one already seen).
        self._store_signature = await trio.to_thread.run_sync(self._signature)
        objects = await trio.to_thread.run_sync(self.store.objects)
        self._publish_pods(objects)
        await self._sync_kube_proxy(objects)

    async def _stop_pods_gone_from(self, pods: Mapping[ObjectKey, dict[str, Any]]) -> None:
        doomed = [
            (key, handle)
            for key, handle in self._pods.items()
            if key not in pods or pods[key]["metadata"]["uid"] != handle.uid
        ]
        for _, handle in doomed:
            handle.cancel_scope.cancel()
        for key, handle in doomed:
            await handle.done.wait()  # its namespace must be gone before a namesake is created
            del self._pods[key]

    async def _start_new_pods(
        self, pods: Mapping[ObjectKey, dict[str, Any]], objects: Mapping[ObjectKey, dict[str, Any]], pods_nursery: trio.Nursery
    ) -> None:
        new = [key for key in pods if key not in self._pods]
        if not new:
            return
        hints = {_pod_id(key): _placement_hint(body) for key, body in pods.items()}
        placements = place_pods(self.nodes, hints)
        services = [body for key, body in objects.items() if is_builtin(key, "Service")]
        for key in sorted(new):
            if _pod_id(key) not in placements:
                log.warning("pod stays Pending: every node's pod network is full", pod=_pod_id(key))
                continue
            body = pods[key]
            handle = _PodHandle(uid=body["metadata"]["uid"], cancel_scope=trio.CancelScope())
            self._pods[key] = handle
            await pods_nursery.start(self._run_pod, key, body, placements[_pod_id(key)], services, handle)

    async def _run_pod(
        self,
        key: ObjectKey,
        body: dict[str, Any],
        placement: Placement,
        services: list[dict[str, Any]],
        handle: _PodHandle,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind, network and start one pod, then hold it until it is deleted (cancelled)."""
        node = next(node for node in self.nodes if node.name == placement.node)
        netns = pod_netns(key.namespace, key.name)
        started = False
        try:
            with handle.cancel_scope:
                async with trio.open_nursery() as containers:
                    failure = await self._start_pod(key, body, placement, node, netns, services, containers, handle)
                    if failure is None:
                        handle.running = _running_pod(body, placement, netns)
                    else:
                        await self._pod_failed(key, placement, node, *failure)
                        containers.cancel_scope.cancel()
                    task_status.started()
                    started = True
                # Every container exited: like a kubelet, keep the sandbox until the pod is deleted.
                await trio.sleep_forever()
        finally:
            if handle.owns_netns:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(delete_netns, self._state, netns)
            handle.done.set()
        if not started:
            task_status.started()  # deleted while starting; the reconciler waits for `done`

    async def _start_pod(
        self,
        key: ObjectKey,
        body: dict[str, Any],
        placement: Placement,
        node: NodeAddresses,
        netns: str,
        services: list[dict[str, Any]],
        containers: trio.Nursery,
        handle: _PodHandle,
    ) -> tuple[str, str] | None:
        """Start the pod's containers in `containers`; None, or (reason, message) if it failed."""
        await trio.to_thread.run_sync(self.store.update, key, lambda pod: pod["spec"].__setitem__("nodeName", node.name))
        if netns_path(netns).exists():
            # Another pod's: "a-b/c" and "a/b-c" map to the same name.
            return "NetworkSetupFailed", f"network namespace {netns} is already in use"
        handle.owns_netns = True
        try:
            await trio.to_thread.run_sync(lambda: create_pod_network(self._state, netns=netns, node=node, ip=str(placement.ip)))
        except NetworkError as exc:
            return "NetworkSetupFailed", str(exc)
        # Running before the processes start, so that a container exiting at once is the last word.
        await trio.to_thread.run_sync(self.store.update, key, _running_status(placement, node))
        env = {**_base_env(), "HOSTNAME": key.name, **service_environment(services, key.namespace)}
        for container in body["spec"]["containers"]:
            spec = ProcessSpec(
                name=f"{key.namespace}/{key.name}/{container['name']}",
                argv=(*container["command"], *container.get("args", ())),
                env={**env, **{entry["name"]: entry.get("value", "") for entry in container.get("env") or ()}},
                log_path=self.run_dir.container_log(key.namespace, key.name, container["name"]),
                netns=netns,
                cwd=Path(container.get("workingDir") or "/"),
            )
            try:
                await containers.start(self._run_container, key, spec, container["name"])
            except ProcessStartError as exc:
                return "ContainerStartFailed", str(exc)
        return None

    async def _run_container(self, key: ObjectKey, spec: ProcessSpec, container: str, *, task_status: trio.TaskStatus[None]) -> None:
        status = await self._launcher.run(spec, task_status)
        log.warning("container exited", container=spec.name, status=status, log=str(spec.log_path))
        await trio.to_thread.run_sync(self.store.update, key, _container_exited(container, status))

    async def _pod_failed(self, key: ObjectKey, placement: Placement, node: NodeAddresses, reason: str, message: str) -> None:
        log.error("pod failed", pod=f"{key.namespace}/{key.name}", reason=reason, message=message)

        def mark(pod: dict[str, Any]) -> None:
            pod["status"] = {
                **_addresses(placement, node),
                "phase": "Failed",
                "reason": reason,
                "message": message,
                "conditions": _conditions(ready=False),
            }

        await trio.to_thread.run_sync(self.store.update, key, mark)

    def _publish_pods(self, objects: Mapping[ObjectKey, dict[str, Any]]) -> None:
        namespace_labels = {
            key.name: body["metadata"].get("labels") or {} for key, body in objects.items() if is_builtin(key, "Namespace")
        }
        running = []
        for key, handle in sorted(self._pods.items()):
            body = objects.get(key)
            if handle.running is None or body is None or (body.get("status") or {}).get("phase") != "Running":
                continue
            running.append(
                dataclasses.replace(
                    handle.running,
                    labels=dict(body["metadata"].get("labels") or {}),
                    namespace_labels=dict(namespace_labels.get(key.namespace, {})),
                )
            )
        self._board.publish(tuple(running))

    async def _sync_kube_proxy(self, objects: Mapping[ObjectKey, dict[str, Any]]) -> None:
        services = [body for key, body in objects.items() if is_builtin(key, "Service")]
        pods = [body for key, body in objects.items() if is_builtin(key, "Pod")]
        rules = kubeproxy.service_rules(services, pods)
        if rules == self._rules:
            return
        script = kubeproxy.render(rules)

        def install_everywhere() -> None:
            for node in self.nodes:
                kubeproxy.install(script, netns=node_netns(node.name))
            kubeproxy.install(script, netns=None)

        await trio.to_thread.run_sync(install_everywhere)
        self._rules = rules

    def _mark_pods_unknown(self) -> None:
        """The runtime is stopping: its pods are not running anywhere any more."""

        def mark(pod: dict[str, Any]) -> None:
            status = pod.get("status") or {}
            if status.get("phase") in ("Running", "Pending"):
                status.update(phase="Unknown", reason="NodeLost", message="the runtime stopped", conditions=_conditions(ready=False))
                for container in status.get("containerStatuses") or ():
                    container.update(ready=False, started=False)
                pod["status"] = status

        for key in list(self._pods):
            self.store.update(key, mark)


# --- tearing down ---


def running_supervisor(run_dir: RunDir) -> ProcessRecord | None:
    """The `up` process of this run dir, if one is alive."""
    supervisor = RunState.load(run_dir.state_file).supervisor
    return supervisor if supervisor is not None and supervisor.pid != os.getpid() and supervisor.is_alive() else None


def stop_supervisor(record: ProcessRecord, *, timeout: float) -> bool:
    """SIGTERM a running `up` and wait up to `timeout` for it to clean up; SIGKILL it after that.

    Returns True if it stopped by itself. Blocking.
    """
    try:
        os.kill(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while record.is_alive():
            if time.monotonic() > deadline:
                os.kill(record.pid, signal.SIGKILL)
                return False
            time.sleep(0.05)
    except ProcessLookupError:
        pass  # it exited by itself meanwhile
    return True


def teardown(run_dir: RunDir, grace: float = DEFAULT_GRACE_SECONDS) -> TeardownReport:
    """Remove everything the journal of `run_dir` lists, then the journal. Blocking, idempotent."""
    state = RunState.load(run_dir.state_file)
    if state.is_empty:
        state.remove()
        return TeardownReport(processes=0, namespaces=0, links=0, tables=0)
    signalled = terminate(state.processes.values(), netns_paths=[netns_path(name) for name in state.netns], grace=grace)
    for name in list(state.processes):
        state.forget_process(name)
    tables = list(state.host_nft_tables)
    for table in tables:
        family, name = table.split()
        if (family, name) == (kubeproxy.FAMILY, kubeproxy.TABLE):
            kubeproxy.remove_host_table()
        state.forget_host_nft_table(family, name)
    links = list(state.host_links)
    for link in links:
        delete_host_link(state, link)
    namespaces = list(state.netns)
    for name in reversed(namespaces):  # pods before their nodes, nodes before mesh-net
        delete_netns(state, name)
    state.remove()
    return TeardownReport(processes=len(signalled), namespaces=len(namespaces), links=len(links), tables=len(tables))


# --- what a kubelet would do (pure) ---


def service_environment(services: Sequence[Mapping[str, Any]], namespace: str) -> dict[str, str]:
    """Kubernetes' service environment variables for a pod in `namespace`:
    `<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT` and `<NAME>_SERVICE_PORT_<PORT NAME>`."""
    env = {}
    for service in services:
        if service["metadata"]["namespace"] != namespace or not service["spec"].get("clusterIP"):
            continue
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        ports = service["spec"]["ports"]
        env[f"{prefix}_SERVICE_HOST"] = service["spec"]["clusterIP"]
        env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        for port in ports:
            if port.get("name"):
                env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(port["port"])
    return env


def _base_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", _DEFAULT_PATH)}


def _pod_id(key: ObjectKey) -> str:
    return f"{key.namespace}/{key.name}"


def _placement_hint(pod: Mapping[str, Any]) -> PlacementHint:
    ip = (pod.get("status") or {}).get("podIP")
    return PlacementHint(node=pod["spec"].get("nodeName"), ip=IPv4Address(ip) if ip else None)


def _running_pod(body: Mapping[str, Any], placement: Placement, netns: str) -> RunningPod:
    key = key_of(body)
    return RunningPod(
        uid=body["metadata"]["uid"],
        namespace=key.namespace,
        name=key.name,
        service_account=body["spec"].get("serviceAccountName") or "default",
        node=placement.node,
        ip=str(placement.ip),
        netns=netns,
        labels=dict(body["metadata"].get("labels") or {}),
        namespace_labels={},
    )


def _addresses(placement: Placement, node: NodeAddresses) -> dict[str, Any]:
    return {
        "hostIP": str(node.link_address),
        "hostIPs": [{"ip": str(node.link_address)}],
        "podIP": str(placement.ip),
        "podIPs": [{"ip": str(placement.ip)}],
    }


def _conditions(*, ready: bool) -> list[dict[str, str]]:
    now = now_rfc3339()
    ready_status = "True" if ready else "False"
    return [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
        {"type": "Initialized", "status": "True", "lastTransitionTime": now},
        {"type": "ContainersReady", "status": ready_status, "lastTransitionTime": now},
        {"type": "Ready", "status": ready_status, "lastTransitionTime": now},
    ]


def _running_status(placement: Placement, node: NodeAddresses) -> Callable[[dict[str, Any]], None]:
    def mark(pod: dict[str, Any]) -> None:
        now = now_rfc3339()
        statuses = [
            {"name": c["name"], "ready": True, "started": True, "restartCount": 0, "state": {"running": {"startedAt": now}}}
            for c in pod["spec"]["containers"]
        ]
        pod["status"] = {
            **_addresses(placement, node),
            "phase": "Running",
            "startTime": now,
            "conditions": _conditions(ready=True),
            "containerStatuses": statuses,
        }

    return mark


def _container_exited(container: str, status: int) -> Callable[[dict[str, Any]], None]:
    def mark(pod: dict[str, Any]) -> None:
        pod_status = pod.setdefault("status", {})
        statuses = pod_status.setdefault("containerStatuses", [])
        entry = next((s for s in statuses if s["name"] == container), None)
        if entry is None:
            entry = {"name": container, "restartCount": 0}
            statuses.append(entry)
        code = status if status >= 0 else 128 - status  # killed by signal N: 128 + N, like a shell
        entry.update(
            ready=False,
            started=False,
            state={"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "finishedAt": now_rfc3339()}},
        )
        if all("terminated" in s["state"] for s in statuses):
            failed = any(s["state"]["terminated"]["exitCode"] != 0 for s in statuses)
            pod_status["phase"] = "Failed" if failed else "Succeeded"
        pod_status["conditions"] = _conditions(ready=False)

    return mark
