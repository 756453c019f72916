"""Per-user limits: at most N questions in flight per user, and a token bucket for the rate of questions.

`UserLimits.admit` is the one gate both messages and slash commands pass before a question is queued; members
holding an exempt role pass freely. A refused user is told the reason and when to try again, once per refusal
period (a user who keeps asking is not answered with a notice per message).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from bot.errors import UserLimited
from bot.settings import LimitSettings

KEPT_USERS = 4096  # above this many tracked users, idle ones with a full bucket are forgotten
QUIET_SECONDS = 30.0  # the least time between two refusal notices to one user


@dataclass(slots=True)
class _UserState:
    tokens: float
    updated: float
    in_flight: int = 0
    quiet_until: float = 0.0  # no further refusal notice before this time


class UserLimits:
    """Admits questions per user; all methods run on the event loop thread."""

    def __init__(self, settings: LimitSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._rate = settings.questions_per_minute / 60.0  # tokens per second
        self._users: dict[int, _UserState] = {}

    @contextmanager
    def admit(self, user_id: int, role_ids: Collection[int]) -> Iterator[None]:
        """Hold one of `user_id`'s in-flight slots for the block; raise UserLimited when refused."""
        if not set(role_ids).isdisjoint(self._settings.exempt_role_ids):
            yield
            return
        now = self._clock()
        state = self._state(user_id, now)
        limit = self._settings.max_in_flight_per_user
        if state.in_flight >= limit:
            raise self._refusal(state, now, UserLimited.busy(limit))
        if state.tokens < 1:
            wait = math.ceil((1 - state.tokens) / self._rate)
            raise self._refusal(state, now, UserLimited.too_fast(wait))
        state.tokens -= 1
        state.in_flight += 1
        try:
            yield
        finally:
            state.in_flight -= 1

    def _state(self, user_id: int, now: float) -> _UserState:
        state = self._users.get(user_id)
        if state is None:
            if len(self._users) >= KEPT_USERS:
                self._forget_idle(now)
            state = self._users[user_id] = _UserState(tokens=float(self._settings.burst), updated=now)
        else:
            state.tokens = min(self._settings.burst, state.tokens + (now - state.updated) * self._rate)
            state.updated = now
        return state

    def _refusal(self, state: _UserState, now: float, error: UserLimited) -> UserLimited:
        """`error`, marked as worth telling the user unless they were told within the last refusal."""
        error.notify = now >= state.quiet_until
        if error.notify:
            state.quiet_until = now + max(error.retry_after or 0, QUIET_SECONDS)
        return error

    def _forget_idle(self, now: float) -> None:
        full = self._settings.burst
        for user_id, state in list(self._users.items()):
            refilled = state.tokens + (now - state.updated) * self._rate
            if state.in_flight == 0 and refilled >= full and now >= state.quiet_until:
                del self._users[user_id]
