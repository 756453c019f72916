"""Who may talk to the bot, DMs included: the allow-lists, plus guild membership for DMs.

A DM carries no guild and no roles. When guild or role allow-lists are set, a DM is therefore allowed only to
a member of an allowed guild (any guild the bot is in when only roles are listed) who holds an allowed role
(when roles are listed). Membership comes from the member cache, else over REST (no privileged intent
needed); each user's verdict is kept for a few minutes, so a DM conversation costs no REST call per message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import discord

from bot.settings import DiscordSettings

log = logging.getLogger("bot.discord.access")

VERDICT_TTL_SECONDS = 300.0
MAX_VERDICTS = 10_000

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """A bounded mapping whose entries expire `ttl` seconds after they were stored; when full, the entry
    stored longest ago goes first."""

    def __init__(self, ttl: float, max_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._max_size = max_size
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}  # in storing order, so also in expiry order

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """The value stored for `key`, or None when there is none or it has expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        return value

    def put(self, key: K, value: V) -> None:
        """Store `value` for `key` for the next `ttl` seconds."""
        self._entries.pop(key, None)
        self._entries[key] = (self._clock() + self._ttl, value)
        while len(self._entries) > self._max_size:
            del self._entries[next(iter(self._entries))]


class AccessPolicy:
    """The allow-lists of `settings` as applied to messages and interactions received by `client`."""

    def __init__(
        self,
        client: discord.Client,
        settings: DiscordSettings,
        verdicts: TtlCache[int, bool] | None = None,
    ) -> None:
        self._client = client
        self._settings = settings
        self._verdicts = verdicts or TtlCache(VERDICT_TTL_SECONDS, MAX_VERDICTS)

    async def allows(
        self,
        *,
        user: discord.User | discord.Member,
        guild_id: int | None,
        channel: discord.abc.Messageable | None,
        channel_id: int,
    ) -> bool:
        """Whether `user` may talk to the bot in this channel (`guild_id` None: in a DM)."""
        if not is_allowed(
            self._settings, user=user, guild_id=guild_id, channel=channel, channel_id=channel_id
        ):
            return False
        if guild_id is not None or not (self._settings.allowed_guild_ids or self._settings.allowed_role_ids):
            return True
        verdict = self._verdicts.get(user.id)
        if verdict is None:
            verdict, certain = await self._dm_verdict(user.id)
            if certain:
                self._verdicts.put(user.id, verdict)
        return verdict

    async def _dm_verdict(self, user_id: int) -> tuple[bool, bool]:
        """(allowed, certain): whether `user_id` is an allowed member of an allowed guild, and whether a
        refusal is final (no guild was missing from the cache and no lookup failed)."""
        guilds, certain = self._candidate_guilds()
        for guild in guilds:
            member = guild.get_member(user_id)
            if member is None:
                try:
                    member = await guild.fetch_member(user_id)
                except discord.NotFound:
                    continue
                except discord.HTTPException as exc:
                    log.warning(
                        "could not check whether user %s is a member of guild %s (HTTP %s): %s",
                        user_id,
                        guild.id,
                        exc.status,
                        exc.text,
                    )
                    certain = False
                    continue
            if self._holds_allowed_role(member):
                return True, True
        log.info("ignoring DMs of user %s: not an allowed member of an allowed guild", user_id)
        return False, certain

    def _candidate_guilds(self) -> tuple[list[discord.Guild], bool]:
        """The cached guilds where an allowed member could be found, and whether none was missing (a listed
        guild not cached, or a guild still unavailable, e.g. right after connecting)."""
        allowed_roles = self._settings.allowed_role_ids
        listed = self._settings.allowed_guild_ids
        found = [self._client.get_guild(guild_id) for guild_id in listed] if listed else self._client.guilds
        available = [guild for guild in found if guild is not None and not guild.unavailable]
        complete = len(available) == len(found)
        if allowed_roles:  # a role belongs to one guild: only guilds holding an allowed role can qualify
            available = [guild for guild in available if any(guild.get_role(role) for role in allowed_roles)]
        return available, complete

    def _holds_allowed_role(self, member: discord.Member) -> bool:
        allowed_roles = self._settings.allowed_role_ids
        return not allowed_roles or any(role.id in allowed_roles for role in member.roles)


def is_allowed(
    settings: DiscordSettings,
    *,
    user: discord.User | discord.Member,
    guild_id: int | None,
    channel: discord.abc.Messageable | None,
    channel_id: int,
) -> bool:
    """Whether the allow-lists let `user` talk to the bot here (an empty list allows everything).

    A DM passes when DMs are allowed; `AccessPolicy` then checks guild membership where guild or role lists
    are set."""
    if settings.allowed_user_ids and user.id not in settings.allowed_user_ids:
        return False
    if guild_id is None:
        return settings.allow_dms
    if settings.allowed_guild_ids and guild_id not in settings.allowed_guild_ids:
        return False
    if settings.allowed_channel_ids:
        channel_ids = {channel_id}
        if isinstance(channel, discord.Thread) and channel.parent_id is not None:
            channel_ids.add(channel.parent_id)
        if channel_ids.isdisjoint(settings.allowed_channel_ids):
            return False
    return not settings.allowed_role_ids or not role_ids_of(user).isdisjoint(settings.allowed_role_ids)


def role_ids_of(user: discord.abc.User) -> frozenset[int]:
    """A guild member's role ids (none for a user met in a DM). Read from the ids the event carried, which
    are there even before the guild is cached, when discord.py's `Member.roles` cannot resolve them."""
    return frozenset(user._roles) if isinstance(user, discord.Member) else frozenset()
