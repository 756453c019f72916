"""Small pure decisions about Discord objects: who may talk to the bot, which conversation, what was asked."""

from __future__ import annotations

import dataclasses
import re

import discord

from bot.answering import AttachmentRef
from bot.content import ConversationScope
from bot.settings import DiscordSettings


def guild_id_of(message: discord.Message) -> int | None:
    """The guild a message was sent in, or None for a DM.

    Right after connecting, a guild may not be cached yet: its messages then arrive with `guild` None and a
    `PartialMessageable` channel that still carries the guild id. They must not pass for DMs.
    """
    if message.guild is not None:
        return message.guild.id
    return getattr(message.channel, "guild_id", None)


def scope_of(
    channel: discord.abc.Messageable | None, guild_id: int | None, channel_id: int
) -> ConversationScope:
    """The conversation a channel holds; a thread's scope names its parent channel and itself."""
    if isinstance(channel, discord.Thread) and channel.parent_id is not None:
        return ConversationScope(
            "discord", channel_id=channel.parent_id, guild_id=guild_id, thread_id=channel.id
        )
    return ConversationScope("discord", channel_id=channel_id, guild_id=guild_id)


def parent_scope(scope: ConversationScope) -> ConversationScope:
    """The scope of the channel a thread scope belongs to."""
    return dataclasses.replace(scope, thread_id=None)


def strip_mention(text: str, user_id: int, role_id: int | None = None) -> str:
    """`text` without mentions of `user_id` (`<@id>`, legacy `<@!id>`) and of its managed role `role_id`."""
    if role_id is not None:
        text = re.sub(rf"<@&{role_id}>", " ", text)
    return re.sub(rf"<@!?{user_id}>", " ", text).strip()


def bot_role_id(message: discord.Message) -> int | None:
    """The id of the role Discord manages for this bot in the message's guild, if known."""
    role = message.guild.self_role if message.guild is not None else None
    return role.id if role is not None else None


def attachment_refs(attachments: list[discord.Attachment]) -> tuple[AttachmentRef, ...]:
    """What the answering service needs to download each attachment."""
    return tuple(
        AttachmentRef(url=item.url, filename=item.filename, size=item.size, content_type=item.content_type)
        for item in attachments
    )


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
    if settings.allowed_role_ids:
        roles = {role.id for role in user.roles} if isinstance(user, discord.Member) else set()
        if roles.isdisjoint(settings.allowed_role_ids):
            return False
    return True
