"""Small decisions about Discord messages: whether one is for the bot, which conversation, what was asked."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import discord

from bot.answering import AttachmentRef
from bot.content import ConversationScope


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


@dataclass(frozen=True, slots=True)
class Trigger:
    """Why a message is for the bot."""

    reason: Literal["mention", "reply", "bot thread", "answer thread", "dm"]
    in_bot_thread: bool  # a thread the bot opened or talks in: its conversation goes on there, no fork


async def trigger_of(
    message: discord.Message,
    *,
    bot_id: int,
    scope: ConversationScope,
    channel: discord.abc.Messageable,
    referenced: discord.Message | None,
    threads_without_mention: bool,
    has_conversation: Callable[[ConversationScope], Awaitable[bool]],
    started_from_bot_message: Callable[[discord.abc.Messageable], Awaitable[bool]],
) -> Trigger | None:
    """Why `message` (already allowed, from a user) is for the bot, or None when it is not.

    In order: it mentions the bot or the bot's managed role ("@Bot" picked as the role); it replies to one of
    the bot's messages (`referenced`; a forward is no reply); with `threads_without_mention`, it is in a
    thread the bot opened or talks in, or in a thread started from one of the bot's messages (an answer: its
    first question forks the channel's history up to there); it is a DM.
    """
    in_bot_thread = (
        scope.thread_id is not None
        and threads_without_mention
        and (_opened_by(channel, bot_id) or await has_conversation(scope))
    )
    role_id = bot_role_id(message)
    if (
        bot_id in message.raw_mentions
        or any(user.id == bot_id for user in message.mentions)
        or (role_id is not None and role_id in message.raw_role_mentions)
    ):
        return Trigger("mention", in_bot_thread)
    if referenced is not None and referenced.author.id == bot_id:
        return Trigger("reply", in_bot_thread)
    if in_bot_thread:
        return Trigger("bot thread", in_bot_thread)
    if threads_without_mention and scope.thread_id is not None and await started_from_bot_message(channel):
        return Trigger("answer thread", in_bot_thread=False)
    if scope.guild_id is None:
        return Trigger("dm", in_bot_thread)
    return None


def _opened_by(channel: discord.abc.Messageable, user_id: int) -> bool:
    """Whether `channel` is a thread that `user_id` started (the bot's own threads are its conversations,
    even before a first answer was stored there, e.g. after an attachment failed to download)."""
    return isinstance(channel, discord.Thread) and channel.owner_id == user_id
