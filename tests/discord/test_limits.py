"""Per-user limits: questions in flight, the token bucket, exempt roles, one notice per refusal period."""

from __future__ import annotations

import contextlib

import pytest

from bot.discord.limits import KEPT_USERS, QUIET_SECONDS, UserLimits
from bot.errors import UserLimited
from bot.settings import LimitSettings

ALICE, BOB = 1, 2
MODERATOR = 99


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limits(clock: _Clock, **options: object) -> UserLimits:
    settings = {"max_in_flight_per_user": 3, "questions_per_minute": 6.0, "burst": 5, **options}
    return UserLimits(LimitSettings.model_validate(settings), clock)


def test_a_user_may_have_n_questions_in_flight_and_another_user_is_not_affected() -> None:
    limits = _limits(_Clock())
    with contextlib.ExitStack() as held:
        for _ in range(3):
            held.enter_context(limits.admit(ALICE, []))
        with pytest.raises(UserLimited) as refused, limits.admit(ALICE, []):
            pass
        assert refused.value.retry_after is None
        assert "already have 3 questions waiting" in refused.value.user_message
        with limits.admit(BOB, []):
            pass
    with limits.admit(ALICE, []):  # the answers ended: slots are free again
        pass


def test_the_bucket_allows_a_burst_then_the_rate_and_says_when() -> None:
    clock = _Clock()
    limits = _limits(clock)
    for _ in range(5):
        with limits.admit(ALICE, []):
            pass
    with pytest.raises(UserLimited) as refused, limits.admit(ALICE, []):
        pass
    assert refused.value.retry_after == 10, "6 a minute: one every 10 s"
    assert refused.value.user_message.endswith("Please try again in 10 seconds.")
    clock.now += 9.5
    with pytest.raises(UserLimited), limits.admit(ALICE, []):
        pass
    clock.now += 0.5
    with limits.admit(ALICE, []):
        pass


def test_a_refused_question_takes_no_token() -> None:
    clock = _Clock()
    limits = _limits(clock, burst=1, max_in_flight_per_user=1)
    with limits.admit(ALICE, []):
        clock.now += 10
        with pytest.raises(UserLimited) as refused, limits.admit(ALICE, []):
            pass
        assert refused.value.retry_after is None, "refused for the one in flight, not for the rate"
    with limits.admit(ALICE, []):
        pass


def test_exempt_roles_pass_freely() -> None:
    limits = _limits(_Clock(), exempt_role_ids=[MODERATOR], burst=1, max_in_flight_per_user=1)
    with contextlib.ExitStack() as held:
        for _ in range(10):
            held.enter_context(limits.admit(ALICE, [5, MODERATOR]))


def test_a_user_who_keeps_asking_is_told_once_per_refusal_period() -> None:
    clock = _Clock()
    limits = _limits(clock, burst=1, questions_per_minute=0.5)  # one every 120 s
    with limits.admit(ALICE, []):
        pass
    notices = []
    for _ in range(5):
        with pytest.raises(UserLimited) as refused, limits.admit(ALICE, []):
            pass
        notices.append(refused.value.notify)
        clock.now += 1
    assert notices == [True, False, False, False, False]
    clock.now += 120
    with limits.admit(ALICE, []):
        pass
    with pytest.raises(UserLimited) as refused, limits.admit(ALICE, []):
        pass
    assert refused.value.notify, "a new refusal period is told again"
    assert QUIET_SECONDS <= 120


def test_idle_users_are_forgotten_so_memory_stays_bounded() -> None:
    clock = _Clock()
    limits = _limits(clock)
    for user_id in range(KEPT_USERS + 10):
        with limits.admit(user_id, []):
            pass
    clock.now += 60  # every bucket is full again
    with limits.admit(-1, []):
        pass
    assert len(limits._users) < KEPT_USERS
