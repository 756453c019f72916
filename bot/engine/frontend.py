"""The event-loop side both backends share: submitting, positions, timeouts, callbacks. Imports no torch.

A backend subclasses `EngineFrontEnd` and implements `_wake` (the queue changed: look for work) plus its
own `start`, `count_text_tokens` and `stop`. Everything under `_lock` may be touched from a worker thread;
callbacks and futures are only ever touched on the event loop thread (`_post` hops there).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bot.engine.api import EngineRequest, EngineStats, GenerationResult, RequestHandle
from bot.engine.budget import estimate_prompt_tokens
from bot.engine.scheduler import ScheduledRequest, Scheduler
from bot.errors import EngineStopped, GenerationFailed
from bot.settings import Settings

logger = logging.getLogger("bot.engine")


def settle(future: asyncio.Future[Any], outcome: object) -> None:
    """Resolve `future` (on the loop thread) unless it is already done (cancelled, timed out)."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


@dataclass(slots=True)
class Counters:
    """What `EngineStats` reports besides the queue lengths; changed under the engine's lock."""

    batches: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    aborted: int = 0
    oom_retries: int = 0


class EngineFrontEnd:
    """Queues requests in a `Scheduler`, publishes queue positions and enforces the request timeout."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._limits = settings.engine
        self._lock = threading.Condition()
        # Guarded by `_lock` (a worker thread may read and change them).
        self._scheduler = Scheduler(self._limits.max_queue_size)
        self._counters = Counters()
        self._accepting = False
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the counters: batches, batch sizes, outcomes, queue lengths."""
        with self._lock:
            counters = self._counters
            return EngineStats(
                batches=counters.batches,
                batch_sizes=dict(counters.batch_sizes),
                completed=counters.completed,
                failed=counters.failed,
                cancelled=counters.cancelled,
                aborted=counters.aborted,
                oom_retries=counters.oom_retries,
                queued=len(self._scheduler.waiting),
                running=len(self._scheduler.running),
            )

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue `request` and return its handle; raise QueueFull or EngineStopped at once."""
        loop = self._loop
        if loop is None:
            raise EngineStopped("the engine has not been started")
        kwargs = (
            dict(request.generate_kwargs)
            if request.generate_kwargs is not None
            else self._settings.generation.generate_kwargs()
        )
        new_tokens = kwargs.get("max_new_tokens")
        cost = estimate_prompt_tokens(request.messages, self._settings.vision)
        cost += new_tokens if isinstance(new_tokens, int) else 0
        item = ScheduledRequest(
            next(self._seq), request, kwargs, cost, loop.create_future(), time.monotonic()
        )
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the engine is not accepting requests")
            self._scheduler.enqueue(item)
            self._publish_positions()
            self._wake()
        item.future.add_done_callback(functools.partial(self._on_future_done, item))
        item.timer = loop.call_later(self._limits.request_timeout_seconds, self._expire, item)
        return RequestHandle(item, self._stop_request)

    def _stop_request(self, item: ScheduledRequest) -> None:
        """Loop thread: end `item` early. A queued one leaves the queue with no text; a running one is ended
        by its backend, which checks `stop_requested` at every decode step (or streamed chunk)."""
        if item.future.done():
            return
        item.stop_requested = True
        with self._lock:
            withdrawn = self._scheduler.withdraw(item)
            if withdrawn:
                self._publish_positions()
                self._wake()
        if withdrawn:
            waited = time.monotonic() - item.submitted_at
            settle(item.future, GenerationResult("", [], 0, 0, waited, 0.0, stopped=True))

    def _wake(self) -> None:
        """Called with `_lock` held after the queue changed: start whatever may start."""
        raise NotImplementedError

    def _on_future_done(self, item: ScheduledRequest, future: asyncio.Future[GenerationResult]) -> None:
        """Loop thread: forget a request whose future finished for any reason."""
        if item.timer is not None:
            item.timer.cancel()
        with self._lock:
            if future.cancelled():
                self._counters.cancelled += 1
            if self._scheduler.withdraw(item):
                self._publish_positions()
                self._wake()
            elif item in self._scheduler.running:
                item.discarded = True
                self._on_discarded(item)

    def _on_discarded(self, item: ScheduledRequest) -> None:
        """Called with `_lock` held when nobody waits any more for a running request."""

    def _expire(self, item: ScheduledRequest) -> None:
        seconds = self._limits.request_timeout_seconds
        settle(
            item.future,
            GenerationFailed(
                f"request timed out after {seconds:.0f}s",
                user_message="That took too long to answer. Please try again in a moment.",
            ),
        )

    def _deliver_text(self, item: ScheduledRequest, delta: str) -> None:
        callback = item.request.on_text
        if callback is None or item.future.done():
            return
        try:
            callback(delta)
        except Exception:
            logger.exception("an on_text callback failed")

    def _deliver_positions(self, updates: list[tuple[ScheduledRequest, int]]) -> None:
        for item, ahead in updates:
            callback = item.request.on_queue_position
            if callback is None or item.future.done():
                continue
            try:
                callback(ahead)
            except Exception:
                logger.exception("an on_queue_position callback failed")

    def _publish_positions(self) -> None:
        """Send the changed queue positions to the loop; called with `_lock` held."""
        updates = self._scheduler.positions()
        if updates:
            self._post(self._deliver_positions, updates)

    def _post(self, callback: Callable[..., object], *args: object) -> None:
        """Run `callback(*args)` on the event loop thread, soon; from any thread."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to tell
            self._loop.call_soon_threadsafe(callback, *args)
