"""Graceful shutdown: the process-wide drain signal and the server loop that obeys it.

Draining (mirrors ztunnel's `drain.rs` / `run_with_drain`): when the process is asked to stop
(SIGTERM, SIGINT, or POST /quitquitquit), every server stops accepting, open connections get
a grace period (ztunnel's CONNECTION_TERMINATION_DEADLINE, 5 s by default) to finish on their
own, and whatever is still running after that is cancelled.

A server hands its accept loop to `Drain.run_until_drained`; the loop spawns one task per
connection into the nursery it is given:

    async def serve(listener, drain):
        async def accept_loop(connections: trio.Nursery) -> None:
            while True:
                stream = await listener.accept()
                connections.start_soon(handle_connection, stream)

        await drain.run_until_drained(accept_loop)

A long-lived connection that can ask its peer to go away (an HBONE connection sends GOAWAY)
waits for the drain in a side task of its own nursery, and cancels that task when it ends:

    async def handle_connection(stream):
        async with trio.open_nursery() as nursery:
            async def goaway_on_drain():
                await drain.wait_started()
                await send_goaway()
            nursery.start_soon(goaway_on_drain)
            await relay(stream)
            nursery.cancel_scope.cancel()
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable

import trio

from meshcore.log import get_logger

# ztunnel's CONNECTION_TERMINATION_DEADLINE default: long enough for in-flight requests,
# short enough to stay inside Kubernetes' default 30 s termination grace period.
DEFAULT_GRACE_SECONDS = 5.0

_log = get_logger("drain")


class Drain:
    """The process-wide "stop now, gracefully" signal. Starting it is one-way and idempotent."""

    def __init__(self, *, grace: float = DEFAULT_GRACE_SECONDS) -> None:
        self.grace = grace
        self._started = trio.Event()

    @property
    def started(self) -> bool:
        return self._started.is_set()

    def start(self) -> None:
        """Begin draining; later calls do nothing."""
        if not self._started.is_set():
            _log.info("drain started", grace_seconds=self.grace)
            self._started.set()

    async def wait_started(self) -> None:
        await self._started.wait()

    async def run_until_drained(
        self, accept_loop: Callable[[trio.Nursery], Awaitable[object]]
    ) -> None:
        """Run `accept_loop(connections)` until the drain starts, then drain its connections.

        When the drain starts, `accept_loop` is cancelled (no new connections); tasks it
        spawned into `connections` get `grace` seconds to finish, then are cancelled.
        Returns as soon as every connection task has finished. If `accept_loop` returns on
        its own, its connections keep running (still subject to a later drain).
        """
        async with trio.open_nursery() as supervisor:
            async with trio.open_nursery() as connections:
                accepting = trio.CancelScope()
                supervisor.start_soon(self._enforce, accepting, connections.cancel_scope)
                with accepting:
                    await accept_loop(connections)
            # Every connection is done: the enforcer has nothing left to cut short.
            supervisor.cancel_scope.cancel()

    async def _enforce(self, accepting: trio.CancelScope, connections: trio.CancelScope) -> None:
        await self.wait_started()
        accepting.cancel()
        await trio.sleep(self.grace)
        connections.cancel()


async def install_signal_handlers(
    drain: Drain, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Start `drain` on the first SIGTERM or SIGINT; run as a task in the main nursery.

    After the first signal the previous handlers are restored, so a second SIGINT raises
    KeyboardInterrupt (and a second SIGTERM terminates) for an operator who cannot wait.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            _log.info("shutdown requested", signal=signal.Signals(signum).name)
            drain.start()
            return
