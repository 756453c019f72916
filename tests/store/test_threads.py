"""Forking a thread from a parent conversation."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from bot.content import MediaPart
from bot.store import ConversationStore, NewTurn
from bot.store.database import create_engine_for
from bot.store.models import Conversation
from tests.store.factories import question, scope, write_media


async def parent_with_turns(store: ConversationStore, turns: int) -> int:
    """A channel conversation whose turn n has question id 100+n and answer id 200+n."""
    parent = await store.conversation_for(scope(1))
    for n in range(turns):
        await store.record_turn(
            parent,
            NewTurn(question(f"q{n}"), f"a{n}", question_discord_id=100 + n, answer_discord_id=200 + n),
        )
    return parent


def texts(window) -> list[str]:
    return [message.text for message in window]


@pytest.mark.parametrize("fork_from", [101, 201], ids=["from-question", "from-answer"])
async def test_thread_sees_the_parent_up_to_and_including_the_fork_turn(
    store: ConversationStore, fork_from: int
) -> None:
    parent = await parent_with_turns(store, 4)

    thread = await store.fork_thread(parent, fork_from, scope(1, thread_id=fork_from), max_messages=40)

    assert texts(await store.load_window(thread, 40)) == ["q0", "a0", "q1", "a1"]
    assert texts(await store.load_window(parent, 40)) == ["q0", "a0", "q1", "a1", "q2", "a2", "q3", "a3"]


@pytest.mark.parametrize("fork_from", [None, 999], ids=["no-message", "unknown-message"])
async def test_thread_without_a_known_fork_message_copies_the_whole_history(
    store: ConversationStore, fork_from: int | None
) -> None:
    parent = await parent_with_turns(store, 3)

    thread = await store.fork_thread(parent, fork_from, scope(1, thread_id=55), max_messages=40)

    assert texts(await store.load_window(thread, 40)) == ["q0", "a0", "q1", "a1", "q2", "a2"]


async def test_copy_is_bounded_to_the_newest_whole_turns(store: ConversationStore) -> None:
    parent = await parent_with_turns(store, 5)

    thread = await store.fork_thread(parent, 103, scope(1, thread_id=103), max_messages=5)

    assert texts(await store.load_window(thread, 40)) == ["q2", "a2", "q3", "a3"]


async def test_thread_and_parent_diverge_after_the_fork(store: ConversationStore) -> None:
    parent = await parent_with_turns(store, 2)
    thread = await store.fork_thread(parent, 100, scope(1, thread_id=100), max_messages=40)

    await store.record_turn(parent, NewTurn(question("parent later"), "p", question_discord_id=300))
    await store.record_turn(thread, NewTurn(question("thread only"), "t", question_discord_id=301))

    assert texts(await store.load_window(thread, 40)) == ["q0", "a0", "thread only", "t"]
    assert texts(await store.load_window(parent, 40)) == ["q0", "a0", "q1", "a1", "parent later", "p"]
    # Copies carry no Discord ids: the originals stay the parent's.
    assert not await store.is_recorded(thread, 100)
    assert await store.is_recorded(parent, 100) and not await store.is_recorded(parent, 301)
    assert await store.is_recorded(thread, 301)


async def test_fork_is_idempotent(store: ConversationStore) -> None:
    parent = await parent_with_turns(store, 2)
    thread = await store.fork_thread(parent, 100, scope(1, thread_id=100), max_messages=40)
    await store.record_turn(thread, NewTurn(question("in thread"), "t", question_discord_id=400))

    again = await store.fork_thread(parent, 101, scope(1, thread_id=100), max_messages=40)

    assert again == thread
    assert texts(await store.load_window(thread, 40)) == ["q0", "a0", "in thread", "t"]


async def test_thread_records_its_parent_and_fork_message(
    store: ConversationStore, database_url: str
) -> None:
    parent = await parent_with_turns(store, 1)
    thread = await store.fork_thread(parent, 100, scope(1, thread_id=100), max_messages=40)

    engine = create_engine_for(database_url)
    try:
        with engine.connect() as connection:
            row = connection.execute(
                select(
                    Conversation.parent_conversation_id,
                    Conversation.fork_from_discord_message_id,
                    Conversation.thread_id,
                ).where(Conversation.id == thread)
            ).one()
    finally:
        engine.dispose()
    assert tuple(row) == (parent, 100, 100)


async def test_thread_copies_media_links(store: ConversationStore, media_dir: Path) -> None:
    parent = await store.conversation_for(scope(1))
    image = write_media(media_dir, 1)
    await store.record_turn(parent, NewTurn(question("look", image), "seen", question_discord_id=100))

    thread = await store.fork_thread(parent, 100, scope(1, thread_id=100), max_messages=40)

    [asked, _] = await store.load_window(thread, 40)
    assert asked.parts[0] == MediaPart(image)
    assert (await store.stats(thread)).images == 1


async def test_fork_from_an_unknown_parent_fails(store: ConversationStore) -> None:
    with pytest.raises(LookupError):
        await store.fork_thread(12345, None, scope(1, thread_id=9), max_messages=40)
    assert await store.find_conversation(scope(1, thread_id=9)) is None
