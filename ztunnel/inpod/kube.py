"""ztunnel/inpod/kube: the node agent on Kubernetes (`ztunnel-node-agent`), istio-cni's role.

    ztunnel-node-agent --node-name NAME --socket PATH --proc /host/proc [--kubeconfig FILE] [--log-level L]

The DaemonSet runs it next to ztunnel. It serves ZDS on `--socket` (the `NodeAgent` of
ztunnel/inpod/agent.py, which also installs each pod's redirect rules) and keeps the agent's
enrolled pods equal to the pods on this node that the mesh captures:

- watch Pods with `spec.nodeName=NAME` and all Namespaces (list, then watch from the list's
  resourceVersion; 410 Gone lists again; other failures back off 0.1 s doubling to 30 s);
- decide with meshcore.enrolment's rule (the one the one-machine runtime uses), for pods
  that are Running, have an IP and are not hostNetwork;
- find a pod's network namespace by its IP: every `<proc>/<pid>/ns/net` (deduplicated by
  inode, the host's own skipped) whose `<proc>/<pid>/net/fib_trie` lists the IP as a local
  address; an IP found in two namespaces is refused rather than guessed;
- enrol with `<proc>/<pid>/ns/net` and annotate the pod `ambient.istio.io/redirection:
  enabled`; on unlabel or delete remove the annotation first (peers stop using HBONE),
  then release (Istio's CNI order).

A pod whose namespace cannot be found yet (the sandbox is still starting) or whose enrolment
failed is retried with its own backoff (1 s doubling to 30 s); the rest carry on.
Needs on the API: pods get/list/watch/patch, namespaces list/watch.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.config
import trio
import urllib3
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.watch.watch import iter_resp_lines

from meshcore.enrolment import REDIRECTION_ANNOTATION, is_captured
from meshcore.log import LEVEL_NAMES, configure_logging, get_logger
from ztunnel.inpod.agent import AgentError, EnrolledPod, EnrollError, NodeAgent

_log = get_logger("inpod.kube")

WATCH_SECONDS = 300
_WATCH_READ_TIMEOUT = WATCH_SECONDS + 30
_REQUEST_TIMEOUT = (10, 60)
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 30.0
RETRY_INITIAL = 1.0
RETRY_MAX = 30.0
# Time for "not HBONE any more" to reach every ztunnel before the pod's capture goes.
REDIRECTION_SETTLE = 0.5
_GONE = 410
_NOT_FOUND = 404
_TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, OSError, json.JSONDecodeError, UnicodeDecodeError)


# --- pure parts ---


@dataclass(frozen=True, kw_only=True)
class PodView:
    """What the agent needs of a Pod object."""

    uid: str
    name: str
    namespace: str
    service_account: str
    labels: Mapping[str, str]
    redirection: str | None  # the annotation as the API server last reported it
    running: bool
    ip: str | None
    host_network: bool

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class PodShapeError(ValueError):
    """A Pod object lacks a field the agent needs; the message names it."""


def pod_view(obj: Mapping[str, Any]) -> PodView:
    """The agent's view of a Pod as the API server sent it (camelCase JSON)."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        raise PodShapeError("Pod without metadata")
    for name in ("uid", "name", "namespace"):
        if not isinstance(metadata.get(name), str):
            raise PodShapeError(f"Pod without metadata.{name}")
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    return PodView(
        uid=metadata["uid"],
        name=metadata["name"],
        namespace=metadata["namespace"],
        service_account=spec.get("serviceAccountName") or "default",
        labels=dict(metadata.get("labels") or {}),
        redirection=(metadata.get("annotations") or {}).get(REDIRECTION_ANNOTATION),
        # A pod being deleted is released at once, before its containers stop.
        running=status.get("phase") == "Running" and not metadata.get("deletionTimestamp"),
        ip=status.get("podIP") or None,
        host_network=bool(spec.get("hostNetwork")),
    )


def pods_to_capture(pods: Iterable[PodView], namespace_labels: Mapping[str, Mapping[str, str]]) -> dict[str, PodView]:
    """The pods (by uid) the agent should hold: running, with an IP, in their own netns, enrolled."""
    return {
        pod.uid: pod
        for pod in pods
        if pod.running and pod.ip and not pod.host_network
        and is_captured(pod.labels, namespace_labels.get(pod.namespace, {}))
    }  # fmt: skip


def local_ipv4_addresses(fib_trie: str) -> frozenset[str]:
    """The addresses a netns owns, from its /proc/<pid>/net/fib_trie: leaves of `/32 host LOCAL`."""
    addresses = set()
    leaf = None
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|-- "):
            leaf = text[4:]
        elif text.startswith("/32 host LOCAL") and leaf is not None:
            addresses.add(leaf)
    return frozenset(address for address in addresses if not address.startswith("127."))


