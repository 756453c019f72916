"""`DecodeGate`: how many pixels may be decoding at once, so concurrent big images wait instead of stacking.

A 7900x7900 image takes about 240 MiB while it decodes; twelve of them posted at once would take 3 GiB. The
gate admits decodes in arrival order while their pixels fit its capacity; a decode larger than the whole
capacity runs alone. Waiting happens on the event loop, so no worker thread is held by a waiting image.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class DecodeGate:
    """A first-come-first-served weighted semaphore over pixels; use from one event loop."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def in_use(self) -> int:
        """Pixels admitted and not yet released."""
        return self._in_use

    @asynccontextmanager
    async def admit(self, pixels: int) -> AsyncIterator[bool]:
        """Hold `pixels` of the capacity for the block; yields whether the decode had to wait for it."""
        weight = max(1, min(pixels, self.capacity))
        waited = bool(self._waiters) or self._in_use + weight > self.capacity
        if waited:
            await self._wait(weight)
        else:
            self._in_use += weight
        try:
            yield waited
        finally:
            self._release(weight)

    async def _wait(self, weight: int) -> None:
        entry = (weight, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():
                self._release(weight)  # admitted just before the cancellation arrived
            else:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._admit_waiters()  # a big decode that left may unblock smaller ones behind it
            raise

    def _release(self, weight: int) -> None:
        self._in_use -= weight
        self._admit_waiters()

    def _admit_waiters(self) -> None:
        while self._waiters and self._in_use + self._waiters[0][0] <= self.capacity:
            weight, future = self._waiters.popleft()
            if not future.done():  # a cancelled waiter is skipped
                self._in_use += weight
                future.set_result(None)
