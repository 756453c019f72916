"""Conversations, recording turns (atomic, once per Discord id) and loading the window."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select

from bot.content import ChatMessage, ConversationScope, MediaPart, TextPart
from bot.errors import StoreError
from bot.store import ConversationStore, NewTurn, RecordedTurn
from bot.store import sync_store as sync_store_module
from bot.store.database import create_engine_for
from bot.store.models import Conversation, Media, Message, MessageMedia, utcnow
from tests.store.backend import postgresql_only, sqlite_only
from tests.store.factories import question, scope, write_media


def count_rows(database_url: str, model: type) -> int:
    engine = create_engine_for(database_url)
    try:
        with engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(model)).scalar_one()
    finally:
        engine.dispose()


async def record(store: ConversationStore, conversation_id: int, n: int, *, discord_id: int | None = None):
    return await store.record_turn(
        conversation_id, NewTurn(question(f"q{n}"), f"a{n}", question_discord_id=discord_id or 1000 + n)
    )


async def test_conversation_for_gets_or_creates_one_per_scope(store: ConversationStore) -> None:
    assert await store.find_conversation(scope(1)) is None

    first = await store.conversation_for(scope(1))

    assert await store.conversation_for(scope(1)) == first
    assert await store.find_conversation(scope(1)) == first
    assert await store.conversation_for(scope(1, thread_id=5)) != first


async def test_conversation_for_survives_a_concurrent_creator(
    store: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing = await store.conversation_for(scope(1))
    real_lookup = sync_store_module._conversation_id
    calls: list[str] = []

    def lookup_misses_once(session, key):  # another process inserts between our lookup and our insert
        calls.append(key)
        return None if len(calls) == 1 else real_lookup(session, key)

    monkeypatch.setattr(sync_store_module, "_conversation_id", lookup_misses_once)

    assert await store.conversation_for(scope(1)) == existing
    assert len(calls) == 2


async def test_work_runs_on_the_store_thread(
    store: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    real_lookup = sync_store_module._conversation_id

    def spy(session, key):
        threads.append(threading.current_thread().name)
        return real_lookup(session, key)

    monkeypatch.setattr(sync_store_module, "_conversation_id", spy)
    await store.conversation_for(scope(1))
    await store.find_conversation(scope(2))

    assert len(threads) == 2
    assert all(name.startswith("conversation-store") for name in threads)
    assert threading.current_thread().name not in threads


async def test_record_turn_stores_question_media_and_answer(
    store: ConversationStore, database_url: str, media_dir: Path
) -> None:
    conversation = await store.conversation_for(scope(1))
    image = write_media(media_dir, 1)

    turn = await store.record_turn(
        conversation, NewTurn(question("what is this?", image, image), "a square", question_discord_id=11)
    )

    assert not turn.duplicate
    assert turn.user_message_id < turn.assistant_message_id, "the question is written before its answer"
    assert await store.is_recorded(conversation, 11)
    assert not await store.is_recorded(conversation, 12)
    assert count_rows(database_url, Media) == 1  # one row per file, however often it appears
    assert count_rows(database_url, MessageMedia) == 1
    window = await store.load_window(conversation, 10)
    assert window == [
        ChatMessage("user", (MediaPart(image), MediaPart(image), TextPart("what is this?"))),
        ChatMessage("assistant", (TextPart("a square"),)),
    ]


async def test_same_question_id_is_recorded_once(store: ConversationStore, database_url: str) -> None:
    conversation = await store.conversation_for(scope(1))
    first = await store.record_turn(conversation, NewTurn(question("hi"), "hello", question_discord_id=42))

    again = await store.record_turn(
        conversation, NewTurn(question("hi"), "hello again", question_discord_id=42)
    )

    assert again == RecordedTurn(first.user_message_id, first.assistant_message_id, duplicate=True)
    assert count_rows(database_url, Message) == 2
    assert [m.text for m in await store.load_window(conversation, 10)] == ["hi", "hello"]


async def test_same_question_id_in_another_conversation_is_a_new_turn(store: ConversationStore) -> None:
    one = await store.conversation_for(scope(1))
    two = await store.conversation_for(scope(2))
    await store.record_turn(one, NewTurn(question("hi"), "hello", question_discord_id=42))

    turn = await store.record_turn(two, NewTurn(question("hi"), "hello", question_discord_id=42))

    assert not turn.duplicate


async def test_failed_turn_writes_nothing(
    store: ConversationStore, database_url: str, media_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversation = await store.conversation_for(scope(1))

    def fail_after_the_inserts(session, message_id, media_ids):
        assert session.scalar(select(func.count()).select_from(Message)) == 2  # the messages were flushed
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sync_store_module, "_link_media", fail_after_the_inserts)

    with pytest.raises(RuntimeError, match="disk on fire"):
        await store.record_turn(
            conversation, NewTurn(question("q", write_media(media_dir, 1)), "a", question_discord_id=5)
        )

    assert count_rows(database_url, Message) == 0
    assert count_rows(database_url, Media) == 0
    assert count_rows(database_url, MessageMedia) == 0
    assert not await store.is_recorded(conversation, 5)


async def test_database_errors_become_store_errors(database_url: str, media_dir: Path) -> None:
    async with ConversationStore(database_url, media_dir) as unmigrated:
        with pytest.raises(StoreError):
            await unmigrated.conversation_for(scope(1))


@sqlite_only("the failure is injected with an SQLite trigger")
async def test_database_errors_never_carry_what_users_wrote(
    store: ConversationStore, database_url: str, media_dir: Path
) -> None:
    conversation = await store.conversation_for(scope(1))
    engine = create_engine_for(database_url)
    try:
        with engine.begin() as connection:  # the next insert fails inside the database
            connection.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
    finally:
        engine.dispose()
    with pytest.raises(StoreError) as failed:
        await store.record_turn(conversation, NewTurn(question("my secret diagnosis"), "noted"))
    assert "disk full" in str(failed.value)
    assert "secret" not in str(failed.value) and "noted" not in str(failed.value)


async def test_set_answer_discord_id(store: ConversationStore) -> None:
    conversation = await store.conversation_for(scope(1))
    turn = await record(store, conversation, 1)

    assert await store.set_answer_discord_id(turn.assistant_message_id, 777)
    assert not await store.set_answer_discord_id(turn.user_message_id, 778)  # only answers get one
    assert not await store.set_answer_discord_id(999_999, 779)

    assert await store.is_recorded(conversation, 777)
    assert not await store.is_recorded(conversation, 778)
    # A thread started from that answer forks the conversation up to it.
    thread = await store.fork_thread(conversation, 777, scope(1, thread_id=777), max_messages=10)
    assert [m.text for m in await store.load_window(thread, 10)] == ["q1", "a1"]


async def test_window_holds_the_newest_whole_turns_oldest_first(store: ConversationStore) -> None:
    conversation = await store.conversation_for(scope(1))
    for n in range(5):
        await record(store, conversation, n)

    assert [m.text for m in await store.load_window(conversation, 4)] == ["q3", "a3", "q4", "a4"]
    # An odd limit never starts the window with an orphan answer.
    assert [m.text for m in await store.load_window(conversation, 5)] == ["q3", "a3", "q4", "a4"]
    assert [m.role for m in await store.load_window(conversation, 100)] == ["user", "assistant"] * 5
    assert await store.load_window(conversation, 1) == []
    assert await store.load_window(conversation, 0) == []


async def test_window_brings_media_back_with_absolute_paths(
    store: ConversationStore, media_dir: Path
) -> None:
    conversation = await store.conversation_for(scope(1))
    image, video = write_media(media_dir, 1), write_media(media_dir, 2, kind="video")
    await store.record_turn(conversation, NewTurn(question("two", image, video), "ok", question_discord_id=1))

    [asked, _] = await store.load_window(conversation, 2)

    assert asked.media == (image, video)
    assert all(item.path.is_absolute() and item.path.is_file() for item in asked.media)
    assert asked.media[1].kind == "video"


async def test_answers_are_stored_as_one_text_part(store: ConversationStore) -> None:
    conversation = await store.conversation_for(scope(1))
    await store.record_turn(
        conversation, NewTurn(question("q"), "line one\nline two", question_discord_id=None)
    )

    [_, answer] = await store.load_window(conversation, 2)

    assert answer == ChatMessage("assistant", (TextPart("line one\nline two"),))


async def test_record_turn_bumps_updated_at(store: ConversationStore, database_url: str) -> None:
    conversation = await store.conversation_for(scope(1))
    engine = create_engine_for(database_url)
    try:
        with engine.connect() as connection:
            before = connection.execute(select(Conversation.updated_at)).scalar_one()
        await record(store, conversation, 1)
        with engine.connect() as connection:
            after = connection.execute(select(Conversation.updated_at)).scalar_one()
    finally:
        engine.dispose()
    assert after > before


async def window_statement(store: ConversationStore, conversation_id: int) -> tuple[str, Any]:
    """The SQL and parameters `load_window` sends for the conversation's messages (exactly one such query)."""
    statements: list[tuple[str, Any]] = []

    def capture(_conn, _cursor, statement, parameters, _context, _executemany) -> None:
        if "FROM messages" in statement and "ORDER BY messages.position DESC" in statement:
            statements.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", capture)
    try:
        await store.load_window(conversation_id, 40)
    finally:
        event.remove(Engine, "before_cursor_execute", capture)
    [found] = statements  # one query for the messages, whatever the history
    return found


