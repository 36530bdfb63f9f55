"""Drain: stop accepting, give connections a grace period, cancel the rest; signal handling."""

import os
import signal

import trio

from meshcore.drain import DEFAULT_GRACE_SECONDS, Drain, install_signal_handlers


def test_start_is_idempotent():
    drain = Drain()
    assert not drain.started
    drain.start()
    drain.start()
    assert drain.started


async def _run_server(drain, connection_durations):
    """Run an accept loop that opens one connection per duration and then idles.

    Returns (time run_until_drained took, whether the accept loop was cancelled,
    list of connections that were cancelled).
    """
    accept_loop_cancelled = False
    cancelled_connections = []

    async def connection(index, duration):
        try:
            await trio.sleep(duration)
        except trio.Cancelled:
            cancelled_connections.append(index)
            raise

    async def accept_loop(connections):
        nonlocal accept_loop_cancelled
        for index, duration in enumerate(connection_durations):
            connections.start_soon(connection, index, duration)
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            accept_loop_cancelled = True
            raise

    start = trio.current_time()
    await drain.run_until_drained(accept_loop)
    return trio.current_time() - start, accept_loop_cancelled, cancelled_connections


async def _start_drain_after(drain, seconds):
    await trio.sleep(seconds)
    drain.start()


async def test_connections_that_finish_within_grace_end_the_drain_early(autojump_clock):
    drain = Drain()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_start_drain_after, drain, 1)
        took, accept_cancelled, cancelled = await _run_server(drain, [2, 3])

    assert accept_cancelled
    assert cancelled == []
    assert took == 3  # the slower connection's natural end, well before 1 + grace


async def test_stuck_connections_are_cancelled_at_the_grace_deadline(autojump_clock):
    drain = Drain()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_start_drain_after, drain, 1)
        took, accept_cancelled, cancelled = await _run_server(drain, [2, float("inf")])

    assert accept_cancelled
    assert cancelled == [1]
    assert took == 1 + DEFAULT_GRACE_SECONDS


async def test_grace_period_is_configurable(autojump_clock):
    drain = Drain(grace=0.5)
    drain.start()
    took, _, cancelled = await _run_server(drain, [float("inf")])
    assert cancelled == [0]
    assert took == 0.5


async def test_without_drain_connections_outlive_the_accept_loop(autojump_clock):
    drain = Drain()
    finished = []

    async def connection():
        await trio.sleep(10)
        finished.append(trio.current_time())

    async def accept_loop(connections):
        connections.start_soon(connection)  # then stop accepting, e.g. listener closed

    start = trio.current_time()
    await drain.run_until_drained(accept_loop)
    assert finished == [start + 10]
    assert not drain.started


async def test_drain_started_wakes_waiters(autojump_clock):
    drain = Drain()
    woke_at = []

    async def waiter():
        await drain.wait_started()
        woke_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        nursery.start_soon(waiter)
        await trio.sleep(2)
        drain.start()
    assert len(woke_at) == 2
    assert all(t == woke_at[0] for t in woke_at)


async def test_sigterm_starts_the_drain():
    drain = Drain()
    async with trio.open_nursery() as nursery:
        await nursery.start(install_signal_handlers, drain)
        os.kill(os.getpid(), signal.SIGTERM)
        with trio.fail_after(5):
            await drain.wait_started()
    assert drain.started
