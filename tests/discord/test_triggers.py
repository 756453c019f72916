"""Mention stripping, conversation scopes, and whether a message is for the bot."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import discord

from bot.content import ConversationScope
from bot.discord.triggers import parent_scope, scope_of, strip_mention, trigger_of


def test_strip_mention_removes_both_forms_and_keeps_other_mentions() -> None:
    assert strip_mention("<@42> what is this?", 42) == "what is this?"
    assert strip_mention("hey <@!42>, and <@7> too", 42) == "hey  , and <@7> too"
    assert strip_mention("<@42>", 42) == ""
    assert strip_mention("<@421> not me", 42) == "<@421> not me"


def test_scope_of_a_channel_and_a_dm() -> None:
    assert scope_of(None, 5, 10) == ConversationScope("discord", channel_id=10, guild_id=5)
    assert scope_of(None, None, 11) == ConversationScope("discord", channel_id=11)


def test_parent_scope_drops_the_thread() -> None:
    thread = ConversationScope("discord", channel_id=10, guild_id=5, thread_id=99)
    assert parent_scope(thread) == ConversationScope("discord", channel_id=10, guild_id=5)


BOT = 42
CHANNEL = ConversationScope("discord", channel_id=10, guild_id=5)
THREAD = ConversationScope("discord", channel_id=10, guild_id=5, thread_id=99)
DM = ConversationScope("discord", channel_id=11)


def message(
    *, mentions: tuple[int, ...] = (), role_mentions: tuple[int, ...] = (), bot_role: int | None = None
):
    """A stand-in with what `trigger_of` reads of a discord.Message."""
    guild = SimpleNamespace(self_role=SimpleNamespace(id=bot_role) if bot_role else None)
    return cast(
        discord.Message,
        SimpleNamespace(
            raw_mentions=list(mentions), mentions=[], raw_role_mentions=list(role_mentions), guild=guild
        ),
    )


def author(user_id: int) -> discord.Message:
    return cast(discord.Message, SimpleNamespace(author=SimpleNamespace(id=user_id)))


async def decide(
    sent: discord.Message,
    scope: ConversationScope,
    *,
    referenced: discord.Message | None = None,
    talks_there: bool = False,
    from_bot_message: bool = False,
    threads_without_mention: bool = True,
) -> str | None:
    channel = cast(discord.abc.Messageable, SimpleNamespace())

    async def has_conversation(asked: ConversationScope) -> bool:
        assert asked == scope
        return talks_there

    async def started_from_bot_message(thread: discord.abc.Messageable) -> bool:
        assert thread is channel
        return from_bot_message

    trigger = await trigger_of(
        sent,
        bot_id=BOT,
        scope=scope,
        channel=channel,
        referenced=referenced,
        threads_without_mention=threads_without_mention,
        has_conversation=has_conversation,
        started_from_bot_message=started_from_bot_message,
    )
    return None if trigger is None else f"{trigger.reason}{' (bot thread)' if trigger.in_bot_thread else ''}"


async def test_what_makes_a_message_for_the_bot() -> None:
    assert await decide(message(mentions=(BOT,)), CHANNEL) == "mention"
    assert await decide(message(role_mentions=(77,), bot_role=77), CHANNEL) == "mention", "the managed role"
    assert await decide(message(role_mentions=(78,), bot_role=77), CHANNEL) is None, "another role"
    assert await decide(message(mentions=(7,)), CHANNEL) is None, "someone else"
    assert await decide(message(), CHANNEL, referenced=author(BOT)) == "reply"
    assert await decide(message(), CHANNEL, referenced=author(7)) is None, "a reply to someone else"
    assert await decide(message(), DM) == "dm"


async def test_a_thread_the_bot_talks_in_needs_no_mention_unless_configured() -> None:
    assert await decide(message(), THREAD, talks_there=True) == "bot thread (bot thread)"
    assert await decide(message(), THREAD, talks_there=False) is None
    assert await decide(message(), THREAD, talks_there=True, threads_without_mention=False) is None
    # A mention there continues the thread's own conversation (no fork from the parent channel).
    assert await decide(message(mentions=(BOT,)), THREAD, talks_there=True) == "mention (bot thread)"


async def test_a_thread_started_from_an_answer_needs_no_mention_and_forks() -> None:
    # Not yet a conversation of its own: the first question there forks the channel's history.
    assert await decide(message(), THREAD, from_bot_message=True) == "answer thread"
    assert await decide(message(), THREAD, from_bot_message=True, threads_without_mention=False) is None
    assert await decide(message(), CHANNEL, from_bot_message=True) is None, "only threads"
