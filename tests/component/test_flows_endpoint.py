"""Two ztunnels on loopback: connections show up as flow events on /debug/flows (port 15020),
allowed or denied, with the identities of both ends and the policy that decided."""

from __future__ import annotations

import urllib.request

import trio

from meshcore.flows import FlowEvent, parse_line

from .conftest import ECHO_PORT, LoopbackMesh
from .test_ztunnel_loopback import socks5_connect, wait_for

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
SERVER = "spiffe://cluster.local/ns/default/sa/server"


async def flows(zt) -> list[FlowEvent]:
    def get() -> bytes:
        with urllib.request.urlopen(f"http://{zt.config.address}:15020/debug/flows", timeout=5) as resp:
            assert resp.headers["content-type"] == "application/x-ndjson"
            return resp.read()

    body = await trio.to_thread.run_sync(get)
    return [parse_line(line) for line in body.splitlines()]


async def test_allowed_and_denied_connections_are_flow_events_naming_the_policy(mesh: LoopbackMesh):
    mesh.set_policies([
        {"name": "allow-client", "namespace": "default", "scope": "Namespace", "action": "Allow",
         "rules": [[[{"principals": [{"Exact": "cluster.local/ns/default/sa/client"}]}]]]},
    ])
    await wait_for(lambda: mesh.b.state.current.policies)
    stream, reply = await socks5_connect(mesh, (mesh.server.ip, ECHO_PORT))
    assert reply == 0
    await stream.send_all(b"hello")
    assert await stream.receive_some(5) == b"hello"
    await stream.aclose()
    await wait_for(lambda: mesh.b.flows.recent() and mesh.a.flows.recent())

    [inbound] = await flows(mesh.b)
    assert (inbound.proxy, inbound.reporter, inbound.verdict) == ("node-b", "destination", "allowed")
    assert inbound.policy == "default/allow-client"
    assert (inbound.source.workload, inbound.source.identity) == ("client", CLIENT)
    assert (inbound.destination.workload, inbound.destination.identity) == ("server", SERVER)
    assert inbound.destination.address == f"{mesh.server.ip}:{ECHO_PORT}"
    assert (inbound.bytes_sent, inbound.bytes_received, inbound.flags) == (5, 5, "-")
    [outbound] = await flows(mesh.a)
    assert (outbound.proxy, outbound.reporter, outbound.verdict) == ("node-a", "source", "allowed")
    assert (outbound.bytes_sent, outbound.bytes_received) == (5, 5)

    mesh.set_policies([
        {"name": "deny-client", "namespace": "default", "scope": "Namespace", "action": "Deny",
         "rules": [[[{"principals": [{"Exact": "cluster.local/ns/default/sa/client"}]}]]]},
    ])
    await wait_for(lambda: [p.key for p in mesh.b.state.current.policies] == ["default/deny-client"])
    stream, reply = await socks5_connect(mesh, (mesh.server.ip, ECHO_PORT))
    assert reply != 0
    await stream.aclose()
    await wait_for(lambda: len(mesh.b.flows.recent()) == 2 and len(mesh.a.flows.recent()) == 2)

    denied = (await flows(mesh.b))[-1]
    assert (denied.verdict, denied.policy, denied.flags) == ("denied", "default/deny-client", "DENY")
    assert denied.source.identity == CLIENT and denied.bytes_sent == 0
    refused = (await flows(mesh.a))[-1]
    assert (refused.reporter, refused.verdict) == ("source", "denied")  # the peer answered 401


async def test_a_connection_closed_by_a_new_policy_is_a_denied_flow_naming_it(mesh: LoopbackMesh):
    stream, reply = await socks5_connect(mesh, (mesh.server.ip, ECHO_PORT))
    assert reply == 0
    await stream.send_all(b"hello")
    assert await stream.receive_some(5) == b"hello"
    mesh.set_policies([
        {"name": "deny-client", "namespace": "default", "scope": "Namespace", "action": "Deny",
         "rules": [[[{"principals": [{"Exact": "cluster.local/ns/default/sa/client"}]}]]]},
    ])
    await wait_for(lambda: mesh.b.flows.recent())
    await stream.aclose()
    [closed] = await flows(mesh.b)
    assert (closed.verdict, closed.policy, closed.flags) == ("denied", "default/deny-client", "DENY")
    assert (closed.bytes_sent, closed.bytes_received) == (5, 5)  # what passed before the policy came
