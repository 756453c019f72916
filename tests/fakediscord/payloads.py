"""Discord API v10 JSON objects, shaped the way discord.py 2.x parses them (only the fields it reads)."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime
from typing import Any

Json = dict[str, Any]

DISCORD_EPOCH_MS = 1_420_070_400_000
ALL_PERMISSIONS = str((1 << 50) - 1)
GATEWAY_MESSAGE_CONTENT_LIMITED = (
    1 << 19
)  # the application flag of a bot under 100 servers with the intent on
_counter = itertools.count()


def snowflake(at: float | None = None, *, shard: tuple[int, int] | None = None) -> int:
    """A unique id whose timestamp is `at` (default now), as Discord makes them; discord.py reads the time.

    With `shard=(shard_id, shard_count)`, a guild id whose events go to that shard (up to count ms earlier).
    """
    millis = int((time.time() if at is None else at) * 1000) - DISCORD_EPOCH_MS
    if shard is not None:
        shard_id, shard_count = shard
        millis -= (millis - shard_id) % shard_count
    return (millis << 22) | (next(_counter) % (1 << 22))


def shard_of(guild_id: int | None, shard_count: int) -> int:
    """The shard that receives a guild's events, by Discord's rule; DMs (no guild) go to shard 0."""
    return 0 if guild_id is None else (guild_id >> 22) % shard_count


def iso_now() -> str:
    return datetime.now(UTC).isoformat()


def user(user_id: int, name: str, *, bot: bool = False) -> Json:
    return {
        "id": str(user_id),
        "username": name,
        "global_name": name,
        "discriminator": "0",
        "avatar": None,
        "bot": bot,
        "public_flags": 0,
    }


def member(roles: list[int], *, with_user: Json | None = None) -> Json:
    data: Json = {
        "roles": [str(role) for role in roles],
        "joined_at": iso_now(),
        "deaf": False,
        "mute": False,
        "flags": 0,
        "nick": None,
        "pending": False,
        "avatar": None,
        "communication_disabled_until": None,
        "permissions": ALL_PERMISSIONS,
    }
    if with_user is not None:
        data["user"] = with_user
    return data


def role(role_id: int, name: str, *, position: int = 1, bot_id: int | None = None) -> Json:
    """A guild role; with `bot_id`, the role Discord manages for that bot (its integration role)."""
    data: Json = {
        "id": str(role_id),
        "name": name,
        "permissions": ALL_PERMISSIONS,
        "position": position,
        "color": 0,
        "hoist": False,
        "managed": bot_id is not None,
        "mentionable": True,
        "flags": 0,
    }
    if bot_id is not None:
        data["tags"] = {"bot_id": str(bot_id)}
    return data


def text_channel(channel_id: int, guild_id: int, name: str) -> Json:
    return {
        "id": str(channel_id),
        "type": 0,
        "guild_id": str(guild_id),
        "name": name,
        "position": 0,
        "permission_overwrites": [],
        "nsfw": False,
        "parent_id": None,
        "topic": None,
        "last_message_id": None,
        "rate_limit_per_user": 0,
    }


def thread(thread_id: int, guild_id: int, parent_id: int, owner_id: int, name: str) -> Json:
    return {
        "id": str(thread_id),
        "type": 11,
        "guild_id": str(guild_id),
        "parent_id": str(parent_id),
        "owner_id": str(owner_id),
        "name": name,
        "last_message_id": None,
        "message_count": 0,
        "member_count": 1,
        "rate_limit_per_user": 0,
        "flags": 0,
        "thread_metadata": {
            "archived": False,
            "auto_archive_duration": 1440,
            "archive_timestamp": iso_now(),
            "locked": False,
        },
    }


def dm_channel(channel_id: int, recipient: Json) -> Json:
    return {"id": str(channel_id), "type": 1, "recipients": [recipient], "last_message_id": None}


def guild(
    guild_id: int, name: str, owner_id: int, *, roles: list[Json], channels: list[Json], me: Json
) -> Json:
    return {
        "id": str(guild_id),
        "name": name,
        "icon": None,
        "owner_id": str(owner_id),
        "roles": [role(guild_id, "@everyone", position=0), *roles],
        "emojis": [],
        "stickers": [],
        "features": [],
        "member_count": 2,
        "members": [me],
        "channels": channels,
        "threads": [],
        "large": False,
        "unavailable": False,
        "joined_at": iso_now(),
        "voice_states": [],
        "presences": [],
        "stage_instances": [],
        "guild_scheduled_events": [],
        "premium_tier": 0,
        "preferred_locale": "en-US",
        "verification_level": 0,
        "default_message_notifications": 0,
        "explicit_content_filter": 0,
        "mfa_level": 0,
        "nsfw_level": 0,
        "system_channel_flags": 0,
        "afk_timeout": 300,
    }


def attachment(attachment_id: int, filename: str, url: str, size: int, content_type: str | None) -> Json:
    data: Json = {"id": str(attachment_id), "filename": filename, "size": size, "url": url, "proxy_url": url}
    if content_type is not None:
        data["content_type"] = content_type
    return data


def message(
    message_id: int,
    channel_id: int,
    author: Json,
    content: str,
    *,
    guild_id: int | None = None,
    author_member: Json | None = None,
    mentions: list[Json] | None = None,
    mention_roles: list[int] | None = None,
    attachments: list[Json] | None = None,
    reference: Json | None = None,
    referenced_message: Json | None = None,
    flags: int = 0,
) -> Json:
    data: Json = {
        "id": str(message_id),
        "channel_id": str(channel_id),
        "author": author,
        "content": content,
        "timestamp": iso_now(),
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": mentions or [],
        "mention_roles": [str(role_id) for role_id in mention_roles or []],
        "attachments": attachments or [],
        "embeds": [],
        "pinned": False,
        "type": 19 if reference is not None else 0,
        "flags": flags,
    }
    if guild_id is not None:
        data["guild_id"] = str(guild_id)
    if author_member is not None:
        data["member"] = author_member
    if reference is not None:
        data["message_reference"] = reference
        data["referenced_message"] = referenced_message
    return data


def partial_guild(data: Json) -> Json:
    """A guild as `GET /users/@me/guilds` lists it."""
    return {
        "id": data["id"],
        "name": data["name"],
        "icon": None,
        "owner": False,
        "permissions": ALL_PERMISSIONS,
        "features": [],
    }


def application(application_id: int, owner: Json, *, flags: int) -> Json:
    return {
        "id": str(application_id),
        "name": "Vision Bot",
        "icon": None,
        "description": "",
        "rpc_origins": [],
        "bot_public": True,
        "bot_require_code_grant": False,
        "owner": owner,
        "team": None,
        "verify_key": "0" * 64,
        "flags": flags,
        "summary": "",
    }
