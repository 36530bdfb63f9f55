"""A work queue of keys to reconcile, as client-go's rate-limited workqueue: events mark keys
dirty; a worker takes them in batches; a key whose work failed waits out a backoff that
doubles per consecutive failure, and events for it meanwhile wait for that retry, so a
refusing API server sees one request per key per backoff, never one per event."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

import trio

Key = TypeVar("Key", bound=Hashable)


class WorkQueue(Generic[Key]):
    def __init__(self, *, backoff_initial: float = 0.2, backoff_max: float = 30.0) -> None:
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._dirty: set[Key] = set()
        self._wakeup = trio.Event()
        self._failures: dict[Key, int] = {}
        self._backing_off: set[Key] = set()

    def add(self, key: Key) -> None:
        self._dirty.add(key)
        if key not in self._backing_off:
            self._wakeup.set()

    async def take(self) -> set[Key]:
        """The dirty keys not backing off (at least one), removed from the queue."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            ready = self._dirty - self._backing_off
            if ready:
                self._dirty -= ready
                return ready

    def backing_off(self, key: Key) -> bool:
        """Whether `key` failed and waits for its retry (callers must not work on it meanwhile)."""
        return key in self._backing_off

    def succeeded(self, key: Key) -> None:
        self._failures.pop(key, None)

    def failed(self, key: Key, nursery: trio.Nursery) -> float:
        """Retry `key` after its backoff (started in `nursery`); returns the delay."""
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        delay = min(self._backoff_initial * 2 ** (failures - 1), self._backoff_max)
        self._backing_off.add(key)
        nursery.start_soon(self._retry, key, delay)
        return delay

    async def _retry(self, key: Key, delay: float) -> None:
        await trio.sleep(delay)
        self._backing_off.discard(key)
        self.add(key)
