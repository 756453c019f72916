"""Forgetting a conversation, the retention purge, and statistics."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select, update

from bot.store import ConversationStats, ConversationStore, ForgetResult, NewTurn, PurgeResult
from bot.store.database import create_engine_for
from bot.store.models import Media, Message, utcnow
from tests.store.factories import question, scope, write_media


def media_hashes_in_db(database_url: str) -> set[str]:
    engine = create_engine_for(database_url)
    try:
        with engine.connect() as connection:
            return set(connection.execute(select(Media.sha256)).scalars())
    finally:
        engine.dispose()


def age_messages(database_url: str, conversation_id: int, *, positions: range, days: int) -> None:
    """Pretend these messages were written `days` ago."""
    engine = create_engine_for(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                update(Message)
                .where(Message.conversation_id == conversation_id, Message.position.in_(positions))
                .values(created_at=utcnow() - timedelta(days=days))
            )
    finally:
        engine.dispose()


async def test_forget_deletes_only_files_nothing_else_uses(
    store: ConversationStore, database_url: str, media_dir: Path
) -> None:
    mine, shared, theirs = (write_media(media_dir, seed) for seed in (1, 2, 3))
    one = await store.conversation_for(scope(1))
    two = await store.conversation_for(scope(2))
    await store.record_turn(one, NewTurn(question("a", mine, shared), "x", question_discord_id=1))
    await store.record_turn(one, NewTurn(question("b", mine), "y", question_discord_id=2))
    await store.record_turn(two, NewTurn(question("c", shared, theirs), "z", question_discord_id=3))

    result = await store.forget(one)

    assert result == ForgetResult(messages_deleted=4, media_deleted=1)
    assert not mine.path.exists()
    assert shared.path.is_file() and theirs.path.is_file()
    assert media_hashes_in_db(database_url) == {shared.sha256, theirs.sha256}
    assert await store.load_window(one, 10) == []
    assert (await store.load_window(two, 10))[0].media == (shared, theirs)


async def test_forgotten_scope_starts_afresh(store: ConversationStore) -> None:
    conversation = await store.conversation_for(scope(1))
    await store.record_turn(conversation, NewTurn(question("old"), "x", question_discord_id=1))
    await store.forget(conversation)

    again = await store.conversation_for(scope(1))
    await store.record_turn(again, NewTurn(question("new"), "y", question_discord_id=2))

    assert [m.text for m in await store.load_window(again, 10)] == ["new", "y"]
    assert not await store.is_recorded(again, 1)
    assert await store.stats(again) == ConversationStats(turns=1, images=0, videos=0)


async def test_forgetting_a_parent_keeps_the_thread_and_its_files(
    store: ConversationStore, media_dir: Path
) -> None:
    image = write_media(media_dir, 1)
    parent = await store.conversation_for(scope(1))
    await store.record_turn(parent, NewTurn(question("look", image), "seen", question_discord_id=10))
    thread = await store.fork_thread(parent, 10, scope(1, thread_id=10), max_messages=40)

    assert await store.forget(parent) == ForgetResult(messages_deleted=2, media_deleted=0)

    assert image.path.is_file()
    assert (await store.load_window(thread, 10))[0].media == (image,)


async def test_purge_deletes_old_turns_everywhere_and_orphaned_media(
    store: ConversationStore, database_url: str, media_dir: Path
) -> None:
    old_only, still_used = write_media(media_dir, 1), write_media(media_dir, 2)
    one = await store.conversation_for(scope(1))
    two = await store.conversation_for(scope(2))
    await store.record_turn(one, NewTurn(question("old", old_only, still_used), "x", question_discord_id=1))
    await store.record_turn(one, NewTurn(question("recent", still_used), "y", question_discord_id=2))
    await store.record_turn(two, NewTurn(question("old elsewhere"), "z", question_discord_id=3))
    age_messages(database_url, one, positions=range(0, 2), days=40)
    age_messages(database_url, two, positions=range(0, 2), days=31)

    result = await store.purge_older_than(30)

    assert result == PurgeResult(messages_deleted=4, media_deleted=1)
    assert [m.text for m in await store.load_window(one, 10)] == ["recent", "y"]
    assert await store.load_window(two, 10) == []
    assert not old_only.path.exists() and still_used.path.is_file()
    assert media_hashes_in_db(database_url) == {still_used.sha256}
    assert await store.purge_older_than(30) == PurgeResult(messages_deleted=0, media_deleted=0)


async def test_purge_keeps_everything_newer_than_the_cutoff(
    store: ConversationStore, database_url: str
) -> None:
    conversation = await store.conversation_for(scope(1))
    await store.record_turn(conversation, NewTurn(question("q"), "a", question_discord_id=1))
    age_messages(database_url, conversation, positions=range(0, 2), days=29)

    assert await store.purge_older_than(30) == PurgeResult(messages_deleted=0, media_deleted=0)
    engine = create_engine_for(database_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(select(func.count()).select_from(Message)).scalar_one() == 2
    finally:
        engine.dispose()


async def test_stats_counts_turns_images_and_videos(store: ConversationStore, media_dir: Path) -> None:
    conversation = await store.conversation_for(scope(1))
    first, second = write_media(media_dir, 1), write_media(media_dir, 2)
    clip = write_media(media_dir, 3, kind="video")
    await store.record_turn(conversation, NewTurn(question("a", first, second), "x", question_discord_id=1))
    await store.record_turn(conversation, NewTurn(question("b", first, clip), "y", question_discord_id=2))
    await store.record_turn(conversation, NewTurn(question("c"), "z", question_discord_id=3))

    assert await store.stats(conversation) == ConversationStats(turns=3, images=3, videos=1)
    assert await store.stats(await store.conversation_for(scope(2))) == ConversationStats(0, 0, 0)
