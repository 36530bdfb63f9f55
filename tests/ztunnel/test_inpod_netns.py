"""In-pod capture in real network namespaces: redirect rules, netns sockets, agent <-> ztunnel.

Root only. Each test creates its own namespaces (a "pod" and a "remote" joined by a veth
pair, 198.18.0.0/24, no route anywhere else) and deletes them afterwards, also on failure;
deleting a namespace takes its links, rules and routes with it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from meshcore import netio
from ztunnel.inpod.agent import EnrolledPod, EnrollError, NodeAgent
from ztunnel.inpod.client import ZdsClient
from ztunnel.inpod.netns import NetnsError, connect_socket_in_netns, in_netns, listen_in_netns, open_netns
from ztunnel.inpod.protocol import WorkloadInfo
from ztunnel.inpod.redirect import REPLY_TABLE, TABLE, install_redirect, remove_redirect


def _why_no_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} on PATH"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` is not usable here"
    return None


pytestmark = [pytest.mark.root, pytest.mark.skipif(_why_no_netns() is not None, reason=_why_no_netns() or "")]

POD_IP = "198.18.0.2"
REMOTE_IP = "198.18.0.1"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Netns:
    name: str
    fd: int

    @property
    def path(self) -> Path:
        return Path("/var/run/netns") / self.name


@pytest.fixture
def make_netns() -> Iterator[Callable[[str], Netns]]:
    """Creates namespaces (lo up) on demand; all of them are deleted at the end."""
    created: list[Netns] = []

    def make(role: str) -> Netns:
        name = f"zt-test-{role}-{secrets.token_hex(3)}"
        ip("netns", "add", name)
        try:
            ip("-n", name, "link", "set", "lo", "up")
            namespace = Netns(name, open_netns(f"/var/run/netns/{name}"))
        except BaseException:
            subprocess.run(["ip", "netns", "del", name], check=False)
            raise
        created.append(namespace)
        return namespace

    try:
        yield make
    finally:
        for namespace in created:
            os.close(namespace.fd)
            subprocess.run(["ip", "netns", "del", namespace.name], check=False)


@pytest.fixture
def pod_and_remote(make_netns) -> tuple[Netns, Netns]:
    pod, remote = make_netns("pod"), make_netns("rmt")
    suffix = secrets.token_hex(3)
    pod_end, remote_end = f"zp{suffix}", f"zr{suffix}"
    ip("link", "add", pod_end, "netns", pod.name, "type", "veth", "peer", "name", remote_end, "netns", remote.name)
    for namespace, device, address in ((pod, pod_end, POD_IP), (remote, remote_end, REMOTE_IP)):
        ip("-n", namespace.name, "addr", "add", f"{address}/24", "dev", device)
        ip("-n", namespace.name, "link", "set", device, "up")
    return pod, remote


def app_socket(namespace: Netns) -> socket.socket:
    """A plain application socket in the namespace: no mark, so capture applies to it."""
    sock = in_netns(namespace.fd, socket.socket, socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


def app_listener(namespace: Netns, address: tuple[str, int]) -> socket.socket:
    sock = app_socket(namespace)
    sock.bind(address)
    sock.listen(8)
    return sock


async def connect(sock: socket.socket, address: tuple[str, int]) -> None:
    try:
        sock.connect(address)
    except BlockingIOError:
        await netio.wait_writable(sock)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))


async def accept_one(listener: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    with trio.fail_after(3):
        return await netio.accept(listener)


def nothing_pending(listener: socket.socket) -> bool:
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return True
    return False


def tables(namespace: Netns) -> set[str]:
    """The names of the nft tables in the namespace."""
    return {line.split()[-1] for line in in_netns(namespace.fd, _nft_tables).splitlines() if line.startswith("table ")}


def ruleset(namespace: Netns) -> str:
    return in_netns(namespace.fd, lambda: subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout)


def capture_state(namespace: Netns) -> str:
    """What of the capture setup exists in the namespace, as `nft`/`ip` print it."""

    def read() -> str:
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
        rules = subprocess.run(["ip", "rule"], capture_output=True, text=True, check=True).stdout
        # A table that never had a route is "does not exist" (exit 2): empty, for our purpose.
        routes = subprocess.run(["ip", "route", "show", "table", "100"], capture_output=True, text=True).stdout
        return tables + rules + routes

    return in_netns(namespace.fd, read)


# --- Redirect rules ---


async def test_pod_outbound_tcp_lands_on_15001_with_its_original_destination(pod_and_remote):
    pod, _ = pod_and_remote
    install_redirect(pod.fd)
    with listen_in_netns(pod.fd, ("0.0.0.0", 15001)) as outbound, app_socket(pod) as app:
        await connect(app, (REMOTE_IP, 8080))
        accepted, _ = await accept_one(outbound)
        with accepted:
            assert netio.original_destination(accepted) == (REMOTE_IP, 8080)


async def test_ztunnel_marked_sockets_bypass_capture_and_leave_with_the_pod_ip(pod_and_remote):
    pod, remote = pod_and_remote
    install_redirect(pod.fd)
    with (
        listen_in_netns(pod.fd, ("0.0.0.0", 15001)) as outbound,
        listen_in_netns(remote.fd, (REMOTE_IP, 8080), mark=0) as server,
        connect_socket_in_netns(pod.fd) as upstream,
    ):
        await connect(upstream, (REMOTE_IP, 8080))
        accepted, peer = await accept_one(server)
        accepted.close()
        assert peer[0] == POD_IP
        assert nothing_pending(outbound)


async def test_inbound_tcp_lands_on_15006_but_hbone_15008_is_not_redirected(pod_and_remote):
    pod, remote = pod_and_remote
    install_redirect(pod.fd)
    with (
        listen_in_netns(pod.fd, ("0.0.0.0", 15006)) as plaintext,
        listen_in_netns(pod.fd, ("0.0.0.0", 15008)) as hbone,
        app_socket(remote) as client,
        app_socket(remote) as mesh_client,
    ):
        await connect(client, (POD_IP, 9080))
        accepted, peer = await accept_one(plaintext)
        with accepted:
            assert netio.original_destination(accepted) == (POD_IP, 9080)
            assert peer[0] == REMOTE_IP
        await connect(mesh_client, (POD_IP, 15008))
        accepted, _ = await accept_one(hbone)
        accepted.close()
        assert nothing_pending(plaintext)


async def test_pod_to_its_own_ip_over_loopback_is_not_captured(pod_and_remote):
    pod, _ = pod_and_remote
    install_redirect(pod.fd)
    with (
        listen_in_netns(pod.fd, ("0.0.0.0", 15001)) as outbound,
        listen_in_netns(pod.fd, ("0.0.0.0", 15006)) as plaintext,
        app_listener(pod, (POD_IP, 7070)) as app_server,
        app_socket(pod) as app_client,
    ):
        await connect(app_client, (POD_IP, 7070))
        accepted, _ = await accept_one(app_server)
        accepted.close()
        assert nothing_pending(outbound) and nothing_pending(plaintext)


async def test_transparent_connection_to_the_app_gets_its_replies_back_through_lo(pod_and_remote):
    """ztunnel connects to the app with the remote client's address as source; the app's
    replies must come back to ztunnel, not leave the pod (connmark + table 100)."""
    pod, _ = pod_and_remote

    def spoofing_socket() -> socket.socket:
        sock = connect_socket_in_netns(pod.fd)
        sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
        sock.bind((REMOTE_IP, 0))
        return sock

    install_redirect(pod.fd)
    with app_listener(pod, (POD_IP, 9080)) as app_server, spoofing_socket() as upstream:
        with trio.fail_after(2):
            await connect(upstream, (POD_IP, 9080))
        accepted, peer = await accept_one(app_server)
        with accepted:
            assert peer[0] == REMOTE_IP
            await netio.send_all(accepted, b"reply")
            buffer = bytearray(16)
            with trio.fail_after(2):
                assert buffer[: await netio.recv_into(upstream, buffer)] == b"reply"

    remove_redirect(pod.fd)
    with app_listener(pod, (POD_IP, 9081)) as app_server, spoofing_socket() as upstream:
        with trio.move_on_after(0.5) as unanswered:  # the SYN-ACK now leaves to the remote
            await connect(upstream, (POD_IP, 9081))
        assert unanswered.cancelled_caught


async def test_rules_are_idempotent_and_removal_restores_direct_connectivity(pod_and_remote):
    pod, remote = pod_and_remote
    before = capture_state(pod)
    install_redirect(pod.fd)
    install_redirect(pod.fd)
    installed = capture_state(pod)
    assert TABLE in installed and installed.count("fwmark 0x111/0xfff lookup 100") == 1

    remove_redirect(pod.fd)
    remove_redirect(pod.fd)
    assert capture_state(pod) == before
    with listen_in_netns(remote.fd, (REMOTE_IP, 8080), mark=0) as server, app_socket(pod) as app:
        await connect(app, (REMOTE_IP, 8080))
        accepted, _ = await accept_one(server)
        accepted.close()


def test_open_netns_rejects_what_is_not_a_network_namespace(tmp_path: Path):
    with pytest.raises(NetnsError, match="cannot open network namespace .*missing"):
        open_netns(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(NetnsError, match="is not a namespace file"):
        open_netns(tmp_path / "file")
    with pytest.raises(NetnsError, match="not a network namespace"):
        open_netns("/proc/self/ns/uts")


# --- Node agent <-> ztunnel over the real socket ---


class PodManager:
    """ztunnel's side for these tests: records what it was told and what it saw in the netns."""

    def __init__(self, *, refuse: frozenset[str] = frozenset()) -> None:
        self.refuse = refuse
        self.calls: list[tuple[str, ...]] = []
        self.rules_present_at_add: dict[str, bool] = {}
        self.snapshots = trio.Semaphore(0)
        self.on_add: Callable[[str, int], object] | None = None

    async def add(self, uid: str, workload_info: WorkloadInfo, netns_fd: int) -> None:
        self.calls.append(("add", uid))
        if uid in self.refuse:
            raise RuntimeError(f"no workload {workload_info.namespace}/{workload_info.name} known")
        try:
            self.rules_present_at_add[uid] = TABLE in in_netns(netns_fd, _nft_tables)
            if self.on_add is not None:
                await self.on_add(uid, netns_fd)
        finally:
            os.close(netns_fd)

    async def delete(self, uid: str) -> None:
        self.calls.append(("delete", uid))

    async def snapshot_sent(self) -> None:
        self.calls.append(("snapshot_sent",))
        self.snapshots.release()

    async def wait_snapshot(self) -> None:
        with trio.fail_after(3):
            await self.snapshots.acquire()


