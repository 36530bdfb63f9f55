"""ztunnel/proxy/sockets: where the ztunnel's upstream sockets are made.

In in-pod mode every socket a pod's traffic leaves through is created inside that pod's
network namespace, so it carries the pod's own IP and routes (facts §3); elsewhere (a node
ztunnel on loopback) it is bound to the workload's IP when that IP is local, and the kernel
chooses otherwise. All of them carry the mesh mark so capture rules let them through.
"""

from __future__ import annotations

import errno
import os
import socket

import trio

from meshcore import netio
from ztunnel.inpod.netns import NetnsError, connect_socket_in_netns


class SocketFactory:
    def __init__(self, mark: int | None) -> None:
        self._mark = mark
        self._netns_by_ip: dict[str, int] = {}

    def register_pod(self, ips: list[str], netns_fd: int) -> None:
        for ip in ips:
            self._netns_by_ip[ip] = netns_fd

    def unregister_pod(self, ips: list[str]) -> None:
        for ip in ips:
            self._netns_by_ip.pop(ip, None)

    async def connect(self, address: tuple[str, int], *, source_ip: str | None) -> socket.socket:
        """A connected non-blocking socket to `address`, leaving as `source_ip` where possible."""
        if source_ip is not None and source_ip in self._netns_by_ip:
            return await self._connect_in(self._netns_by_ip[source_ip], address)
        if source_ip is not None:
            try:
                return await netio.connect(address, mark=self._mark, source=(source_ip, 0))
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise
        return await netio.connect(address, mark=self._mark)

    async def connect_to_pod(self, address: tuple[str, int], *, client_ip: str | None = None) -> socket.socket:
        """Connect to a local pod's app: from inside its netns when we hold it (in-pod mode),
        from the original client's IP (IP_TRANSPARENT), so the app sees who called it; the
        in-pod rules route its replies back to us (facts §3, table 100)."""
        netns_fd = self._netns_by_ip.get(address[0])
        if netns_fd is not None:
            spoof = client_ip if client_ip not in (None, address[0]) else None
            return await self._connect_in(netns_fd, address, source_ip=spoof)
        return await netio.connect(address, mark=self._mark)

    async def _connect_in(
        self, netns_fd: int, address: tuple[str, int], *, source_ip: str | None = None
    ) -> socket.socket:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        mark = self._mark if self._mark is not None else netio.MESH_MARK
        # Our own reference to the netns: the pod may be released (and its fd closed, the number
        # reused) while the worker thread is still entering it.
        held = os.dup(netns_fd)
        try:
            sock = await trio.to_thread.run_sync(lambda: connect_socket_in_netns(held, family, mark=mark))
        except NetnsError as exc:
            raise OSError(errno.ENONET, f"cannot create a socket in the pod's network namespace: {exc}") from exc
        finally:
            os.close(held)
        if source_ip is not None:
            try:
                sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
                sock.bind((source_ip, 0))
            except OSError:
                netio.close(sock)
                raise
        return await netio.connect_socket(sock, address)
