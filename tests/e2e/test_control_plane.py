"""files source -> istiod_lite -> delta xDS + CA -> two ztunnels -> traffic, all real, on loopback.

What an operator would see: pods written as YAML become workloads both ztunnels know, the
ztunnels get their certificates from istiod_lite's CA with their node tokens, traffic flows
with mTLS, and an AuthorizationPolicy written to the directory denies the flow within 1 s.
With istiod_lite stopped the ztunnels keep serving (static stability).
"""

from __future__ import annotations

import ipaddress
import random
import time
from pathlib import Path

import pytest
import trio
import yaml

from istiod_lite.app import IstiodLite
from istiod_lite.config import IstiodConfig
from ztunnel.app import Ztunnel
from ztunnel.config import load_config
from ztunnel.devsetup import DevNode, write_node_config

from ..component.conftest import ECHO_PORT, echo_server


def pod(name: str, ip: str, node: str, labels: dict | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo", "labels": {"app": name, **(labels or {})}},
        "spec": {"nodeName": node, "serviceAccountName": name, "containers": [{"name": "app", "image": "x", "ports": [{"containerPort": ECHO_PORT, "name": "http"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": [{"type": "Ready", "status": "True"}]},
    }


def _labels_of(zt, metric: str, label: str, value: str) -> dict:
    """The full label set of the first `metric` series whose `label` is `value` ({} if none)."""
    for family in zt.registry.collect():
        for sample in family.samples:
            if sample.name == metric and sample.labels.get(label) == value:
                return sample.labels
    return {"no": "such series"}


async def socks5_roundtrip(socks: tuple[str, int], source_ip: str, target: tuple[str, int], payload: bytes) -> tuple[int, bytes]:
    sock = trio.socket.socket()
    await sock.bind((source_ip, 0))
    await sock.connect(socks)
    stream = trio.SocketStream(sock)
    try:
        await stream.send_all(b"\x05\x01\x00")
        await stream.receive_some(2)
        await stream.send_all(b"\x05\x01\x00\x01" + ipaddress.IPv4Address(target[0]).packed + target[1].to_bytes(2, "big"))
        reply = await stream.receive_some(10)
        if len(reply) < 2 or reply[1] != 0:
            return (reply[1] if len(reply) > 1 else -1), b""
        await stream.send_all(payload)
        received = b""
        with trio.fail_after(5):
            while len(received) < len(payload):
                chunk = await stream.receive_some()
                if not chunk:
                    break
                received += chunk
        return 0, received
    finally:
        await stream.aclose()


@pytest.fixture
async def control_plane_mesh(tmp_path: Path, nursery: trio.Nursery):
    net = f"127.{random.randint(20, 250)}.{random.randint(0, 255)}"
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "apps.yaml").write_text(yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}}},
        pod("client", f"{net}.11", "node-a"),
        pod("server", f"{net}.12", "node-b"),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "server", "namespace": "demo"},
         "spec": {"selector": {"app": "server"}, "clusterIP": f"{net}.100", "ports": [{"port": 80, "targetPort": ECHO_PORT}]}},
    ]))
    istiod = IstiodLite(IstiodConfig.for_files(manifests, root_dir=tmp_path / "istiod", listen_address=f"{net}.5", poll_interval=0.1))
    await nursery.start(istiod.run)
    ztunnels = {}
    for node, address in (("node-a", f"{net}.1"), ("node-b", f"{net}.2")):
        token_file = tmp_path / f"{node}.token"
        token_file.write_text(istiod.node_token(node))
        config = write_node_config(
            tmp_path, DevNode(node, address),
            control_plane={"address": f"{net}.5:15012", "tokenFile": token_file.name, "rootCert": "root-cert.pem"},
            drain_seconds=1,
        )
        (tmp_path / "root-cert.pem").write_bytes(istiod.root_pem)
        zt = Ztunnel(load_config(config))
        await nursery.start(zt.run)
        ztunnels[node] = zt
    await nursery.start(echo_server, f"{net}.12", ECHO_PORT)
    with trio.fail_after(10):
        for zt in ztunnels.values():
            while not zt.readiness.ready:
                await trio.sleep(0.05)
    return net, manifests, istiod, ztunnels


async def test_traffic_flows_then_policy_denies_within_one_second(control_plane_mesh):
    net, manifests, istiod, ztunnels = control_plane_mesh
    socks = (f"{net}.1", 15080)
    status, echoed = await socks5_roundtrip(socks, f"{net}.11", (f"{net}.12", ECHO_PORT), b"through istiod_lite")
    assert (status, echoed) == (0, b"through istiod_lite")
    # Through the Service VIP too: ztunnel A picks the endpoint from xDS state.
    status, echoed = await socks5_roundtrip(socks, f"{net}.11", (f"{net}.100", 80), b"via the VIP")
    assert (status, echoed) == (0, b"via the VIP")
    # Both ends name the Service the client addressed (the destination learns it from `forwarded`).
    for zt in ztunnels.values():
        with trio.fail_after(5):
            while not zt.registry.get_sample_value(
                "istio_tcp_connections_opened_total",
                {**_labels_of(zt, "istio_tcp_connections_opened_total", "destination_service", "server.demo.svc.cluster.local")},
            ):
                await trio.sleep(0.05)

    (manifests / "deny.yaml").write_text(yaml.safe_dump({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-client", "namespace": "demo"},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}]},
    }))
    written = time.monotonic()
    while True:
        status, _ = await socks5_roundtrip(socks, f"{net}.11", (f"{net}.12", ECHO_PORT), b"x")
        if status == 2:  # SOCKS5 "not allowed": the destination ztunnel answered 401
            break
        assert time.monotonic() - written < 1.0, "policy not enforced within 1 s"
        await trio.sleep(0.02)


async def test_ztunnels_keep_serving_without_istiod(control_plane_mesh):
    net, manifests, istiod, ztunnels = control_plane_mesh
    socks = (f"{net}.1", 15080)
    istiod.stop()
    await istiod.stopped.wait()
    status, echoed = await socks5_roundtrip(socks, f"{net}.11", (f"{net}.12", ECHO_PORT), b"static stability")
    assert (status, echoed) == (0, b"static stability")


async def test_open_connection_survives_istiod_restart_and_ztunnels_resync(control_plane_mesh, nursery):
    net, manifests, istiod, ztunnels = control_plane_mesh
    socks = (f"{net}.1", 15080)
    sock = trio.socket.socket()
    await sock.bind((f"{net}.11", 0))
    await sock.connect(socks)
    stream = trio.SocketStream(sock)
    await stream.send_all(b"\x05\x01\x00")
    await stream.receive_some(2)
    await stream.send_all(b"\x05\x01\x00\x01" + ipaddress.IPv4Address(f"{net}.12").packed + ECHO_PORT.to_bytes(2, "big"))
    assert (await stream.receive_some(10))[1] == 0

    istiod.stop()
    await istiod.stopped.wait()
    # Same root and node tokens on disk: the restarted control plane is the same mesh.
    restarted = IstiodLite(istiod.config)
    await nursery.start(restarted.run)
    (manifests / "more.yaml").write_text(yaml.safe_dump(pod("late", f"{net}.13", "node-b")))
    late_uid = "Kubernetes//Pod/demo/late"
    with trio.fail_after(10):
        while any(zt.state.current.workload_by_uid(late_uid) is None for zt in ztunnels.values()):
            await trio.sleep(0.05)

    # The connection opened before the restart still carries bytes.
    await stream.send_all(b"still here")
    with trio.fail_after(5):
        assert await stream.receive_some(10) == b"still here"
    await stream.aclose()
