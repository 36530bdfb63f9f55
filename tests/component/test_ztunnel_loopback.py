"""Two ztunnels on loopback: client -> SOCKS5 -> ztunnel A -> HBONE/mTLS -> ztunnel B -> app.

What a user would check: bytes arrive intact, both sides report the connection with the
right identities, policies deny with 401 and show up as DENY, bad peers are refused.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import prometheus_client.parser
import pytest
import trio

from meshcore import netio
from meshcore.hbone.errors import TunnelRejected
from meshcore.hbone.handshake import client_connection
from meshcore.identity.ca import CertificateAuthority
from meshcore.identity.spiffe import Identity
from meshcore.tls.context import client_context
from meshcore.tls.errors import TlsError

from .conftest import ECHO_PORT, LoopbackMesh


async def socks5_connect(mesh: LoopbackMesh, target: tuple[str, int]) -> tuple[trio.SocketStream, int]:
    """Connect from the client workload's IP through ztunnel A's SOCKS5 port; returns the reply code."""
    sock = trio.socket.socket()
    await sock.bind((mesh.client.ip, 0))
    await sock.connect(mesh.socks5)
    stream = trio.SocketStream(sock)
    await stream.send_all(b"\x05\x01\x00")
    assert await stream.receive_some(2) == b"\x05\x00"
    await stream.send_all(b"\x05\x01\x00\x01" + ipaddress.IPv4Address(target[0]).packed + target[1].to_bytes(2, "big"))
    reply = b""
    while len(reply) < 10:
        chunk = await stream.receive_some(10 - len(reply))
        if not chunk:
            break
        reply += chunk
    return stream, (reply[1] if len(reply) > 1 else -1)


def samples(zt, name: str) -> list:
    text = prometheus_client.generate_latest(zt.registry).decode()
    return [s for family in prometheus_client.parser.text_string_to_metric_families(text) for s in family.samples if s.name == name]


async def wait_for(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


@contextmanager
def nft_dnat(saddr: str, daddr: str, dport: int, to: str):
    """Capture like Istio does (nat OUTPUT, skipping ztunnel's marked sockets); removed after."""
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("needs root and nft to install a capture rule")
    table = f"mesh_test_{os.getpid()}_{dport}_{saddr.replace('.', '_')}"
    rules = (
        f"table ip {table} {{\n chain out {{\n type nat hook output priority -100;\n"
        f" ip saddr {saddr} ip daddr {daddr} tcp dport {dport} meta mark != 0x539 dnat to {to}\n }}\n}}\n"
    )
    subprocess.run(["nft", "-f", "-"], input=rules.encode(), check=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "ip", table], check=False)


async def test_bytes_cross_the_mesh_with_mtls_and_both_sides_report(mesh: LoopbackMesh):
    stream, reply = await socks5_connect(mesh, (mesh.server.ip, ECHO_PORT))
    assert reply == 0
    payload = os.urandom(300_000)
    received = bytearray()
    async with trio.open_nursery() as nursery:
        async def send():
            await stream.send_all(payload)
            await stream.send_eof()
        nursery.start_soon(send)
        async for chunk in stream:
            received += chunk
    assert bytes(received) == payload
    await stream.aclose()

    def closed_on_both():
        return samples(mesh.a, "istio_tcp_connections_closed_total") and samples(mesh.b, "istio_tcp_connections_closed_total")

    await wait_for(closed_on_both)
    [src] = samples(mesh.a, "istio_tcp_connections_closed_total")
    [dst] = samples(mesh.b, "istio_tcp_connections_closed_total")
    assert src.labels["reporter"] == "source" and dst.labels["reporter"] == "destination"
    for s in (src, dst):
        assert s.labels["connection_security_policy"] == "mutual_tls"
        assert s.labels["source_principal"] == "spiffe://cluster.local/ns/default/sa/client"
        assert s.labels["destination_principal"] == "spiffe://cluster.local/ns/default/sa/server"
        assert s.labels["source_workload"] == "client" and s.labels["destination_workload"] == "server"
        assert s.labels["response_flags"] == "-"
    [b_received] = samples(mesh.b, "istio_tcp_received_bytes_total")
    assert b_received.value == len(payload)


async def test_deny_policy_gives_401_and_deny_flag(mesh: LoopbackMesh):
    mesh.set_policies([
        {
            "name": "deny-client",
            "namespace": "default",
            "scope": "Namespace",
            "action": "Deny",
            "rules": [[[{"principals": [{"Exact": "cluster.local/ns/default/sa/client"}]}]]],
        }
    ])
    await wait_for(lambda: mesh.b.state.current.policies)
    stream, reply = await socks5_connect(mesh, (mesh.server.ip, ECHO_PORT))
    assert reply == 2  # SOCKS5 "connection not allowed by ruleset"
    await stream.aclose()
    await wait_for(lambda: samples(mesh.b, "istio_tcp_connections_closed_total"))
    [dst] = samples(mesh.b, "istio_tcp_connections_closed_total")
    assert dst.labels["response_flags"] == "DENY"
    [src] = samples(mesh.a, "istio_tcp_connections_closed_total")
    assert src.labels["response_flags"] != "-"


