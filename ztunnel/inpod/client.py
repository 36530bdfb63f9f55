"""ztunnel/inpod/client: ztunnel's side of ZDS, receiving pods' network namespaces from the node agent.

`ZdsClient.run` connects to the agent's socket (retrying from 10 ms, doubling, at most 1 s
apart), says hello, then turns each request into one call on the handler and answers it:
ACK when the call returned, NACK with the exception's text when it raised. When the agent
goes away it reconnects, and the agent replays its snapshot; pods held from before that
the snapshot no longer mentions are deleted through the handler before `snapshot_sent()`.

The handler (ztunnel's in-pod proxy manager) sees a simple, consistent stream:
- `add(uid, workload_info, netns_fd)`: may repeat for a uid it holds (every snapshot
  replays all pods; the fd may then be a new fd to the same netns). The fd belongs to the
  handler once `add` returns; if `add` raises, the client closes it.
- `delete(uid)`: only for uids the handler holds (added and not deleted since).
- `snapshot_sent()`: after every (re)connect, once the replay and its stale deletes are done.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Protocol

import trio

from meshcore import netio
from meshcore.log import get_logger
from ztunnel.inpod.protocol import (
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    SnapshotTracker,
    WorkloadInfo,
    WorkloadMessage,
    ZdsProtocolError,
    decode_request,
    encode_ack,
    encode_hello,
    receive_packet,
    send_packet,
)

_log = get_logger("inpod.zds")

INITIAL_RETRY_DELAY = 0.01
MAX_RETRY_DELAY = 1.0


class StaleReleaseError(Exception):
    """Pods missing from a new snapshot could not all be released; they stay held."""


class ZdsHandler(Protocol):
    """What ztunnel does with the pods the agent hands over; raising means NACK."""

    async def add(self, uid: str, workload_info: WorkloadInfo, netns_fd: int) -> None: ...

    async def delete(self, uid: str) -> None: ...

    async def snapshot_sent(self) -> None: ...


class ZdsClient:
    """Keeps a connection to the node agent at `path` and feeds `handler` from it."""

    def __init__(self, path: str | os.PathLike[str], handler: ZdsHandler) -> None:
        self.path = Path(path)
        self.handler = handler
        self._tracker = SnapshotTracker()

    @property
    def held(self) -> frozenset[str]:
        """The pod uids the handler currently holds."""
        return self._tracker.held

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected to the agent until cancelled.

        Reports started at once: being connected is not a start-up condition (the agent may
        come later or restart); ztunnel's readiness should follow `snapshot_sent()` instead.
        """
        task_status.started()
        delay = INITIAL_RETRY_DELAY
        while True:
            sock = self._connect()
            served_snapshot = False
            if sock is not None:
                try:
                    served_snapshot = await self._serve(sock)
                except OSError as exc:
                    _log.warning("connection to the node agent failed", path=str(self.path), error=str(exc))
                finally:
                    netio.close(sock)
            # Back off from an agent that is absent or keeps dropping us; a working one that
            # restarted is retried from the shortest delay again.
            if served_snapshot:
                delay = INITIAL_RETRY_DELAY
            await trio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            sock.connect(str(self.path))
        except OSError as exc:  # absent, refused, or its backlog full (EAGAIN): retry later
            _log.debug("node agent not reachable yet", path=str(self.path), error=exc.strerror)
            sock.close()
            return None
        return sock

    async def _serve(self, sock: socket.socket) -> bool:
        """One connection's life; returns whether a snapshot was completed on it."""
        await send_packet(sock, encode_hello())
        self._tracker.connected()
        _log.info("connected to the node agent", path=str(self.path))
        snapshot_done = False
        while True:
            packet = await receive_packet(sock)
            if packet is None:
                _log.info("node agent closed the connection; reconnecting", path=str(self.path))
                return snapshot_done
            try:
                message = decode_request(packet)
                await self._dispatch(message)
            except Exception as exc:  # the handler's failures, too: a NACK, never a crash
                error = str(exc) or type(exc).__name__
                handler_bug = not isinstance(exc, ZdsProtocolError)
                _log.warning("rejecting a request from the node agent (NACK)", error=error, exc_info=handler_bug)
                await send_packet(sock, encode_ack(error))
                continue
            snapshot_done = snapshot_done or isinstance(message, SnapshotSent)
            await send_packet(sock, encode_ack())

    async def _dispatch(self, message: WorkloadMessage) -> None:
        if isinstance(message, AddWorkload):
            _log.info("pod handed over", uid=message.uid, namespace=message.info.namespace, name=message.info.name)
            try:
                await self.handler.add(message.uid, message.info, message.netns_fd)
            except BaseException:
                os.close(message.netns_fd)
                raise
            self._tracker.added(message.uid)
        elif isinstance(message, KeepWorkload):
            self._tracker.kept(message.uid)
        elif isinstance(message, DelWorkload):
            if message.uid in self._tracker.held:
                _log.info("pod released", uid=message.uid)
                await self.handler.delete(message.uid)
            self._tracker.deleted(message.uid)
        else:
            await self._complete_snapshot()

    async def _complete_snapshot(self) -> None:
        failures: list[str] = []
        for uid in self._tracker.snapshot_complete():
            _log.info("pod no longer in the agent's snapshot; releasing it", uid=uid)
            try:
                await self.handler.delete(uid)
            except Exception as exc:
                failures.append(f"delete {uid}: {exc}")
                continue
            self._tracker.deleted(uid)
        await self.handler.snapshot_sent()
        if failures:
            raise StaleReleaseError("snapshot applied, but releasing stale pods failed: " + "; ".join(failures))