@dataclass(frozen=True, kw_only=True)
class NetnsCandidate:
    """One network namespace seen in /proc: its inode, a path that opens it, its addresses."""

    inode: int
    path: Path
    addresses: frozenset[str]


class NetnsLookupError(Exception):
    """A pod IP belongs to no network namespace, or to more than one."""


def netns_for_ip(ip: str, candidates: Iterable[NetnsCandidate], host_inodes: Iterable[int]) -> Path:
    """The path of the one non-host netns that owns `ip`."""
    excluded = set(host_inodes)
    matches = {c.inode: c.path for c in candidates if c.inode not in excluded and ip in c.addresses}
    if not matches:
        raise NetnsLookupError(f"no network namespace on this node has {ip} yet")
    if len(matches) > 1:
        raise NetnsLookupError(f"{ip} is an address of {len(matches)} network namespaces ({', '.join(map(str, matches.values()))}); refusing to guess")
    return next(iter(matches.values()))


# --- /proc ---


def scan_netns(proc: Path) -> list[NetnsCandidate]:
    """Every network namespace a process in `proc` lives in, once per inode. Blocking."""
    seen: dict[int, NetnsCandidate] = {}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        path = Path(entry.path) / "ns" / "net"
        try:
            inode = os.stat(path).st_ino
            if inode in seen:
                continue
            fib_trie = (Path(entry.path) / "net" / "fib_trie").read_text()
        except OSError:
            continue  # the process exited, or is not ours to look at
        seen[inode] = NetnsCandidate(inode=inode, path=path, addresses=local_ipv4_addresses(fib_trie))
    return list(seen.values())


def host_netns_inodes(proc: Path) -> set[int]:
    """The host's netns (pid 1 of `proc`, when readable) and the agent's own: never a pod's."""
    inodes = set()
    for path in (proc / "1" / "ns" / "net", Path("/proc/self/ns/net")):
        try:
            inodes.add(os.stat(path).st_ino)
        except OSError:
            pass
    return inodes


# --- list + watch ---


