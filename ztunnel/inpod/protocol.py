"""ztunnel/inpod/protocol: ZDS, the node agent <-> ztunnel hand-off of pod network namespaces.

Theory of operation (istio/ztunnel proto/zds.proto, src/inpod/protocol.rs; istio/istio
cni/pkg/nodeagent/ztunnelserver.go):

- Transport: a unix SOCK_SEQPACKET socket. The node agent listens, ztunnel connects. Every
  packet is exactly one protobuf message, no length prefix. A receiver reads into a
  1024-byte buffer; a message or ancillary data that did not fit (MSG_TRUNC / MSG_CTRUNC)
  is an error, never a partial parse.
- ztunnel speaks first: `ZdsHello{version: V1}`. The agent then replays its cache: one
  `add` per enrolled pod (`keep` when it has no netns fd for it), then `snapshot_sent`.
  Afterwards only `add` and `del`. ztunnel answers every request with one `Ack` (empty
  error = ACK, anything else = NACK) before the agent sends the next: strict lock-step.
- File descriptors: an `add` carries exactly one fd, the pod's netns, as SCM_RIGHTS. Any
  other message with an fd is an error. More than one fd: all are closed and it is an error.
  Decoding owns the received fds: on every error path they are closed here, so a bad
  packet cannot leak them.
- After `snapshot_sent`, ztunnel drops the pods the snapshot did not mention
  (`SnapshotTracker` decides which).

The codec below is sans-IO (bytes, fd numbers and recvmsg flags in; values out). The one
part that touches sockets, sending and receiving one packet, is the short section at the end.
"""

from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from meshcore import netio
from meshcore._gen import zds_pb2

# ztunnel's receive buffer; the agent's messages are far smaller (uid + three names).
MAX_MESSAGE_SIZE = 1024
# Room for more fds than the protocol allows, so that "too many" is seen and they are all
# closed, instead of the kernel truncating them away behind MSG_CTRUNC.
_ANCILLARY_FDS = 8
ANCILLARY_SIZE = socket.CMSG_SPACE(_ANCILLARY_FDS * array.array("i").itemsize)
PROTOCOL_VERSION = zds_pb2.V1


class ZdsProtocolError(Exception):
    """A ZDS packet broke the protocol; the message says what and names the field."""


# --- Messages ---


@dataclass(frozen=True, kw_only=True)
class WorkloadInfo:
    """Who the pod is: ztunnel matches this against its xDS workloads to pick the identity."""

    name: str
    namespace: str
    service_account: str


@dataclass(frozen=True, kw_only=True)
class AddWorkload:
    """Capture this pod: its netns fd is now owned by whoever received this message."""

    uid: str
    info: WorkloadInfo
    netns_fd: int


@dataclass(frozen=True, kw_only=True)
class KeepWorkload:
    """Snapshot only: keep this pod's proxy although the agent has no netns fd for it."""

    uid: str


@dataclass(frozen=True, kw_only=True)
class DelWorkload:
    """Release this pod: stop its proxy."""

    uid: str


@dataclass(frozen=True, kw_only=True)
class SnapshotSent:
    """The replay of the agent's cache is complete."""


WorkloadMessage = AddWorkload | KeepWorkload | DelWorkload | SnapshotSent


@dataclass(frozen=True, kw_only=True)
class Packet:
    """One received SEQPACKET message: payload, SCM_RIGHTS fds (owned by the receiver), flags."""

    data: bytes
    fds: tuple[int, ...]
    flags: int


# --- Encoding ---


def encode_hello() -> bytes:
    return zds_pb2.ZdsHello(version=PROTOCOL_VERSION).SerializeToString()


def encode_add(uid: str, info: WorkloadInfo) -> bytes:
    """The payload of an `add`; the netns fd travels beside it as SCM_RIGHTS."""
    workload_info = zds_pb2.WorkloadInfo(
        name=info.name, namespace=info.namespace, service_account=info.service_account
    )
    add = zds_pb2.AddWorkload(uid=uid, workload_info=workload_info)
    return zds_pb2.WorkloadRequest(add=add).SerializeToString()


def encode_keep(uid: str) -> bytes:
    return zds_pb2.WorkloadRequest(keep=zds_pb2.KeepWorkload(uid=uid)).SerializeToString()


def encode_del(uid: str) -> bytes:
    # `del` is a Python keyword, so the oneof field is passed by name.
    return zds_pb2.WorkloadRequest(**{"del": zds_pb2.DelWorkload(uid=uid)}).SerializeToString()


def encode_snapshot_sent() -> bytes:
    return zds_pb2.WorkloadRequest(snapshot_sent=zds_pb2.SnapshotSent()).SerializeToString()


def encode_ack(error: str = "") -> bytes:
    """An ACK, or a NACK when `error` is not empty."""
    return zds_pb2.WorkloadResponse(ack=zds_pb2.Ack(error=error)).SerializeToString()