async def test_policy_change_closes_open_connection(mesh: LoopbackMesh):
    stream, reply = await socks5_connect(mesh, (mesh.server.ip, ECHO_PORT))
    assert reply == 0
    await stream.send_all(b"hello")
    assert await stream.receive_some(5) == b"hello"
    mesh.set_policies([
        {"name": "allow-nobody", "namespace": "default", "scope": "Namespace", "action": "Allow",
         "rules": [[[{"principals": [{"Exact": "cluster.local/ns/other/sa/x"}]}]]]}
    ])
    with trio.fail_after(5):
        try:
            while await stream.receive_some(100):
                pass
        except trio.BrokenResourceError:
            pass  # closed: by reset or by EOF, either way no longer served
    await stream.aclose()


async def _raw_hbone(mesh: LoopbackMesh, cert, expected=None):
    sock = await netio.connect((mesh.server.ip, 15008))
    expected = expected or [Identity("cluster.local", "default", "server")]
    try:
        conn = await client_connection(sock, client_context(cert), local_identity=cert.identity, expected=expected)
    except BaseException:
        netio.close(sock)
        raise
    return conn


async def test_malformed_connect_gets_400(mesh: LoopbackMesh):
    cert = mesh.ca.issue(Identity("cluster.local", "default", "client"))
    conn = await _raw_hbone(mesh, cert)
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        for authority in ("not-an-address", "999.1.1.1:80", f"{mesh.server.ip}:99999"):
            with pytest.raises(TunnelRejected) as info:
                await conn.open_tunnel(authority)
            assert info.value.status == 400
        # Authority for another IP than the one we dialed is refused too.
        with pytest.raises(TunnelRejected) as info:
            await conn.open_tunnel(f"{mesh.client.ip}:{ECHO_PORT}")
        assert info.value.status == 400
        # Nothing listening on the target port: 503, and the connection keeps serving.
        with pytest.raises(TunnelRejected) as info:
            await conn.open_tunnel(f"{mesh.server.ip}:1")
        assert info.value.status == 503
        tunnel = await conn.open_tunnel(f"{mesh.server.ip}:{ECHO_PORT}")
        await tunnel.send_all(b"still fine")
        assert await tunnel.receive_some() == b"still fine"
        await tunnel.aclose()
        conn.abort()


@pytest.mark.parametrize("case", ["other-trust-domain", "expired", "no-certificate"])
async def test_bad_client_certificates_are_refused(mesh: LoopbackMesh, case: str):
    if case == "other-trust-domain":
        other = CertificateAuthority.generate("evil.example")
        cert = other.issue(Identity("evil.example", "default", "client"))
        # The client trusts our root so that only the server's check can refuse it.
        cert = type(cert)(cert.identity, cert.key_pem, cert.chain_pem, mesh.ca.roots_pem, cert.not_before, cert.not_after)
    elif case == "expired":
        cert = mesh.ca.issue(
            Identity("cluster.local", "default", "client"),
            ttl=timedelta(hours=1),
            not_before=datetime.now(UTC) - timedelta(hours=2),
        )
    if case == "no-certificate":
        from OpenSSL import SSL

        def handshake_without_certificate() -> None:
            context = SSL.Context(SSL.TLS_METHOD)
            context.set_min_proto_version(SSL.TLS1_3_VERSION)
            context.set_alpn_protos([b"h2"])
            with socket.create_connection((mesh.server.ip, 15008), timeout=5) as sock:
                conn = SSL.Connection(context, sock)
                conn.set_connect_state()
                with pytest.raises((SSL.Error, OSError)):
                    conn.do_handshake()
                    # TLS 1.3: the server's refusal arrives after the client finished its flight.
                    conn.send(b"x")
                    conn.recv(1)

        # A blocking client, so in a thread: the ztunnel under test shares this event loop.
        await trio.to_thread.run_sync(handshake_without_certificate)
    else:
        refused = False
        try:
            conn = await _raw_hbone(mesh, cert)
            async with trio.open_nursery() as nursery:
                await nursery.start(conn.run)
                await conn.open_tunnel(f"{mesh.server.ip}:{ECHO_PORT}")
        except* (TlsError, OSError, trio.BrokenResourceError):
            refused = True  # TLS 1.3: the server's verdict may only show once we use the connection
        assert refused
    await wait_for(lambda: samples(mesh.b, "istio_tcp_connections_failed_total"))
    [failed] = samples(mesh.b, "istio_tcp_connections_failed_total")
    assert failed.labels["response_flags"] in ("TLS_FAILURE", "IDENTITY_ERROR")


async def test_plaintext_to_hbone_port_is_refused(mesh: LoopbackMesh):
    stream = await trio.open_tcp_stream(mesh.server.ip, 15008)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(5):
        data = b""
        try:
            while chunk := await stream.receive_some():
                data += chunk
        except trio.BrokenResourceError:
            pass
    assert b"HTTP/1.1 200" not in data
    await stream.aclose()
    await wait_for(lambda: samples(mesh.b, "istio_tcp_connections_failed_total"))