class _Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class _Reflector:
    """List + watch one collection, reporting `replace(items)` after a list and `event(type, obj)`."""

    def __init__(self, what: str, lister: Callable[..., Any], *, replace: Callable[[list[dict]], None], event: Callable[[str, dict], None]) -> None:
        self._what = what
        self._lister = lister
        self._replace = replace
        self._event = event
        self._limiter = trio.CapacityLimiter(1)
        self._resource_version: str | None = None

    async def run(self) -> None:
        delay = BACKOFF_INITIAL
        while True:
            try:
                if self._resource_version is None:
                    await self._list()
                delay = BACKOFF_INITIAL
                await self._watch()
                continue  # the server ended the watch
            except _Gone:
                _log.info("watch expired; listing again", what=self._what)
                self._resource_version = None
            except ApiException as exc:
                if exc.status == _GONE:
                    self._resource_version = None
                _log.warning("list/watch failed; retrying", what=self._what, status=exc.status, error=_api_message(exc))
            except _TRANSPORT_ERRORS as exc:
                _log.warning("list/watch failed; retrying", what=self._what, error=f"{type(exc).__name__}: {exc}")
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True, limiter=self._limiter)

    async def _list(self) -> None:
        def list_json() -> dict:
            response = self._lister(_preload_content=False, _request_timeout=_REQUEST_TIMEOUT)
            try:
                return json.loads(response.data)
            finally:
                response.release_conn()

        body = await self._in_thread(list_json)
        self._replace(list(body.get("items") or []))
        self._resource_version = str((body.get("metadata") or {}).get("resourceVersion", ""))

    async def _watch(self) -> None:
        response = await self._in_thread(functools.partial(
            self._lister, watch=True, resource_version=self._resource_version, allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS, _preload_content=False, _request_timeout=(_REQUEST_TIMEOUT[0], _WATCH_READ_TIMEOUT),
        ))  # fmt: skip
        try:
            lines = iter_resp_lines(response)
            while (line := await self._in_thread(next, lines, None)) is not None:
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == _GONE:
                        raise _Gone()
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                self._resource_version = (obj.get("metadata") or {}).get("resourceVersion", self._resource_version)
                if kind != "BOOKMARK":
                    self._event(kind, obj)
        finally:
            sock = getattr(response.connection, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a thread still blocked reading
                except OSError:
                    pass
            response.close()


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body or b"").get("message") or str(exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


# --- the agent ---


@dataclass
class _Retry:
    at: float
    delay: float


@dataclass
class _ClusterView:
    """The node's pods and every namespace's labels, as the watches last reported them."""

    pods: dict[str, PodView] = field(default_factory=dict)
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    pods_listed: bool = False
    namespaces_listed: bool = False


class KubeNodeAgent:
    """Keeps `agent`'s enrolled pods equal to the captured pods on `node_name`."""

    def __init__(self, api_client: kubernetes.client.ApiClient, *, node_name: str, proc: Path, agent: NodeAgent) -> None:
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._node_name = node_name
        self._proc = proc
        self._agent = agent
        self._view = _ClusterView()
        self._changed = trio.Event()
        self._enrolled: dict[str, PodView] = {}
        self._retries: dict[str, _Retry] = {}
        self._patch_limiter = trio.CapacityLimiter(1)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        pods = _Reflector(
            f"pods on {self._node_name}",
            functools.partial(self._core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={self._node_name}"),
            replace=self._replace_pods, event=self._pod_event,
        )  # fmt: skip
        namespaces = _Reflector("namespaces", self._core.list_namespace, replace=self._replace_namespaces, event=self._namespace_event)
        async with trio.open_nursery() as nursery:
            await nursery.start(self._agent.run)
            nursery.start_soon(pods.run)
            nursery.start_soon(namespaces.run)
            task_status.started()
            await self._reconcile_forever()

    # Watch callbacks: update the view, wake the reconciler.

    def _replace_pods(self, items: list[dict]) -> None:
        self._view.pods = {}
        for obj in items:
            self._pod_event("ADDED", obj)
        self._view.pods_listed = True
        self._changed.set()

    def _pod_event(self, kind: str, obj: dict) -> None:
        try:
            pod = pod_view(obj)
        except PodShapeError as exc:
            _log.warning("skipping a Pod the agent cannot read", error=str(exc))
            return
        if kind == "DELETED":
            self._view.pods.pop(pod.uid, None)
        else:
            self._view.pods[pod.uid] = pod
        self._changed.set()

    def _replace_namespaces(self, items: list[dict]) -> None:
        self._view.namespace_labels = {}
        for obj in items:
            self._namespace_event("ADDED", obj)
        self._view.namespaces_listed = True
        self._changed.set()

    def _namespace_event(self, kind: str, obj: dict) -> None:
        metadata = obj.get("metadata") or {}
        name = metadata.get("name")
        if not isinstance(name, str):
            return
        if kind == "DELETED":
            self._view.namespace_labels.pop(name, None)
        else:
            self._view.namespace_labels[name] = dict(metadata.get("labels") or {})
        self._changed.set()

    # Reconciling.

    async def _reconcile_forever(self) -> None:
        while True:
            changed = self._changed
            if self._view.pods_listed and self._view.namespaces_listed:
                self._changed = trio.Event()
                await self._reconcile()
                changed = self._changed
            wake = min((retry.at for retry in self._retries.values()), default=None)
            with trio.move_on_at(wake if wake is not None else float("inf")):
                await changed.wait()

    async def _reconcile(self) -> None:
        wanted = pods_to_capture(self._view.pods.values(), self._view.namespace_labels)
        for uid in list(self._enrolled.keys() - wanted.keys()):
            await self._release(self._enrolled.pop(uid))
        self._retries = {uid: retry for uid, retry in self._retries.items() if uid in wanted}
        due = [pod for uid, pod in wanted.items() if uid not in self._enrolled and self._due(uid)]
        if due:
            candidates = await trio.to_thread.run_sync(scan_netns, self._proc)
            host = await trio.to_thread.run_sync(host_netns_inodes, self._proc)
            for pod in due:
                await self._enroll(pod, candidates, host)
        for uid in list(self._enrolled):
            # The view moves while this pass awaits; a pod gone meanwhile is released next pass.
            current = self._view.pods.get(uid)
            if current is not None and current.redirection != "enabled":
                await self._annotate(current, "enabled")
        for pod in list(self._view.pods.values()):
            if pod.uid not in self._enrolled and pod.redirection is not None:
                await self._annotate(pod, None)

    def _due(self, uid: str) -> bool:
        retry = self._retries.get(uid)
        return retry is None or retry.at <= trio.current_time()

    def _failed(self, pod: PodView, error: str) -> None:
        previous = self._retries.get(pod.uid)
        delay = RETRY_INITIAL if previous is None else min(previous.delay * 2, RETRY_MAX)
        self._retries[pod.uid] = _Retry(at=trio.current_time() + delay, delay=delay)
        _log.warning("pod not captured yet; retrying", pod=str(pod), error=error, retry_in_s=delay)

    async def _enroll(self, pod: PodView, candidates: list[NetnsCandidate], host: set[int]) -> None:
        assert pod.ip is not None  # pods_to_capture keeps only pods with an IP
        try:
            netns = netns_for_ip(pod.ip, candidates, host)
            await self._agent.enroll(EnrolledPod(
                uid=pod.uid, name=pod.name, namespace=pod.namespace, service_account=pod.service_account, netns_path=netns
            ))  # fmt: skip
        except (NetnsLookupError, EnrollError) as exc:
            self._failed(pod, str(exc))
            return
        self._retries.pop(pod.uid, None)
        self._enrolled[pod.uid] = pod
        _log.info("pod enrolled in the mesh", pod=str(pod), netns=str(netns))

    async def _release(self, pod: PodView) -> None:
        if pod.uid in self._view.pods:
            # Peers stop using HBONE first, then the capture goes (Istio's CNI order).
            await self._annotate(pod, None)
            await trio.sleep(REDIRECTION_SETTLE)
        try:
            await self._agent.release(pod.uid)
        except EnrollError as exc:
            _log.error("pod released, but its capture rules stay", pod=str(pod), error=str(exc))
            return
        _log.info("pod released from the mesh", pod=str(pod))

    async def _annotate(self, pod: PodView, value: str | None) -> None:
        """Set (or with None remove) the redirection annotation; failures are retried on the next pass."""
        body = {"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}}
        call = functools.partial(
            self._core.patch_namespaced_pod, pod.name, pod.namespace, body,
            _content_type="application/merge-patch+json", _request_timeout=_REQUEST_TIMEOUT,
        )  # fmt: skip
        try:
            await trio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=self._patch_limiter)
        except ApiException as exc:
            if exc.status != _NOT_FOUND:
                _log.warning("cannot annotate pod", pod=str(pod), status=exc.status, error=_api_message(exc))
        except _TRANSPORT_ERRORS as exc:
            _log.warning("cannot annotate pod", pod=str(pod), error=f"{type(exc).__name__}: {exc}")


# --- command line ---


class SetupError(Exception):
    """The agent cannot start: no usable kubeconfig or proc folder."""


def api_client_for(kubeconfig: Path | None) -> kubernetes.client.ApiClient:
    """From `kubeconfig`, else the pod's ServiceAccount (in cluster), else $KUBECONFIG / ~/.kube/config."""
    try:
        if kubeconfig is not None:
            return kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = kubernetes.client.Configuration()
            kubernetes.config.load_incluster_config(client_configuration=configuration)
            return kubernetes.client.ApiClient(configuration)
        return kubernetes.config.new_client_from_config()
    except (ConfigException, OSError) as exc:
        raise SetupError(f"--kubeconfig: no usable Kubernetes configuration: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ztunnel-node-agent", description="Hands this node's enrolled pods to ztunnel (Kubernetes).")
    parser.add_argument("--node-name", required=True, help="this node's name (the DaemonSet passes spec.nodeName)")
    parser.add_argument("--socket", required=True, type=Path, help="the ZDS unix socket ztunnel connects to")
    parser.add_argument("--proc", required=True, type=Path, help="the host's /proc (mounted, e.g. /host/proc)")
    parser.add_argument("--kubeconfig", type=Path, help="default: in-cluster ServiceAccount, else $KUBECONFIG")
    parser.add_argument("--log-level", default="info", choices=LEVEL_NAMES)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        if not (args.proc / "1").is_dir():
            raise SetupError(f"--proc {args.proc}: not a proc filesystem with the host's processes (no 1/)")
        api_client = api_client_for(args.kubeconfig)
    except SetupError as exc:
        print(f"ztunnel-node-agent: {exc}", file=sys.stderr)
        return 2
    agent = NodeAgent(args.socket)
    node_agent = KubeNodeAgent(api_client, node_name=args.node_name, proc=args.proc, agent=agent)
    status = 0
    try:
        trio.run(_serve, node_agent)
    except* AgentError as group:
        for exc in group.exceptions:
            print(f"ztunnel-node-agent: {exc}", file=sys.stderr)
        status = 1
    finally:
        # Rules stay in the pods' netns: a restarted agent re-enrols them, ztunnel keeps serving.
        agent.close()
    return status


async def _serve(node_agent: KubeNodeAgent) -> None:
    """Run until SIGTERM (the kubelet stopping the pod) or SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(node_agent.run)
            async for signum in signals:
                _log.info("node agent stopping", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                return


if __name__ == "__main__":
    sys.exit(main())