# --- Decoding ---


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> tuple[int, ...]:
    """Every fd passed as SCM_RIGHTS in recvmsg's ancillary data (they are now ours)."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % fds.itemsize
            fds.frombytes(data[:usable])
    return tuple(fds)


def close_fds(fds: tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def decode_request(packet: Packet) -> WorkloadMessage:
    """A request from the agent (ztunnel side). Raises ZdsProtocolError; never leaks an fd."""
    _check_framing(packet, max_fds=1)
    request = zds_pb2.WorkloadRequest()
    try:
        request.ParseFromString(packet.data)
    except DecodeError as exc:
        close_fds(packet.fds)
        raise ZdsProtocolError(f"WorkloadRequest does not parse: {exc}") from exc
    kind = request.WhichOneof("payload")
    if kind != "add" and packet.fds:
        close_fds(packet.fds)
        raise ZdsProtocolError(f"WorkloadRequest.{kind or 'payload'}: only add may carry an fd, this one carried 1")
    if kind == "add":
        return _decode_add(request.add, packet.fds)
    if kind == "keep":
        return KeepWorkload(uid=_uid("keep", request.keep.uid))
    if kind == "del":
        return DelWorkload(uid=_uid("del", getattr(request, "del").uid))
    if kind == "snapshot_sent":
        return SnapshotSent()
    raise ZdsProtocolError("WorkloadRequest.payload is empty (an agent newer than this ztunnel?)")


def decode_hello(packet: Packet) -> int:
    """ztunnel's first message (agent side): the protocol version it speaks."""
    _check_framing(packet, max_fds=0)
    hello = zds_pb2.ZdsHello()
    try:
        hello.ParseFromString(packet.data)
    except DecodeError as exc:
        raise ZdsProtocolError(f"ZdsHello does not parse: {exc}") from exc
    if hello.version != PROTOCOL_VERSION:
        raise ZdsProtocolError(f"ZdsHello.version is {hello.version}, this agent speaks {PROTOCOL_VERSION} (V1)")
    return hello.version


def decode_ack(packet: Packet) -> str:
    """ztunnel's answer to a request (agent side): "" for ACK, else the NACK's error text."""
    _check_framing(packet, max_fds=0)
    response = zds_pb2.WorkloadResponse()
    try:
        response.ParseFromString(packet.data)
    except DecodeError as exc:
        raise ZdsProtocolError(f"WorkloadResponse does not parse: {exc}") from exc
    if response.WhichOneof("payload") != "ack":
        raise ZdsProtocolError("WorkloadResponse.ack is missing")
    return response.ack.error


def _check_framing(packet: Packet, *, max_fds: int) -> None:
    if packet.flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_fds(packet.fds)
        what = "message" if packet.flags & socket.MSG_TRUNC else "ancillary data"
        raise ZdsProtocolError(f"received a truncated ZDS {what} (messages must fit in {MAX_MESSAGE_SIZE} bytes)")
    if len(packet.fds) > max_fds:
        close_fds(packet.fds)
        raise ZdsProtocolError(f"expected at most {max_fds} fd(s) with a ZDS message, got {len(packet.fds)}")


def _decode_add(add: zds_pb2.AddWorkload, fds: tuple[int, ...]) -> AddWorkload:
    if not fds:
        raise ZdsProtocolError(f"WorkloadRequest.add for uid {add.uid!r} carries no netns fd (SCM_RIGHTS)")
    try:
        uid = _uid("add", add.uid)
        if not add.HasField("workload_info"):
            raise ZdsProtocolError(f"WorkloadRequest.add.workload_info is missing for uid {uid!r}")
        info = add.workload_info
        for field in ("name", "namespace"):
            if not getattr(info, field):
                raise ZdsProtocolError(f"WorkloadRequest.add.workload_info.{field} is empty for uid {uid!r}")
    except ZdsProtocolError:
        close_fds(fds)
        raise
    workload_info = WorkloadInfo(name=info.name, namespace=info.namespace, service_account=info.service_account)
    return AddWorkload(uid=uid, info=workload_info, netns_fd=fds[0])


def _uid(kind: str, uid: str) -> str:
    if not uid:
        raise ZdsProtocolError(f"WorkloadRequest.{kind}.uid is empty")
    return uid


# --- Snapshot reconciliation ---


class SnapshotTracker:
    """Which pods ztunnel holds proxies for, and which a fresh snapshot no longer mentions.

    A (re)connect starts a snapshot; every `add`/`keep` until `snapshot_sent` mentions a
    pod; at `snapshot_sent` the held pods not mentioned are stale (released while ztunnel
    was disconnected) and must be deleted.
    """

    def __init__(self) -> None:
        self._held: set[str] = set()
        self._mentioned: set[str] | None = None

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    def connected(self) -> None:
        self._mentioned = set()

    def added(self, uid: str) -> None:
        self._held.add(uid)
        if self._mentioned is not None:
            self._mentioned.add(uid)

    def kept(self, uid: str) -> None:
        if self._mentioned is None:
            raise ZdsProtocolError(f"WorkloadRequest.keep for uid {uid!r} after snapshot_sent (only valid before it)")
        self._mentioned.add(uid)

    def deleted(self, uid: str) -> None:
        self._held.discard(uid)
        if self._mentioned is not None:
            self._mentioned.discard(uid)

    def snapshot_complete(self) -> list[str]:
        """Ends the snapshot; returns the held uids it did not mention, to be deleted."""
        if self._mentioned is None:
            raise ZdsProtocolError("WorkloadRequest.snapshot_sent received twice on one connection")
        stale = sorted(self._held - self._mentioned)
        self._mentioned = None
        return stale


# --- SEQPACKET transport: the only part of this module that touches sockets ---


async def send_packet(sock: socket.socket, data: bytes, *, fd: int | None = None) -> None:
    """Send one message, with `fd` as SCM_RIGHTS when given. Callers bound it with a deadline."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
    while True:
        try:
            sock.sendmsg([data], ancillary)
            return
        except BlockingIOError:
            await netio.wait_writable(sock)


async def receive_packet(sock: socket.socket) -> Packet | None:
    """Receive one message; None when the peer closed the connection."""
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE_SIZE, ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            await netio.wait_readable(sock)
            continue
        fds = fds_from_ancillary(ancdata)
        # An empty read without fds is the peer's close (recvmsg echoes MSG_CMSG_CLOEXEC in flags).
        if not data and not fds and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            return None
        return Packet(data=data, fds=fds, flags=flags)