async def test_client_refuses_a_server_with_the_wrong_identity(mesh: LoopbackMesh):
    cert = mesh.ca.issue(Identity("cluster.local", "default", "client"))
    with pytest.raises(TlsError):
        await _raw_hbone(mesh, cert, expected=[Identity("cluster.local", "default", "someone-else")])


async def test_readiness_metrics_and_config_dump_endpoints(mesh: LoopbackMesh):
    import json
    import urllib.request

    def get(port: int, path: str) -> tuple[int, bytes]:
        with urllib.request.urlopen(f"http://{mesh.b.config.address}:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()

    status, body = await trio.to_thread.run_sync(get, 15021, "/healthz/ready")
    assert (status, body) == (200, b"ready\n")
    status, body = await trio.to_thread.run_sync(get, 15020, "/metrics")
    assert b"istio_build" in body
    status, body = await trio.to_thread.run_sync(get, 15000, "/config_dump")
    dump = json.loads(body)
    assert {w["name"] for w in dump["workloads"]} == {"client", "server"}
    assert dump["certificates"][0]["identity"] == "spiffe://cluster.local/ns/default/sa/server"


@pytest.mark.root
async def test_transparent_outbound_via_nftables_redirect(mesh: LoopbackMesh):
    """Port 15001: the app dials the server directly; an nftables DNAT (like Istio's REDIRECT)
    sends it to ztunnel A, which reads SO_ORIGINAL_DST and tunnels it over HBONE."""
    outbound = f"{mesh.a.config.address}:{mesh.a.config.ports.outbound}"
    with nft_dnat(mesh.client.ip, mesh.server.ip, ECHO_PORT, outbound):
        sock = trio.socket.socket()
        await sock.bind((mesh.client.ip, 0))
        await sock.connect((mesh.server.ip, ECHO_PORT))
        stream = trio.SocketStream(sock)
        await stream.send_all(b"captured")
        assert await stream.receive_some(8) == b"captured"
        await stream.aclose()
        await wait_for(lambda: samples(mesh.b, "istio_tcp_connections_closed_total"))
        [dst] = samples(mesh.b, "istio_tcp_connections_closed_total")
        assert dst.labels["connection_security_policy"] == "mutual_tls"
        assert dst.labels["source_principal"] == "spiffe://cluster.local/ns/default/sa/client"


async def test_burst_of_reset_streams_leaves_the_server_serving(mesh: LoopbackMesh):
    """Rapid reset: CONNECT then RST_STREAM at once, many times; others keep being served."""
    cert = mesh.ca.issue(Identity("cluster.local", "default", "client"))
    conn = await _raw_hbone(mesh, cert)
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        for _ in range(300):
            stream_id = conn._core.open_tunnel(f"{mesh.server.ip}:{ECHO_PORT}")
            conn._core.reset(stream_id)
        conn._mark_dirty()
        await trio.sleep(0.5)
        tunnel = await conn.open_tunnel(f"{mesh.server.ip}:{ECHO_PORT}")
        await tunnel.send_all(b"after the burst")
        assert await tunnel.receive_some() == b"after the burst"
        await tunnel.aclose()
        conn.abort()
    # Nothing leaks: every tunnel of the burst is gone from the server's books.
    await wait_for(lambda: len(mesh.b.inputs.connections) == 0)


@pytest.mark.root
async def test_plaintext_inbound_from_outside_the_mesh(mesh: LoopbackMesh):
    """Port 15006: a non-mesh client's connection to a mesh workload is captured, authorized
    without an identity and relayed; a STRICT-style policy (deny without a principal) refuses it."""
    outsider = mesh.client.ip.rsplit(".", 1)[0] + ".99"  # not a workload
    inbound = f"{mesh.b.config.address}:{mesh.b.config.ports.inbound_plaintext}"

    async def talk() -> bytes:
        sock = trio.socket.socket()
        await sock.bind((outsider, 0))
        await sock.connect((mesh.server.ip, ECHO_PORT))
        stream = trio.SocketStream(sock)
        try:
            await stream.send_all(b"plain")
            with trio.fail_after(5):
                return await stream.receive_some(5)
        except trio.BrokenResourceError:
            return b""
        finally:
            await stream.aclose()

    with nft_dnat(outsider, mesh.server.ip, ECHO_PORT, inbound):
        assert await talk() == b"plain"
        await wait_for(lambda: samples(mesh.b, "istio_tcp_connections_closed_total"))
        [dst] = samples(mesh.b, "istio_tcp_connections_closed_total")
        assert dst.labels["connection_security_policy"] == "unknown"
        assert dst.labels["reporter"] == "destination" and dst.labels["source_principal"] == "unknown"

        mesh.set_policies([{  # what PeerAuthentication STRICT becomes for ztunnel
            "name": "istio_converted_static_strict", "namespace": "default", "scope": "Namespace",
            "action": "Deny", "rules": [[[{"notPrincipals": [{"Presence": []}]}]]],
        }])
        await wait_for(lambda: mesh.b.state.current.policies)
        assert await talk() == b""
        await wait_for(lambda: any(s.labels["response_flags"] == "DENY" for s in samples(mesh.b, "istio_tcp_connections_closed_total")))
