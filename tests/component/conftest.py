"""Two real ztunnels in this process on loopback, each on its own 127.x address, with a dev CA."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from meshcore.identity.ca import CertificateAuthority
from ztunnel.app import Ztunnel
from ztunnel.config import load_config
from ztunnel.devsetup import DevNode, DevWorkload, write_ca, write_node_config, write_state

ECHO_PORT = 8080


@dataclass
class LoopbackMesh:
    folder: Path
    ca: CertificateAuthority
    client: DevWorkload  # on node a
    server: DevWorkload  # on node b
    a: Ztunnel
    b: Ztunnel
    nursery: trio.Nursery

    @property
    def socks5(self) -> tuple[str, int]:
        return (self.a.config.address, self.a.config.ports.socks5)

    def set_policies(self, policies: list[dict]) -> None:
        write_state(self.folder / "state.yaml", [self.client, self.server], policies)


async def echo_server(host: str, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        try:
            async for chunk in stream:
                await stream.send_all(chunk)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started()
    await trio.serve_listeners(echo, listeners)


def _subnet() -> str:
    return f"127.{random.randint(20, 250)}.{random.randint(0, 255)}"


@pytest.fixture
async def mesh(tmp_path: Path, nursery: trio.Nursery) -> LoopbackMesh:
    net = _subnet()
    ca = write_ca(tmp_path)
    node_a = DevNode("node-a", f"{net}.1")
    node_b = DevNode("node-b", f"{net}.2")
    client = DevWorkload("client", f"{net}.11", "node-a")
    server = DevWorkload("server", f"{net}.12", "node-b")
    write_state(tmp_path / "state.yaml", [client, server])
    zt_a = Ztunnel(load_config(write_node_config(tmp_path, node_a, drain_seconds=1)))
    zt_b = Ztunnel(load_config(write_node_config(tmp_path, node_b, drain_seconds=1)))
    await nursery.start(echo_server, server.ip, ECHO_PORT)
    await nursery.start(zt_a.run)
    await nursery.start(zt_b.run)
    return LoopbackMesh(tmp_path, ca, client, server, zt_a, zt_b, nursery)
