"""ztunnel/inpod/manager: one logical proxy per enrolled pod, inside the pod's network namespace.

The node agent hands each enrolled pod's netns over ZDS (`client.ZdsClient`); this is the
handler. For every pod it binds 15001 (outbound, captured), 15006 (plaintext inbound,
captured) and 15008 (HBONE inbound) *inside* the pod's netns, with the mesh mark, and serves
them with the same proxies the node-level listeners use. Sockets made for the pod's traffic
are created in its netns too (`SocketFactory`), so traffic leaves with the pod's own IP.
Releasing a pod closes its listeners; connections already open finish on their own.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from meshcore import netio
from meshcore.log import get_logger
from ztunnel.inpod.client import ZdsClient
from ztunnel.inpod.netns import listen_in_netns
from ztunnel.inpod.protocol import WorkloadInfo
from ztunnel.proxy.sockets import SocketFactory
from ztunnel.state.model import Workload
from ztunnel.state.store import StateStore

_log = get_logger("inpod")

WORKLOAD_WAIT_SECONDS = 5.0  # ztunnel waits this long for the pod's Workload to arrive over xDS


class PodNotKnown(Exception):
    """ZDS named a pod the ztunnel has no Workload for (yet); the agent gets a NACK."""


@dataclass
class _Pod:
    netns_fd: int
    ips: list[str]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class InPodProxies:
    """The ZDS handler; `run` hosts the per-pod listeners under the proxies' drain."""

    def __init__(
        self,
        socket_path: Path,
        *,
        state: StateStore,
        sockets: SocketFactory,
        servers: dict[int, Any],
        mark: int | None,
        on_snapshot: Any,
    ) -> None:
        self._client = ZdsClient(socket_path, self)
        self._state = state
        self._sockets = sockets
        self._servers = servers  # port -> object with serve_listener(listener, connections)
        self._mark = mark if mark is not None else netio.MESH_MARK
        self._on_snapshot = on_snapshot
        self._pods: dict[str, _Pod] = {}
        self._listeners: trio.Nursery | None = None
        self._connections: trio.Nursery | None = None

    @property
    def pod_count(self) -> int:
        return len(self._pods)

    async def run(self, connections: trio.Nursery, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._connections = connections
        try:
            async with trio.open_nursery() as nursery:
                self._listeners = nursery
                await nursery.start(self._client.run)
                task_status.started()
        finally:
            for uid in list(self._pods):
                self._release(uid)

    # --- ZdsHandler ---

    async def add(self, uid: str, workload_info: WorkloadInfo, netns_fd: int) -> None:
        held = self._pods.get(uid)
        if held is not None:
            # Replayed on agent reconnect: same netns -> keep ours; a new one -> rebuild.
            if os.fstat(held.netns_fd).st_ino == os.fstat(netns_fd).st_ino:
                os.close(netns_fd)
                return
            self._release(uid)
        workload = await self._wait_for_workload(workload_info)
        ports = sorted(self._servers)
        listeners: list[socket.socket] = []
        try:
            for port in ports:
                listeners.append(
                    await trio.to_thread.run_sync(lambda p=port: listen_in_netns(netns_fd, ("0.0.0.0", p), mark=self._mark))
                )
        except BaseException:
            for listener in listeners:
                listener.close()
            raise
        pod = _Pod(netns_fd, [str(ip) for ip in workload.addresses])
        self._pods[uid] = pod
        self._sockets.register_pod(pod.ips, netns_fd)
        assert self._listeners is not None
        self._listeners.start_soon(self._serve_pod, pod, [(self._servers[p], l) for p, l in zip(ports, listeners)])
        _log.info("pod captured", uid=uid, pod=f"{workload_info.namespace}/{workload_info.name}", ips=pod.ips)

    async def delete(self, uid: str) -> None:
        self._release(uid)
        await trio.lowlevel.checkpoint()

    async def snapshot_sent(self) -> None:
        self._on_snapshot()
        await trio.lowlevel.checkpoint()

    # --- internals ---

    def _release(self, uid: str) -> None:
        pod = self._pods.pop(uid, None)
        if pod is None:
            return
        pod.scope.cancel()
        self._sockets.unregister_pod(pod.ips)
        os.close(pod.netns_fd)
        _log.info("pod released", uid=uid)

    async def _serve_pod(self, pod: _Pod, listeners: list[tuple[Any, socket.socket]]) -> None:
        try:
            with pod.scope:
                assert self._connections is not None
                async with trio.open_nursery() as nursery:
                    for server, listener in listeners:
                        nursery.start_soon(server.serve_listener, listener, self._connections)
        finally:
            for _, listener in listeners:
                netio.close(listener)

    async def _wait_for_workload(self, info: WorkloadInfo) -> Workload:
        uid = f"Kubernetes//Pod/{info.namespace}/{info.name}"
        with trio.move_on_after(WORKLOAD_WAIT_SECONDS):
            state = self._state.current
            while (workload := state.workload_by_uid(uid)) is None or not workload.addresses:
                state = await self._state.wait_for_change(state.version)
            return workload
        raise PodNotKnown(f"no workload {uid} with an address after {WORKLOAD_WAIT_SECONDS:.0f} s")
