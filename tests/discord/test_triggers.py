"""Mention stripping and conversation scopes."""

from __future__ import annotations

from bot.content import ConversationScope
from bot.discord.triggers import parent_scope, scope_of, strip_mention


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
