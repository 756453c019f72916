"""A database another process keeps locked: transient failures, retries that leave the thread free, no leaks.

The lock is real: a second SQLite connection holds the write lock with `BEGIN IMMEDIATE`, as another process
writing would.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.errors import StoreError
from bot.metrics import Metrics
from bot.store import ConversationStore, NewTurn, upgrade
from tests.store.backend import sqlite_only
from tests.store.factories import question, scope

pytestmark = sqlite_only("SQLite's file locks")

SECRET = "my secret question"


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def busy_store(
    database_url: str, media_dir: Path, metrics: Metrics
) -> AsyncIterator[ConversationStore]:
    upgrade(database_url)
    async with ConversationStore(database_url, media_dir, busy_timeout_ms=50, metrics=metrics) as opened:
        yield opened


@pytest.fixture
def other_process(tmp_path: Path, busy_store: ConversationStore) -> Iterator[sqlite3.Connection]:
    """Another connection to the database file: `BEGIN IMMEDIATE` takes the write lock until ROLLBACK."""
    holder = sqlite3.connect(tmp_path / "data" / "bot.sqlite3", isolation_level=None)
    try:
        yield holder
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()


def turn(text: str = SECRET, discord_id: int = 1) -> NewTurn:
    return NewTurn(question(text), "an answer", question_discord_id=discord_id)


def retries(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("qwenbot_store_write_retries_total") or 0.0


async def test_a_locked_database_is_a_transient_failure_and_a_broken_one_is_not(
    busy_store: ConversationStore, other_process: sqlite3.Connection
) -> None:
    conversation = await busy_store.conversation_for(scope(1))
    other_process.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError) as locked:
        await busy_store.record_turn(conversation, turn())
    other_process.execute("ROLLBACK")
    other_process.execute("CREATE TRIGGER no BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'no'); END")
    with pytest.raises(StoreError) as refused:
        await busy_store.record_turn(conversation, turn())
    assert locked.value.transient and "locked" in str(locked.value)
    assert not refused.value.transient


async def test_a_retried_turn_is_stored_once_the_lock_is_released_and_others_go_on_meanwhile(
    busy_store: ConversationStore, other_process: sqlite3.Connection, metrics: Metrics
) -> None:
    conversation = await busy_store.conversation_for(scope(1))
    other = await busy_store.conversation_for(scope(2))
    other_process.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError) as first:
        await busy_store.record_turn(conversation, turn())
    assert first.value.transient

    retrying = asyncio.create_task(busy_store.retry_record_turn(conversation, turn(), within=30))
    loop = asyncio.get_running_loop()
    for _ in range(5):  # reads keep being served between the tries, each within one try's lock wait
        started = loop.time()
        assert await busy_store.load_window(other, 10) == []
        assert loop.time() - started < 1.0
        await asyncio.sleep(0.1)
    assert not retrying.done()
    other_process.execute("ROLLBACK")

    recorded = await asyncio.wait_for(retrying, 10)
    assert not recorded.duplicate
    window = await busy_store.load_window(conversation, 10)
    assert [message.text for message in window] == [SECRET, "an answer"]
    assert retries(metrics) >= 2


async def test_a_lock_held_past_the_window_leaves_nothing_half_written(
    busy_store: ConversationStore, other_process: sqlite3.Connection, metrics: Metrics
) -> None:
    conversation = await busy_store.conversation_for(scope(1))
    other_process.execute("BEGIN IMMEDIATE")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(StoreError) as given_up:
        await busy_store.retry_record_turn(conversation, turn(), within=0.5)
    assert given_up.value.transient
    assert 0.5 <= loop.time() - started < 3
    other_process.execute("ROLLBACK")
    assert await busy_store.load_window(conversation, 10) == []
    assert (await busy_store.stats(conversation)).turns == 0
    assert retries(metrics) >= 2


async def test_a_turn_stored_by_a_try_that_seemed_to_fail_is_not_stored_twice(
    busy_store: ConversationStore,
) -> None:
    conversation = await busy_store.conversation_for(scope(1))
    await busy_store.record_turn(conversation, turn())
    again = await busy_store.retry_record_turn(conversation, turn(), within=1)
    assert again.duplicate
    assert (await busy_store.stats(conversation)).turns == 1


async def test_the_users_text_never_reaches_the_error_or_the_logs(
    busy_store: ConversationStore, other_process: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    conversation = await busy_store.conversation_for(scope(1))
    other_process.execute("BEGIN IMMEDIATE")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StoreError) as failed:
        await busy_store.retry_record_turn(conversation, turn(), within=0.2)
    chain = [failed.value, failed.value.__cause__, getattr(failed.value.__cause__, "orig", None)]
    assert all(SECRET not in str(error) for error in chain)
    assert SECRET not in caplog.text
