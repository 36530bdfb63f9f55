"""The Kubernetes node agent (`ztunnel-node-agent`): the pure rules, then the real thing.

The real thing runs the console script against the session's kube-apiserver with
`--proc /proc`; a "pod" is a network namespace with a veth pair (both ends inside) carrying a 198.18.x
address (no route anywhere) and a `sleep` living in it, plus a Pod object bound to a node
of the test's own name whose status the test patches to Running. A ZDS client plays
ztunnel. Root only; everything created is removed, also on failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import kubernetes.client
import pytest
import trio

from ztunnel.inpod.client import ZdsClient
from ztunnel.inpod.kube import (
    NetnsCandidate,
    NetnsLookupError,
    local_ipv4_addresses,
    netns_for_ip,
    pod_view,
    pods_to_capture,
)
from ztunnel.inpod.protocol import WorkloadInfo
from ztunnel.inpod.redirect import TABLE

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.1
              /32 host LOCAL
     +-- 198.18.7.0/24 2 0 2
           |-- 198.18.7.0
              /24 link UNICAST
           |-- 198.18.7.9
              /24 link UNICAST
              /32 host LOCAL
        |-- 198.18.7.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
           |-- 198.18.7.9
              /32 host LOCAL
"""


def test_local_addresses_are_the_host_local_leaves_without_loopback():
    assert local_ipv4_addresses(FIB_TRIE) == {"198.18.7.9"}


def test_pod_ip_maps_to_the_one_non_host_netns_that_owns_it():
    host = NetnsCandidate(inode=1, path=Path("/proc/1/ns/net"), addresses=frozenset({"10.0.0.1", "198.18.7.9"}))
    pod = NetnsCandidate(inode=2, path=Path("/proc/42/ns/net"), addresses=frozenset({"198.18.7.9"}))
    other = NetnsCandidate(inode=3, path=Path("/proc/43/ns/net"), addresses=frozenset({"198.18.7.10"}))
    assert netns_for_ip("198.18.7.9", [host, pod, other], host_inodes={1}) == Path("/proc/42/ns/net")
    with pytest.raises(NetnsLookupError, match="no network namespace"):
        netns_for_ip("198.18.7.11", [host, pod, other], host_inodes={1})
    twin = NetnsCandidate(inode=4, path=Path("/proc/44/ns/net"), addresses=frozenset({"198.18.7.9"}))
    with pytest.raises(NetnsLookupError, match="2 network namespaces"):
        netns_for_ip("198.18.7.9", [host, pod, twin], host_inodes={1})


def _pod(uid: str, *, labels=None, phase="Running", ip="198.18.7.9", host_network=False, namespace="demo") -> dict:
    return {
        "metadata": {"uid": uid, "name": f"p-{uid}", "namespace": namespace, "labels": labels or {}},
        "spec": {"hostNetwork": host_network, "serviceAccountName": "app"},
        "status": {"phase": phase, "podIP": ip},
    }


def test_capture_follows_the_one_machine_rule_for_running_pods_with_their_own_netns():
    pods = [
        pod_view(_pod("ns-label")),
        pod_view(_pod("opt-out", labels={"istio.io/dataplane-mode": "none"})),
        pod_view(_pod("pending", phase="Pending", ip="")),
        pod_view(_pod("host", host_network=True)),
        pod_view(_pod("pod-label", labels={"istio.io/dataplane-mode": "ambient"}, namespace="plain")),
        pod_view(_pod("plain", namespace="plain")),
    ]
    labels = {"demo": {"istio.io/dataplane-mode": "ambient"}, "plain": {}}
    assert set(pods_to_capture(pods, labels)) == {"ns-label", "pod-label"}


# --- against the API server, in a real netns ---


def _why_not_root() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    return f"needs {', '.join(missing)} on PATH" if missing else None


AGENT = Path(sys.executable).parent / "ztunnel-node-agent"
WAIT_SECONDS = 10.0


class RecordingZtunnel:
    """ztunnel's side of ZDS for this test: what it was told, and the capture rules at each Add."""

    def __init__(self) -> None:
        self.adds: list[tuple[str, WorkloadInfo]] = []
        self.deletes: list[str] = []

    async def add(self, uid: str, workload_info: WorkloadInfo, netns_fd: int) -> None:
        os.close(netns_fd)
        self.adds.append((uid, workload_info))

    async def delete(self, uid: str) -> None:
        self.deletes.append(uid)

    async def snapshot_sent(self) -> None:
        pass


