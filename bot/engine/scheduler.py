"""Which request runs next: the queue, batch forming, per-conversation order and queue positions.

Pure decisions, no threads, no model, no I/O: both backends keep their requests here (the in-process worker
under its lock, the server backend on the event loop) and ask it what to start. The rules:

- The oldest waiting request whose conversation is not running leads the next batch, so nothing starves.
  Its generate kwargs define the batch (`same_kwargs`); only requests with equal kwargs join it.
- A conversation never has two requests running at once, and a later question never overtakes an earlier
  one of its conversation: it waits for the previous answer.
- A batch holds at most `max_size` requests and `max_tokens` estimated padded tokens: batch size × the
  longest (estimated prompt + `max_new_tokens`), since padding makes every row that long.
- Requests may join a running batch (the in-process worker pauses it for them) under the same rules: the
  running requests count as the batch's first rows.
- A request's queue position counts the earlier-submitted requests still waiting or running, so it only ever
  goes down; a running request is at 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from bot.engine.api import EngineRequest, GenerationResult
from bot.errors import QueueFull


@dataclass(eq=False, slots=True)
class ScheduledRequest:
    """A request inside an engine; `future` is settled on the event loop thread."""

    seq: int  # submission order
    request: EngineRequest
    generate_kwargs: dict[str, object]
    cost: int  # estimated tokens: prompt + max_new_tokens
    future: asyncio.Future[GenerationResult]
    submitted_at: float
    started_at: float = 0.0
    ahead: int = -1  # the position last published
    discarded: bool = False  # the future is done elsewhere (cancelled, timed out, stopped): drop the result
    stop_requested: bool = False  # end at the next decode step, keeping the text so far (set on the loop)
    streamed: str = ""  # text already sent to on_text by the worker (a retried batch resumes after it)
    timer: asyncio.TimerHandle | None = None  # the request timeout, on the loop

    @property
    def conversation_key(self) -> str:
        return self.request.conversation_key


def form_batch(
    queue: Sequence[ScheduledRequest],
    max_size: int,
    max_tokens: int | None = None,
    *,
    busy: frozenset[str] = frozenset(),
    same_kwargs: bool = True,
    joining: Sequence[ScheduledRequest] = (),
) -> list[ScheduledRequest]:
    """The next batch from the FIFO `queue`, given the conversations `busy` running; see the module rules.

    With `joining`, the requests from `queue` that may join that running batch.
    """
    batch = list(joining)
    widest = max((item.cost for item in batch), default=0)
    blocked = set(busy)  # conversations whose next request must not start now
    for item in queue:
        if len(batch) >= max_size:
            break
        key = item.conversation_key
        if key in blocked:
            continue
        blocked.add(key)
        if batch and same_kwargs and item.generate_kwargs != batch[0].generate_kwargs:
            continue
        candidate = max(widest, item.cost)
        if batch and max_tokens is not None and (len(batch) + 1) * candidate > max_tokens:
            continue
        widest = candidate
        batch.append(item)
    return batch[len(joining) :]


class Scheduler:
    """The waiting and running requests of one engine, oldest first. Not thread-safe: callers lock."""

    def __init__(self, max_queue_size: int) -> None:
        self._max_queue_size = max_queue_size
        self.waiting: list[ScheduledRequest] = []
        self.running: list[ScheduledRequest] = []

    def enqueue(self, item: ScheduledRequest) -> None:
        """Add `item` at the back; raise QueueFull when `max_queue_size` requests already wait."""
        if len(self.waiting) >= self._max_queue_size:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting")
        self.waiting.append(item)

    def next_batch(
        self, max_size: int, max_tokens: int | None = None, *, same_kwargs: bool = True, join: bool = False
    ) -> list[ScheduledRequest]:
        """What may start now (empty when nothing may), without starting it; with `join`, what may join the
        running requests as one batch of at most `max_size`."""
        if max_size <= 0:
            return []
        busy = frozenset(item.conversation_key for item in self.running)
        joining = self.running if join else ()
        return form_batch(
            self.waiting, max_size, max_tokens, busy=busy, same_kwargs=same_kwargs, joining=joining
        )

    def start(self, batch: Sequence[ScheduledRequest], now: float) -> None:
        """Move `batch` from waiting to running."""
        for item in batch:
            self.waiting.remove(item)
            item.started_at = now
            self.running.append(item)

    def finish(self, batch: Sequence[ScheduledRequest]) -> None:
        """Forget running requests that ended."""
        for item in batch:
            if item in self.running:
                self.running.remove(item)

    def withdraw(self, item: ScheduledRequest) -> bool:
        """Take a waiting `item` out of the queue; False when it is not waiting (running, or gone)."""
        if item in self.waiting:
            self.waiting.remove(item)
            return True
        return False

    def take_waiting(self) -> list[ScheduledRequest]:
        """Empty the queue and return what waited."""
        waiting, self.waiting = self.waiting, []
        return waiting

    def positions(self) -> list[tuple[ScheduledRequest, int]]:
        """Recompute every request's position; return those that changed, with their new position."""
        running = set(self.running)
        changed = []
        in_order = sorted(self.waiting + self.running, key=lambda entry: entry.seq)
        for earlier, item in enumerate(in_order):
            ahead = 0 if item in running else earlier
            if item.ahead != ahead:
                item.ahead = ahead
                changed.append((item, ahead))
        return changed
