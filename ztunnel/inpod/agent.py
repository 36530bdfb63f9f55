"""ztunnel/inpod/agent: the node agent that hands enrolled pods' network namespaces to ztunnel.

One per node (istio-cni's node agent in Istio). The runtime calls `enroll(pod)` when a pod
becomes captured and `release(uid)` when it stops being captured; the agent keeps the
enrolled pods, each with an open fd on its netns, as its cache.

    enroll:  open netns -> install redirect rules -> cache -> Add (fd as SCM_RIGHTS) to the
             newest ztunnel -> ack
    release: uncache -> Del to every connected ztunnel -> acks -> remove redirect rules

Rules go in before ztunnel hears of the pod and come out only after ztunnel let it go, so
no connection of a captured pod ever bypasses ztunnel; in the short gaps where the rules
exist without ztunnel's listeners, new connections are refused rather than let through.

ztunnel connects to the agent's unix SEQPACKET socket (several may be connected while one
replaces another). Per connection: read ZdsHello, replay the cache (Add per pod) and
SnapshotSent, then forward Add/Del as they happen. Each connection has one task that owns
its socket and does every exchange in strict request/ack lock-step with a 5 s deadline; a
missed deadline drops the connection (ztunnel reconnects and gets a fresh snapshot). While
idle, the task checks every 5 s that ztunnel is still there (Istio's keepalive read).

Invariants:
- A connection registers, and takes its snapshot of the cache, in one step without a
  checkpoint: every pod enrolled later reaches it as a queued Add, never twice, never not.
- A queued Add sends a dup of the pod's fd, made only if the pod is still the enrolled one
  at send time, so a concurrent release or re-enroll cannot send a closed or reused fd.
"""

from __future__ import annotations

import enum
import errno
import itertools
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import trio

from meshcore import netio
from meshcore.log import get_logger
from ztunnel.inpod.netns import NetnsError, open_netns
from ztunnel.inpod.protocol import (
    WorkloadInfo,
    ZdsProtocolError,
    decode_ack,
    decode_hello,
    encode_add,
    encode_del,
    encode_snapshot_sent,
    receive_packet,
    send_packet,
)
from ztunnel.inpod.redirect import RedirectError, install_redirect, remove_redirect, stop_redirect

_log = get_logger("inpod.agent")

DEFAULT_SOCKET_PATH = Path("/var/run/ztunnel/ztunnel.sock")
# After a release, how long the reply path stays for connections ztunnel had opened to the
# app (ztunnel's own drain time, by default).
REPLY_PATH_GRACE_SECONDS = 5.0
# Istio's readWriteDeadline: for the hello, and for each request plus its ack.
REQUEST_DEADLINE = 5.0
# How often an idle connection is checked for a ztunnel that went away (Istio: 5 s).
LIVENESS_INTERVAL = 5.0


class AgentError(Exception):
    """The node agent cannot serve (socket path unusable)."""


class EnrollError(Exception):
    """A pod could not be captured or released; the message names the pod and the cause."""


@dataclass(frozen=True, kw_only=True)
class EnrolledPod:
    """A pod to capture: its Kubernetes identity and where its network namespace is."""

    uid: str  # the Kubernetes pod UID
    name: str
    namespace: str
    service_account: str
    netns_path: Path

    @property
    def info(self) -> WorkloadInfo:
        return WorkloadInfo(name=self.name, namespace=self.namespace, service_account=self.service_account)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} (uid {self.uid})"


@dataclass(frozen=True, kw_only=True)
class AgentStatistics:
    """What the agent holds right now."""

    enrolled_pods: int
    connected_ztunnels: int


@dataclass(frozen=True)
class _Enrolment:
    pod: EnrolledPod
    netns_fd: int


class _Outcome(enum.Enum):
    ACKED = "acked"
    NACKED = "nacked"
    # The connection went away first; the ztunnel gets the truth from its next snapshot.
    LOST = "lost"


class _Request:
    """One request for a connection's task; `done` is set once its outcome is known."""

    def __init__(self, uid: str, payload: bytes, enrolment: _Enrolment | None = None) -> None:
        self.uid = uid
        self.payload = payload
        self.enrolment = enrolment  # set for Add: the fd to send comes from it
        self.outcome = _Outcome.LOST
        self.done = trio.Event()

    @classmethod
    def add(cls, enrolment: _Enrolment) -> _Request:
        pod = enrolment.pod
        return cls(pod.uid, encode_add(pod.uid, pod.info), enrolment)

    def finish(self, outcome: _Outcome) -> None:
        self.outcome = outcome
        self.done.set()


class _ZtunnelGone(Exception):
    """The ztunnel closed its end of the connection."""