@sqlite_only("reads SQLite's EXPLAIN QUERY PLAN")
async def test_window_query_walks_the_position_index(store: ConversationStore, database_url: str) -> None:
    conversation = await store.conversation_for(scope(1))
    await record(store, conversation, 1)
    statement, parameters = await window_statement(store, conversation)

    engine = create_engine_for(database_url)
    try:
        with engine.connect() as connection:
            plan = " ".join(
                row[-1] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            )
    finally:
        engine.dispose()
    # SQLite names the unique constraint's index itself: it must seek the conversation and read positions in
    # order, never sort the whole history.
    assert plan.startswith("SEARCH messages USING INDEX") and "(conversation_id=?)" in plan
    assert "TEMP B-TREE" not in plan


@postgresql_only("reads PostgreSQL's EXPLAIN")
async def test_window_query_walks_the_position_index_on_postgresql(
    store: ConversationStore, database_url: str
) -> None:
    conversation = await store.conversation_for(scope(1))
    await record(store, conversation, 1)
    others = [await store.conversation_for(scope(channel)) for channel in range(2, 42)]
    engine = create_engine_for(database_url)
    try:
        with engine.begin() as connection:  # 10,000 rows in 40 other conversations, so the plan is a real one
            now = utcnow()
            rows = [
                {"conversation_id": other, "position": n, "role": "user", "content": [], "created_at": now}
                for other in others
                for n in range(250)
            ]
            connection.execute(insert(Message), rows)
            connection.exec_driver_sql("ANALYZE messages")
        statement, parameters = await window_statement(store, conversation)
        with engine.connect() as connection:
            plan = "\n".join(row[0] for row in connection.exec_driver_sql(f"EXPLAIN {statement}", parameters))
    finally:
        engine.dispose()
    assert "Index Scan Backward using uq_messages_conversation_id_position on messages" in plan, plan
    assert "Sort" not in plan, plan


