"""Fixtures for interop tests: real ztunnel processes and an echo app on loopback.

Both are factories so that each test module lays out its own addresses. Everything they
start is stopped when the module's tests are done.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshcore.identity import CertificateAuthority
from meshcore.testing.procs import (
    ManagedProcess,
    free_port,
    http_get,
    start_process,
    wait_for_http_ok,
)

REPO = Path(__file__).resolve().parents[2]


# --- echo app ---


class EchoServer:
    """A TCP echo app on a real socket; counts the connections it accepted."""

    def __init__(self, ip: str) -> None:
        self._listener = socket.create_server((ip, 0))
        self.address: tuple[str, int] = self._listener.getsockname()
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, name="echo", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the tunnel was torn down mid-echo

    def close(self) -> None:
        self._listener.close()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def start_echo_server() -> Iterator[Callable[[str], EchoServer]]:
    """`start_echo_server(ip)` starts an echo app on ip:<free port>."""
    servers: list[EchoServer] = []

    def start(ip: str) -> EchoServer:
        servers.append(EchoServer(ip))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


# --- ztunnel ---


@dataclass(frozen=True, kw_only=True)
class Ztunnel:
    """A running `python -m ztunnel` and the ports it was given (0 = disabled)."""

    process: ManagedProcess
    address: str
    ports: Mapping[str, int]

    def metrics(self) -> str:
        self.process.check_running()  # a crash explains itself with the log tail
        return http_get(f"http://{self.address}:{self.ports['metrics']}/metrics")


@pytest.fixture(scope="module")
def start_ztunnel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Ztunnel]]:
    """`start_ztunnel(node=, address=, trust_domain=, state=, ca=, ports=)` runs a ztunnel.

    `state` is the local-config document (workloads, services, policies); `ports` names the
    listeners to open (outbound, inboundPlaintext, inbound, socks5, admin; all others are
    disabled), metrics and readiness always get free ports. Returns once it is ready.
    """
    started: list[ManagedProcess] = []

    def start(
        *,
        node: str,
        address: str,
        trust_domain: str,
        state: Mapping[str, Any],
        ca: CertificateAuthority,
        ports: Mapping[str, int],
    ) -> Ztunnel:
        workdir = tmp_path_factory.mktemp(f"ztunnel-{node}")
        (workdir / "state.yaml").write_text(json.dumps(state))  # JSON is valid YAML
        (workdir / "ca.pem").write_bytes(ca.cert_pem)
        (workdir / "ca-key.pem").write_bytes(ca.key_pem)
        all_ports = {
            **dict.fromkeys(("outbound", "inboundPlaintext", "inbound", "socks5", "admin"), 0),
            **ports,
            "metrics": free_port(address),
            "readiness": free_port(address),
        }
        config = workdir / "ztunnel.yaml"
        config.write_text(
            json.dumps(
                {
                    "node": node,
                    "address": address,
                    "trustDomain": trust_domain,
                    "state": "state.yaml",
                    "ca": {"cert": "ca.pem", "key": "ca-key.pem"},
                    "ports": all_ports,
                }
            )
        )
        process = start_process(
            f"ztunnel-{node}",
            [sys.executable, "-m", "ztunnel", "--config", config],
            log_dir=workdir,
            cwd=REPO,
        )
        started.append(process)
        wait_for_http_ok(
            f"http://{address}:{all_ports['readiness']}/healthz/ready", timeout=20, process=process
        )
        return Ztunnel(process=process, address=address, ports=all_ports)

    yield start
    for process in reversed(started):
        process.stop()
