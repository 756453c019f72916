"""The verdict cache and the DM membership rule, with stand-in guilds (the end-to-end tests use the fake)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import discord
import pytest

from bot.discord.access import AccessPolicy, TtlCache
from bot.settings import DiscordSettings

ROLE, OTHER_ROLE = 501, 502


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ttl_cache_forgets_an_entry_after_its_ttl() -> None:
    clock = Clock()
    cache: TtlCache[int, bool] = TtlCache(ttl=60, max_size=10, clock=clock)
    cache.put(1, False)
    clock.now += 59.9
    assert cache.get(1) is False
    clock.now += 0.1
    assert cache.get(1) is None
    assert len(cache) == 0
    assert cache.get(2) is None


def test_ttl_cache_storing_again_restarts_the_ttl() -> None:
    clock = Clock()
    cache: TtlCache[int, bool] = TtlCache(ttl=60, max_size=10, clock=clock)
    cache.put(1, False)
    clock.now += 50
    cache.put(1, True)
    clock.now += 50
    assert cache.get(1) is True


def test_ttl_cache_drops_the_entry_stored_longest_ago_when_full() -> None:
    cache: TtlCache[int, str] = TtlCache(ttl=60, max_size=2, clock=Clock())
    cache.put(1, "one")
    cache.put(2, "two")
    cache.put(1, "one again")  # now stored after 2
    cache.put(3, "three")
    assert len(cache) == 2
    assert (cache.get(1), cache.get(2), cache.get(3)) == ("one again", None, "three")


def _http_error(exc_type: type[discord.HTTPException], status: int) -> discord.HTTPException:
    return exc_type(SimpleNamespace(status=status, reason="test"), {"code": 0, "message": "test"})


def _member(*role_ids: int) -> Any:
    return SimpleNamespace(roles=[SimpleNamespace(id=role_id) for role_id in role_ids])


@dataclass
class StubGuild:
    """What `AccessPolicy` reads of a guild; `members` answer REST lookups, `cached` the member cache."""

    id: int
    role_ids: set[int] = field(default_factory=set)
    members: dict[int, Any] = field(default_factory=dict)
    cached: dict[int, Any] = field(default_factory=dict)
    failure: int | None = None  # an HTTP status every REST lookup fails with
    unavailable: bool = False
    lookups: list[int] = field(default_factory=list)

    def get_role(self, role_id: int) -> object | None:
        return object() if role_id in self.role_ids else None

    def get_member(self, user_id: int) -> Any:
        return self.cached.get(user_id)

    async def fetch_member(self, user_id: int) -> Any:
        self.lookups.append(user_id)
        if self.failure is not None:
            raise _http_error(discord.HTTPException, self.failure)
        if user_id not in self.members:
            raise _http_error(discord.NotFound, 404)
        return self.members[user_id]


class StubClient:
    def __init__(self, *guilds: StubGuild) -> None:
        self.guilds = list(guilds)

    def get_guild(self, guild_id: int) -> StubGuild | None:
        return next((guild for guild in self.guilds if guild.id == guild_id), None)


async def _dm_allowed(policy: AccessPolicy, user_id: int) -> bool:
    user = cast(discord.User, SimpleNamespace(id=user_id))
    return await policy.allows(user=user, guild_id=None, channel=None, channel_id=9)


def _policy(client: StubClient, **settings: Any) -> AccessPolicy:
    return AccessPolicy(cast(discord.Client, client), DiscordSettings(**settings))


async def test_without_guild_or_role_lists_dms_need_no_lookup() -> None:
    guild = StubGuild(1)
    policy = _policy(StubClient(guild), allowed_channel_ids=[5])
    assert await _dm_allowed(policy, 7)
    assert guild.lookups == []
    assert not await _dm_allowed(_policy(StubClient(guild), allow_dms=False), 7)


async def test_the_user_list_applies_before_any_lookup() -> None:
    guild = StubGuild(1, members={7: _member()})
    policy = _policy(StubClient(guild), allowed_guild_ids=[1], allowed_user_ids=[8])
    assert not await _dm_allowed(policy, 7)
    assert guild.lookups == []


async def test_a_listed_guild_counts_only_its_members() -> None:
    listed, other = StubGuild(1, members={7: _member()}), StubGuild(2, members={8: _member()})
    policy = _policy(StubClient(listed, other), allowed_guild_ids=[1])
    assert await _dm_allowed(policy, 7)
    assert not await _dm_allowed(policy, 8)
    assert other.lookups == []


async def test_with_only_roles_listed_only_guilds_holding_such_a_role_are_asked() -> None:
    with_role = StubGuild(1, role_ids={ROLE}, members={7: _member(ROLE), 8: _member(OTHER_ROLE)})
    without = StubGuild(2, role_ids={OTHER_ROLE}, members={8: _member(OTHER_ROLE)})
    policy = _policy(StubClient(without, with_role), allowed_role_ids=[ROLE])
    assert await _dm_allowed(policy, 7)
    assert not await _dm_allowed(policy, 8)
    assert without.lookups == []


async def test_a_cached_member_needs_no_rest_call() -> None:
    guild = StubGuild(1, role_ids={ROLE}, cached={7: _member(ROLE)})
    assert await _dm_allowed(_policy(StubClient(guild), allowed_role_ids=[ROLE]), 7)
    assert guild.lookups == []


async def test_verdicts_are_remembered() -> None:
    guild = StubGuild(1, members={7: _member()})
    policy = _policy(StubClient(guild), allowed_guild_ids=[1])
    for _ in range(3):
        assert await _dm_allowed(policy, 7)
        assert not await _dm_allowed(policy, 8)
    assert guild.lookups == [7, 8]


@pytest.mark.parametrize("problem", ["lookup fails", "guild unavailable", "guild not cached"])
async def test_an_uncertain_refusal_is_not_remembered(problem: str, caplog: pytest.LogCaptureFixture) -> None:
    good = StubGuild(1, members={7: _member()})
    bad = StubGuild(
        2,
        failure=500 if problem == "lookup fails" else None,
        unavailable=problem == "guild unavailable",
    )
    client = StubClient(good) if problem == "guild not cached" else StubClient(good, bad)
    policy = _policy(client, allowed_guild_ids=[1, 2])
    assert not await _dm_allowed(policy, 8)
    assert not await _dm_allowed(policy, 8)
    assert good.lookups == [8, 8], "asked again: the refusal was not final"
    assert await _dm_allowed(policy, 7)
    if problem == "lookup fails":
        assert "could not check whether user 8 is a member of guild 2 (HTTP 500)" in caplog.text