class _ZtunnelConnection:
    def __init__(self, sock: socket.socket, conn_id: int) -> None:
        self.sock = sock
        self.id = conn_id
        self._queue_in, self._queue_out = trio.open_memory_channel[_Request](math.inf)

    def submit(self, request: _Request) -> None:
        self._queue_in.send_nowait(request)

    async def next_request(self) -> _Request:
        return await self._queue_out.receive()

    def abandon_queued(self) -> None:
        """The connection is gone: what was queued will never be acked."""
        self._queue_in.close()
        while True:
            try:
                self._queue_out.receive_nowait().finish(_Outcome.LOST)
            except (trio.WouldBlock, trio.EndOfChannel):
                return


class NodeAgent:
    """Serves ZDS on `socket_path` and captures/releases pods for the runtime."""

    def __init__(self, socket_path: Path = DEFAULT_SOCKET_PATH, *, reply_path_grace: float = REPLY_PATH_GRACE_SECONDS) -> None:
        """`reply_path_grace`: how long a released pod keeps the reply path of the connections
        ztunnel had opened to its app (see ztunnel/inpod/redirect.py)."""
        self.socket_path = Path(socket_path)
        self._reply_path_grace = reply_path_grace
        self._pods: dict[str, _Enrolment] = {}
        self._connections: list[_ZtunnelConnection] = []
        self._conn_ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None  # while `run` serves: delayed clean-ups

    def statistics(self) -> AgentStatistics:
        return AgentStatistics(enrolled_pods=len(self._pods), connected_ztunnels=len(self._connections))

    # --- Runtime API ---

    async def enroll(self, pod: EnrolledPod) -> bool:
        """Capture `pod`: hand it to ztunnel, then redirect its traffic there.

        Returns True when a connected ztunnel acked it; False when none is connected (it
        goes out with the next snapshot) or ztunnel NACKed it (logged). Raises EnrollError
        when the netns cannot be opened or the rules not installed.
        Enrolling an enrolled pod again refreshes its rules and re-sends it.
        """
        try:
            netns_fd = open_netns(pod.netns_path)
        except NetnsError as exc:
            raise EnrollError(f"cannot enroll pod {pod}: {exc}") from exc
        enrolment = _Enrolment(pod, netns_fd)
        previous = self._pods.get(pod.uid)
        self._pods[pod.uid] = enrolment
        if previous is not None:
            os.close(previous.netns_fd)
        outcome = None
        if self._connections:
            # ztunnel's listeners first, then the rules that send traffic to them: the other
            # order refuses the connections made in between.
            request = _Request.add(enrolment)
            # Adds go to the newest connection only: that is the ztunnel taking over (Istio does the same).
            self._connections[-1].submit(request)
            await request.done.wait()
            outcome = request.outcome
        else:
            _log.info("pod enrolled, no ztunnel connected yet; it goes with the next snapshot", pod=str(pod))
        try:
            # Installed even without an ACK: a pod labelled for the mesh never talks in the clear.
            await trio.to_thread.run_sync(install_redirect, netns_fd)
        except (RedirectError, NetnsError) as exc:
            raise EnrollError(f"cannot capture pod {pod}: {exc}") from exc
        return outcome is _Outcome.ACKED

    async def release(self, uid: str) -> bool:
        """Stop capturing the pod `uid`: remove its capture rules, then Del to every connected
        ztunnel; the reply path goes `reply_path_grace` later (at once when `run` is not serving).

        Returns False when a ztunnel NACKed the Del (logged); a connection lost meanwhile does
        not count, its ztunnel drops the pod on its next snapshot. Raises EnrollError when the
        rules could not be removed. Releasing a pod that is not enrolled does nothing.
        """
        enrolment = self._pods.pop(uid, None)
        if enrolment is None:
            _log.debug("release of a pod that is not enrolled", uid=uid)
            return True
        delayed = self._nursery is not None and self._reply_path_grace > 0
        try:
            # Capture off first, so new connections go direct before ztunnel drops its listeners;
            # the reply path stays while connections ztunnel opened to the app finish.
            try:
                await trio.to_thread.run_sync(stop_redirect if delayed else remove_redirect, enrolment.netns_fd)
            except (RedirectError, NetnsError) as exc:
                delayed = False
                raise EnrollError(f"cannot release pod {enrolment.pod}: its capture rules stay: {exc}") from exc
            requests = [_Request(uid, encode_del(uid)) for _ in self._connections]
            for connection, request in zip(self._connections, requests):
                connection.submit(request)
            for request in requests:
                await request.done.wait()
        finally:
            if delayed:
                assert self._nursery is not None
                self._nursery.start_soon(self._remove_reply_path, enrolment)
            else:
                os.close(enrolment.netns_fd)
        return all(request.outcome is not _Outcome.NACKED for request in requests)

    async def _remove_reply_path(self, enrolment: _Enrolment) -> None:
        try:
            await trio.sleep(self._reply_path_grace)
            if enrolment.pod.uid in self._pods:
                return  # enrolled again meanwhile: its rules are wanted (and were reinstalled)
            await trio.to_thread.run_sync(remove_redirect, enrolment.netns_fd)
        except (RedirectError, NetnsError) as exc:
            # The pod (its netns) may be gone already; what is left there is inert.
            _log.info("reply path of a released pod not removed", pod=str(enrolment.pod), error=str(exc))
        finally:
            os.close(enrolment.netns_fd)

    def close(self) -> None:
        """Forget every enrolled pod without touching its rules (they outlive an agent restart)."""
        for enrolment in self._pods.values():
            os.close(enrolment.netns_fd)
        self._pods.clear()

    # --- Serving ztunnels ---

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on the socket path and serve every ztunnel that connects, until cancelled."""
        listener = self._bind()
        bound_inode = os.stat(self.socket_path).st_ino
        _log.info("node agent listening", path=str(self.socket_path))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    sock = await self._accept(listener)
                    nursery.start_soon(self._serve_ztunnel, sock)
        finally:
            self._nursery = None
            netio.close(listener)
            try:
                if os.stat(self.socket_path).st_ino == bound_inode:  # not a newer agent's socket
                    os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    def _bind(self) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.socket_path.parent.mkdir(parents=True, exist_ok=True)
            # A socket file left by a previous agent would make bind fail.
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
            listener.bind(str(self.socket_path))
            listener.listen(16)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            raise AgentError(f"node agent cannot listen on {self.socket_path}: {exc.strerror}") from exc
        return listener

    async def _accept(self, listener: socket.socket) -> socket.socket:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                await netio.wait_readable(listener)
                continue
            except OSError as exc:
                if exc.errno not in netio.ACCEPT_CAPACITY_ERRNOS:
                    raise
                _log.warning("node agent cannot accept a ztunnel connection now", error=str(exc))
                await trio.sleep(0.1)
                continue
            sock.setblocking(False)
            return sock

    async def _serve_ztunnel(self, sock: socket.socket) -> None:
        conn_id = next(self._conn_ids)
        log = _log.bind(conn=conn_id)
        try:
            with trio.fail_after(REQUEST_DEADLINE):
                packet = await receive_packet(sock)
            if packet is None:
                log.info("ztunnel closed the connection before its hello")
                return
            version = decode_hello(packet)
            connection = _ZtunnelConnection(sock, conn_id)
            snapshot = list(self._pods.values())
            self._connections.append(connection)
            log.info(
                "ztunnel connected", version=version, snapshot_pods=len(snapshot), connected=len(self._connections)
            )
            try:
                await self._send_snapshot(connection, snapshot)
                await self._forward_updates(connection)
            finally:
                self._connections.remove(connection)
                connection.abandon_queued()
        except _ZtunnelGone:
            log.info("ztunnel disconnected", connected=len(self._connections))
        except trio.TooSlowError:
            log.warning("ztunnel did not answer in time; dropping the connection", deadline_s=REQUEST_DEADLINE)
        except (OSError, ZdsProtocolError) as exc:
            log.warning("ztunnel connection failed; dropping it", error=str(exc))
        finally:
            netio.close(sock)

    async def _send_snapshot(self, connection: _ZtunnelConnection, snapshot: list[_Enrolment]) -> None:
        for enrolment in snapshot:
            await self._exchange(connection, _Request.add(enrolment))
        await self._exchange(connection, _Request("", encode_snapshot_sent()))

    async def _forward_updates(self, connection: _ZtunnelConnection) -> None:
        while True:
            request: _Request | None = None
            with trio.move_on_after(LIVENESS_INTERVAL):
                request = await connection.next_request()
            if request is None:
                self._check_alive(connection.sock)
                continue
            try:
                await self._exchange(connection, request)
            finally:
                if not request.done.is_set():
                    request.finish(_Outcome.LOST)

    async def _exchange(self, connection: _ZtunnelConnection, request: _Request) -> None:
        """Send one request and wait for its ack, within REQUEST_DEADLINE; finishes `request`."""
        fd = None
        if request.enrolment is not None:
            if self._pods.get(request.uid) is not request.enrolment:
                request.finish(_Outcome.LOST)  # released or re-enrolled since it was queued
                return
            fd = os.dup(request.enrolment.netns_fd)
        try:
            with trio.fail_after(REQUEST_DEADLINE):
                await send_packet(connection.sock, request.payload, fd=fd)
                packet = await receive_packet(connection.sock)
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                raise _ZtunnelGone() from exc
            raise
        finally:
            if fd is not None:
                os.close(fd)
        if packet is None:
            raise _ZtunnelGone()
        error = decode_ack(packet)
        if error:
            _log.warning("ztunnel rejected a request (NACK)", conn=connection.id, uid=request.uid or None, error=error)
        request.finish(_Outcome.NACKED if error else _Outcome.ACKED)

    def _check_alive(self, sock: socket.socket) -> None:
        """ztunnel only ever answers, so an idle connection must have nothing to read."""
        try:
            unsolicited = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if not unsolicited:
            raise _ZtunnelGone()
        raise ZdsProtocolError("ztunnel sent a message nobody asked for")
