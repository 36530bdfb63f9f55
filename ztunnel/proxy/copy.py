"""ztunnel/proxy/copy: plain TCP relay between two raw sockets, with half-close."""

from __future__ import annotations

import socket

from meshcore import netio


async def _one_way(src: socket.socket, dst: socket.socket, counts: list[int], index: int) -> None:
    buf = bytearray(netio.READ_SIZE)
    view = memoryview(buf)
    fairness = netio.Fairness()
    while True:
        n = await netio.recv_into(src, buf)
        if n == 0:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        await netio.send_all(dst, view[:n])
        counts[index] += n
        await fairness.tick()


async def relay(a: socket.socket, b: socket.socket, counts: list[int]) -> None:
    """Copy a->b and b->a until both directions saw EOF.

    `counts` ([a->b, b->a]) is updated as bytes move, so it is right even if the relay fails.
    """
    await netio.run_both(_one_way(a, b, counts, 0), _one_way(b, a, counts, 1))