@pytest.fixture
def pod_netns() -> Iterator[tuple[str, str]]:
    """(netns name, IP): a namespace with a veth pair (both ends inside, no way out) holding the IP, and a process in it."""
    name = f"nak-{secrets.token_hex(3)}"
    # A rarely used corner of 198.18/15, so no other test's namespace holds the same address.
    address = f"198.18.{200 + secrets.randbelow(50)}.{2 + secrets.randbelow(250)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    sleeper = None
    try:
        for command in (["link", "set", "lo", "up"], ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                        ["addr", "add", f"{address}/32", "dev", "eth0"], ["link", "set", "eth0", "up"]):  # fmt: skip
            subprocess.run(["ip", "-n", name, *command], check=True)
        sleeper = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "600"])
        yield name, address
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        subprocess.run(["ip", "netns", "del", name], check=False)


def capture_rules_present(netns: str) -> bool:
    # The redirect rules: after a release their (empty) table stays a few seconds for the
    # connections already redirected.
    listing = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "ruleset"], capture_output=True, text=True, check=True)
    return f"table ip {TABLE}" in listing.stdout and "redirect to" in listing.stdout


async def eventually(condition, what: str) -> None:
    with trio.move_on_after(WAIT_SECONDS):
        while not await trio.to_thread.run_sync(condition):
            await trio.sleep(0.05)
        return
    pytest.fail(f"{what} (waited {WAIT_SECONDS:g} s)")


@pytest.mark.root
@pytest.mark.skipif(_why_not_root() is not None, reason=_why_not_root() or "")
async def test_agent_captures_a_labelled_pod_and_releases_it_when_unlabelled_or_deleted(kube_apiserver, kube_namespace, pod_netns, tmp_path, nursery):
    netns, address = pod_netns
    core = kubernetes.client.CoreV1Api(kube_apiserver.api_client)
    node = f"node-{secrets.token_hex(3)}"
    pod = core.create_namespaced_pod(kube_namespace, {
        "metadata": {"name": "app"},
        "spec": {"nodeName": node, "serviceAccountName": "default", "containers": [{"name": "app", "image": "app"}]},
    })  # fmt: skip
    core.patch_namespaced_pod_status("app", kube_namespace, {"status": {"phase": "Running", "podIP": address}}, _content_type="application/merge-patch+json")
    # Short: unix socket paths are at most 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="nak-", dir="/tmp"))
    socket_path = folder / "ztunnel.sock"
    agent = subprocess.Popen(
        [AGENT, "--node-name", node, "--socket", socket_path, "--proc", "/proc", "--kubeconfig", kube_apiserver.kubeconfig, "--log-level", "debug"],
        stdout=(tmp_path / "agent.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    ztunnel = RecordingZtunnel()
    try:
        nursery.start_soon(ZdsClient(socket_path, ztunnel).run)

        def annotation() -> str | None:
            return (core.read_namespaced_pod("app", kube_namespace).metadata.annotations or {}).get("ambient.istio.io/redirection")

        def why() -> str:
            return f"agent log:\n{(tmp_path / 'agent.log').read_text()[-3000:]}"

        await eventually(lambda: ztunnel.adds, f"ztunnel got no Add for the pod; {why()}")
        uid, info = ztunnel.adds[0]
        assert uid == pod.metadata.uid
        assert (info.namespace, info.name, info.service_account) == (kube_namespace, "app", "default")
        assert capture_rules_present(netns), "the capture rules are not in the pod's netns"
        await eventually(lambda: annotation() == "enabled", f"the pod was not annotated redirection=enabled; {why()}")

        core.patch_namespace(kube_namespace, {"metadata": {"labels": {"istio.io/dataplane-mode": None}}}, _content_type="application/merge-patch+json")
        await eventually(lambda: ztunnel.deletes == [uid], f"ztunnel got no Del after the namespace was unlabelled; {why()}")
        assert not capture_rules_present(netns), "the capture rules outlived the release"
        assert annotation() is None

        # Labelled again, the running pod is captured again without a restart; deleted, it is released.
        core.patch_namespace(kube_namespace, {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}}, _content_type="application/merge-patch+json")
        await eventually(lambda: len(ztunnel.adds) == 2, f"ztunnel got no second Add after relabelling; {why()}")
        assert capture_rules_present(netns)
        core.delete_namespaced_pod("app", kube_namespace, grace_period_seconds=0)
        await eventually(lambda: ztunnel.deletes == [uid, uid], f"ztunnel got no Del after the pod was deleted; {why()}")
        assert not capture_rules_present(netns)
        assert agent.poll() is None, why()
    finally:
        nursery.cancel_scope.cancel()
        agent.terminate()
        agent.wait(timeout=10)
        shutil.rmtree(folder)