def _nft_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def socket_path() -> Iterator[Path]:
    folder = tempfile.mkdtemp(prefix="zds-", dir="/tmp")  # short: unix socket paths max 107 bytes
    yield Path(folder) / "ztunnel.sock"
    shutil.rmtree(folder)


REPLY_PATH_GRACE = 0.3


@pytest.fixture
async def agent(socket_path: Path, nursery) -> Iterator[NodeAgent]:
    node_agent = NodeAgent(socket_path, reply_path_grace=REPLY_PATH_GRACE)
    await nursery.start(node_agent.run)
    yield node_agent
    node_agent.close()


def pod_in(namespace: Netns, uid: str) -> EnrolledPod:
    return EnrolledPod(uid=uid, name=f"app-{uid}", namespace="demo", service_account="app", netns_path=namespace.path)


async def start_killable(nursery: trio.Nursery, run) -> trio.CancelScope:
    """Starts `run` under its own cancel scope, so a test can kill it like a crash."""
    scope = trio.CancelScope()

    async def killable(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await run(task_status=task_status)

    await nursery.start(killable)
    return scope


async def start_ztunnel(nursery: trio.Nursery, path: Path, manager: PodManager) -> trio.CancelScope:
    return await start_killable(nursery, ZdsClient(path, manager).run)


async def test_agent_replays_its_pods_to_every_reconnecting_ztunnel(agent: NodeAgent, make_netns, nursery):
    first_pod, second_pod = make_netns("pod1"), make_netns("pod2")
    assert await agent.enroll(pod_in(first_pod, "uid-1")) is False  # no ztunnel yet: cached

    first = PodManager()
    crash = await start_ztunnel(nursery, agent.socket_path, first)
    await first.wait_snapshot()
    assert await agent.enroll(pod_in(second_pod, "uid-2")) is True
    assert first.calls == [("add", "uid-1"), ("snapshot_sent",), ("add", "uid-2")]
    # A pod enrolled while no ztunnel listens is captured at once (it never talks in the clear);
    # one enrolled while ztunnel is connected gets its rules only after ztunnel's listeners
    # exist, so no connection is refused in between.
    assert first.rules_present_at_add == {"uid-1": True, "uid-2": False}
    assert TABLE in capture_state(second_pod)

    crash.cancel()
    second = PodManager()
    await start_ztunnel(nursery, agent.socket_path, second)
    await second.wait_snapshot()
    assert second.calls == [("add", "uid-1"), ("add", "uid-2"), ("snapshot_sent",)]

    assert await agent.release("uid-1") is True
    assert second.calls[-1] == ("delete", "uid-1")
    # The redirects are gone before the Del; what connections already redirected (or opened
    # by ztunnel to the app) need stays a moment longer, then nothing is left.
    assert "redirect" not in ruleset(first_pod) and tables(first_pod) == {TABLE, REPLY_TABLE}
    assert "redirect" in ruleset(second_pod)
    assert agent.statistics().enrolled_pods == 1
    await trio.sleep(REPLY_PATH_GRACE + 0.5)
    assert tables(first_pod) == set() and "lookup 100" not in capture_state(first_pod)
    assert "redirect" in ruleset(second_pod)


async def test_a_nack_is_reported_and_the_agent_carries_on(agent: NodeAgent, make_netns, nursery):
    refused, accepted = make_netns("pod1"), make_netns("pod2")
    manager = PodManager(refuse=frozenset({"uid-bad"}))
    await start_ztunnel(nursery, agent.socket_path, manager)
    await manager.wait_snapshot()
    assert await agent.enroll(pod_in(refused, "uid-bad")) is False
    assert await agent.enroll(pod_in(accepted, "uid-good")) is True
    assert manager.calls[-2:] == [("add", "uid-bad"), ("add", "uid-good")]


async def test_ztunnel_follows_an_agent_restart_and_drops_pods_it_no_longer_has(
    socket_path: Path, make_netns, nursery
):
    kept, forgotten = make_netns("pod1"), make_netns("pod2")
    manager = PodManager()
    await start_ztunnel(nursery, socket_path, manager)

    old_agent = NodeAgent(socket_path)
    old_agent_scope = await start_killable(nursery, old_agent.run)
    await old_agent.enroll(pod_in(kept, "uid-kept"))
    await old_agent.enroll(pod_in(forgotten, "uid-forgotten"))
    await manager.wait_snapshot()
    assert manager.calls.count(("add", "uid-kept")) == 1 and manager.calls.count(("add", "uid-forgotten")) == 1
    old_agent_scope.cancel()
    old_agent.close()

    new_agent = NodeAgent(socket_path)
    try:
        await new_agent.enroll(pod_in(kept, "uid-kept"))
        await nursery.start(new_agent.run)
        await manager.wait_snapshot()
        assert ("delete", "uid-forgotten") in manager.calls[-3:]
        assert manager.calls[-1] == ("snapshot_sent",)
    finally:
        new_agent.close()


async def test_the_netns_fd_ztunnel_receives_serves_listeners_inside_the_pod(
    agent: NodeAgent, make_netns, nursery
):
    pod = make_netns("pod")
    received = trio.Event()

    async def listen_and_be_dialed(uid: str, netns_fd: int) -> None:
        with listen_in_netns(netns_fd, ("127.0.0.1", 15001)) as listener:
            dial = "import socket; socket.create_connection(('127.0.0.1', 15001), 2).sendall(b'hello')"
            command = ["ip", "netns", "exec", pod.name, sys.executable, "-c", dial]
            async with trio.open_nursery() as inner:
                inner.start_soon(trio.run_process, command)
                accepted, _ = await accept_one(listener)
                with accepted:
                    buffer = bytearray(16)
                    with trio.fail_after(3):
                        assert buffer[: await netio.recv_into(accepted, buffer)] == b"hello"
        received.set()

    manager = PodManager()
    manager.on_add = listen_and_be_dialed
    await start_ztunnel(nursery, agent.socket_path, manager)
    await manager.wait_snapshot()
    assert await agent.enroll(pod_in(pod, "uid-1")) is True
    assert received.is_set()


async def test_enrolling_a_pod_whose_netns_is_gone_fails_cleanly(agent: NodeAgent, tmp_path: Path):
    ghost = EnrolledPod(
        uid="uid-x", name="ghost", namespace="demo", service_account="app", netns_path=tmp_path / "gone"
    )
    with pytest.raises(EnrollError, match=r"cannot enroll pod demo/ghost \(uid uid-x\).*cannot open network namespace"):
        await agent.enroll(ghost)
    assert agent.statistics().enrolled_pods == 0
