"""meshcore/hbone/pool: reuse HBONE connections across tunnels (after ztunnel's pool.rs).

Invariants:
* A connection is keyed by `PoolKey` (source identity, acceptable destination identities,
  dialed address, source IP): a tunnel only rides a connection whose TLS peer was verified
  for exactly the identities it expects, from the identity it speaks for.
* A connection carries at most min(100, peer SETTINGS_MAX_CONCURRENT_STREAMS) tunnels; a new
  one is opened when all are full. Only one dial per key runs at a time, so a burst of
  tunnels to a new destination shares one connection instead of dialing 32.
* Connections that carried no tunnel for `idle_timeout` (ztunnel: 5 min) are closed.
* Every connection runs in the pool's nursery: closing the pool closes them all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from meshcore.hbone.connection import TunnelConnection, TunnelStream

if TYPE_CHECKING:
    from meshcore.identity.spiffe import Identity

IDLE_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class PoolKey:
    source_identity: Identity
    destination_identities: tuple[Identity, ...]
    address: tuple[str, int]
    source_ip: str | None


Dialer = Callable[[PoolKey], Awaitable[TunnelConnection]]


class HbonePool:
    """Hands out tunnels on pooled connections; `dial` makes a handshaken connection."""

    def __init__(self, dial: Dialer, *, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._dial = dial
        self._idle_timeout = idle_timeout
        self._connections: dict[PoolKey, list[TunnelConnection]] = {}
        self._dialing: dict[PoolKey, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._reap_idle)
            task_status.started()
            await trio.sleep_forever()

    def connection_count(self) -> int:
        return sum(len(conns) for conns in self._connections.values())

    async def open_tunnel(self, key: PoolKey, authority: str, headers: tuple[tuple[str, str], ...] = ()) -> TunnelStream:
        """A tunnel to `authority` over a pooled connection for `key` (dials when needed).

        Raises whatever the dialer raises (OSError, TlsError), TunnelRejected for a non-200
        answer, trio.BrokenResourceError if the connection died under the request.
        """
        connection = self._usable(key)
        if connection is None:
            lock = self._dialing.setdefault(key, trio.Lock())
            async with lock:
                connection = self._usable(key)
                if connection is None:
                    connection = await self._dial(key)
                    assert self._nursery is not None, "HbonePool.run() is not running"
                    await self._nursery.start(self._run_connection, key, connection)
        return await connection.open_tunnel(authority, headers)

    def goaway_all(self) -> None:
        """Drain: stop opening tunnels on every pooled connection."""
        for conns in self._connections.values():
            for conn in conns:
                conn.goaway()

    def _usable(self, key: PoolKey) -> TunnelConnection | None:
        for conn in self._connections.get(key, ()):
            if conn.usable:
                return conn
        return None

    async def _run_connection(self, key: PoolKey, connection: TunnelConnection, *, task_status: trio.TaskStatus[None]) -> None:
        self._connections.setdefault(key, []).append(connection)
        try:
            await connection.run(task_status=task_status)
        finally:
            conns = self._connections.get(key, [])
            if connection in conns:
                conns.remove(connection)
            if not conns:
                self._connections.pop(key, None)
                self._dialing.pop(key, None)

    async def _reap_idle(self) -> None:
        while True:
            await trio.sleep(min(self._idle_timeout, 30.0))
            now = trio.current_time()
            for conns in list(self._connections.values()):
                for conn in list(conns):
                    if conn.open_tunnels == 0 and now - conn.last_used > self._idle_timeout:
                        conn.abort()
