"""The controllers' work queue: batches of dirty keys, and backoff for keys whose work failed."""

from __future__ import annotations

import trio
import trio.testing

from istiod_lite.kube.queue import WorkQueue


async def test_keys_marked_while_busy_come_in_the_next_batch():
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    queue.add("b")
    queue.add("a")
    assert await queue.take() == {"a", "b"}
    queue.add("c")
    assert await queue.take() == {"c"}


async def test_a_failing_key_waits_out_a_doubling_backoff_whatever_its_events(autojump_clock):
    queue: WorkQueue[str] = WorkQueue(backoff_initial=0.2, backoff_max=1.0)
    taken_at: list[float] = []
    async with trio.open_nursery() as nursery:
        queue.add("a")
        for _ in range(5):
            await queue.take()
            taken_at.append(trio.current_time())
            queue.failed("a", nursery)
            for _ in range(100):  # a storm of events for the failing key changes nothing
                queue.add("a")
        await queue.take()
        queue.succeeded("a")
        queue.add("a")
        assert await queue.take() == {"a"}
        nursery.cancel_scope.cancel()
    gaps = [round(later - earlier, 3) for earlier, later in zip(taken_at, taken_at[1:])]
    assert gaps == [0.2, 0.4, 0.8, 1.0]


async def test_other_keys_are_not_held_back_by_a_failing_one(autojump_clock):
    queue: WorkQueue[str] = WorkQueue(backoff_initial=10.0)
    async with trio.open_nursery() as nursery:
        queue.add("bad")
        await queue.take()
        queue.failed("bad", nursery)
        assert queue.backing_off("bad") and not queue.backing_off("good")
        start = trio.current_time()
        queue.add("good")
        assert await queue.take() == {"good"}
        assert trio.current_time() == start
        assert await queue.take() == {"bad"}
        assert trio.current_time() - start == 10.0
        nursery.cancel_scope.cancel()