async def test_real_discord_snowflakes_round_trip(store: ConversationStore, database_url: str) -> None:
    guild, channel, thread, asked, answered = (1_234_567_890_123_456_789 + n for n in range(5))  # > 2**60
    big_scope = ConversationScope(platform="discord", channel_id=channel, guild_id=guild, thread_id=thread)
    conversation = await store.conversation_for(big_scope)

    turn = await store.record_turn(
        conversation, NewTurn(question("q"), "a", question_discord_id=asked, answer_discord_id=answered)
    )

    assert await store.find_conversation(big_scope) == conversation
    assert await store.is_recorded(conversation, asked) and await store.is_recorded(conversation, answered)
    assert not await store.is_recorded(conversation, answered + 1)
    again = await store.record_turn(conversation, NewTurn(question("q"), "a", question_discord_id=asked))
    assert again == RecordedTurn(turn.user_message_id, turn.assistant_message_id, duplicate=True)
    engine = create_engine_for(database_url)
    try:
        with engine.connect() as connection:
            row = connection.execute(
                select(Conversation.guild_id, Conversation.channel_id, Conversation.thread_id)
            ).one()
    finally:
        engine.dispose()
    assert tuple(row) == (guild, channel, thread)


async def test_any_text_round_trips_through_the_json_content(store: ConversationStore) -> None:
    conversation = await store.conversation_for(scope(1))
    asked = 'naïve “quotes” "double" \\ back\\slash, tab\t, emoji 🙂, CJK 漢字, RTL שלום, NUL \x00 end'
    answer = '{"not": ["json"]} \' ; DROP TABLE messages; --\n\u2028line separator'

    await store.record_turn(conversation, NewTurn(question(asked), answer, question_discord_id=1))

    assert [m.text for m in await store.load_window(conversation, 2)] == [asked, answer]
