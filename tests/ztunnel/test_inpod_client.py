"""ztunnel's ZDS client against a scripted node agent over a real unix SEQPACKET socket (no root)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from meshcore import netio
from ztunnel.inpod.client import ZdsClient
from ztunnel.inpod.protocol import (
    WorkloadInfo,
    decode_ack,
    decode_hello,
    encode_add,
    encode_del,
    encode_keep,
    encode_snapshot_sent,
    receive_packet,
    send_packet,
)

INFO = WorkloadInfo(name="details-v1-5f4d", namespace="bookinfo", service_account="bookinfo-details")


class RecordingHandler:
    """ztunnel's pod manager stand-in: records calls; `refuse` makes add() raise for a uid."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.netns_inodes: dict[str, int] = {}
        self.refuse: dict[str, str] = {}

    async def add(self, uid: str, workload_info: WorkloadInfo, netns_fd: int) -> None:
        self.calls.append(("add", uid, workload_info))
        if uid in self.refuse:
            raise RuntimeError(self.refuse[uid])
        self.netns_inodes[uid] = os.fstat(netns_fd).st_ino
        os.close(netns_fd)

    async def delete(self, uid: str) -> None:
        self.calls.append(("delete", uid))

    async def snapshot_sent(self) -> None:
        self.calls.append(("snapshot_sent",))


class ScriptedAgent:
    """The agent's end of one connection, driven step by step by a test."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def request(self, payload: bytes, *, fd: int | None = None) -> str:
        with trio.fail_after(2):
            await send_packet(self.sock, payload, fd=fd)
            return decode_ack(await receive_packet(self.sock))


@pytest.fixture
def agent_socket() -> Iterator[AgentSocket]:
    folder = tempfile.mkdtemp(prefix="zds-", dir="/tmp")  # short: unix socket paths max 107 bytes
    agent_socket = AgentSocket(Path(folder) / "ztunnel.sock")
    yield agent_socket
    agent_socket.close()
    shutil.rmtree(folder)


@pytest.fixture
def own_netns() -> Iterator[int]:
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    yield fd
    os.close(fd)


class AgentSocket:
    """The agent's listening socket; closes everything it accepted at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener: socket.socket | None = None
        self.accepted: list[socket.socket] = []

    def listen(self) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(self.path))
        self.listener.listen(4)
        self.listener.setblocking(False)

    async def accept_ztunnel(self) -> ScriptedAgent:
        assert self.listener is not None
        with trio.fail_after(3):
            await netio.wait_readable(self.listener)
            sock, _ = self.listener.accept()
            self.accepted.append(sock)
            sock.setblocking(False)
            assert decode_hello(await receive_packet(sock)) == 1
        return ScriptedAgent(sock)

    def close(self) -> None:
        for sock in [*self.accepted, self.listener]:
            if sock is not None:
                sock.close()


async def test_pods_are_handed_over_with_a_usable_netns_fd_and_acked(
    agent_socket: AgentSocket, own_netns: int, nursery
):
    agent_socket.listen()
    handler = RecordingHandler()
    await nursery.start(ZdsClient(agent_socket.path, handler).run)
    agent = await agent_socket.accept_ztunnel()

    assert await agent.request(encode_add("pod-1", INFO), fd=own_netns) == ""
    assert await agent.request(encode_snapshot_sent()) == ""
    assert await agent.request(encode_del("pod-1")) == ""
    assert handler.calls == [("add", "pod-1", INFO), ("snapshot_sent",), ("delete", "pod-1")]
    assert handler.netns_inodes["pod-1"] == os.fstat(own_netns).st_ino


async def test_handler_failure_and_bad_requests_are_nacked_and_the_session_goes_on(
    agent_socket: AgentSocket, own_netns: int, nursery
):
    agent_socket.listen()
    handler = RecordingHandler()
    handler.refuse["pod-2"] = "no workload bookinfo/details-v1-5f4d in xDS"
    await nursery.start(ZdsClient(agent_socket.path, handler).run)
    agent = await agent_socket.accept_ztunnel()

    assert await agent.request(encode_add("pod-2", INFO), fd=own_netns) == "no workload bookinfo/details-v1-5f4d in xDS"
    assert "only add may carry an fd" in await agent.request(encode_del("pod-2"), fd=own_netns)
    assert "carries no netns fd" in await agent.request(encode_add("pod-3", INFO))
    assert await agent.request(encode_del("never-added")) == ""  # nothing held: acked, handler not bothered
    assert await agent.request(encode_snapshot_sent()) == ""
    assert handler.calls == [("add", "pod-2", INFO), ("snapshot_sent",)]


async def test_reconnect_gets_a_new_snapshot_and_stale_pods_are_deleted(
    agent_socket: AgentSocket, own_netns: int, nursery
):
    agent_socket.listen()
    handler = RecordingHandler()
    await nursery.start(ZdsClient(agent_socket.path, handler).run)
    first = await agent_socket.accept_ztunnel()
    for uid in ("pod-a", "pod-b", "pod-c"):
        assert await first.request(encode_add(uid, INFO), fd=own_netns) == ""
    assert await first.request(encode_snapshot_sent()) == ""
    first.sock.close()  # the agent restarts; meanwhile pod-a was released

    second = await agent_socket.accept_ztunnel()
    handler.calls.clear()
    assert await second.request(encode_add("pod-b", INFO), fd=own_netns) == ""
    assert await second.request(encode_keep("pod-c")) == ""
    assert await second.request(encode_snapshot_sent()) == ""
    assert handler.calls == [("add", "pod-b", INFO), ("delete", "pod-a"), ("snapshot_sent",)]
    assert "after snapshot_sent" in await second.request(encode_keep("pod-c"))


async def test_client_waits_for_an_agent_that_starts_later(agent_socket: AgentSocket, nursery):
    await nursery.start(ZdsClient(agent_socket.path, RecordingHandler()).run)
    await trio.sleep(0.3)  # several failed attempts, backing off
    agent_socket.listen()
    with trio.fail_after(1.5):  # retries are at most 1 s apart
        await agent_socket.accept_ztunnel()
