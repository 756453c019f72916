"""The store's readiness check (`SELECT 1` on its database thread) and its failures in the metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.content import ConversationScope
from bot.errors import StoreError
from bot.metrics import Metrics
from bot.store import ConversationStore, upgrade


def store_errors(metrics: Metrics) -> dict[str, float]:
    """The store error counter's values by error class."""
    return {
        sample.labels["error"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "qwenbot_store_errors"
        for sample in family.samples
        if sample.name == "qwenbot_store_errors_total"
    }


async def test_ready_while_open_and_closed_after(database_url: str, media_dir: Path) -> None:
    upgrade(database_url)
    store = ConversationStore(database_url, media_dir)
    assert await store.readiness() == "the database is closed"
    async with store:
        assert await store.readiness() is None
    assert await store.readiness() == "the database is closed"


async def test_a_failed_operation_is_counted_by_its_class(database_url: str, media_dir: Path) -> None:
    metrics = Metrics()
    async with ConversationStore(database_url, media_dir, metrics=metrics) as unmigrated:
        with pytest.raises(StoreError) as failed:
            await unmigrated.conversation_for(ConversationScope("discord", 1))
        assert store_errors(metrics) == {type(failed.value.__cause__).__name__: 1}
        assert await unmigrated.readiness() is None, "the database itself answers"


async def test_a_database_that_cannot_be_opened_is_not_ready(tmp_path: Path) -> None:
    folder_in_the_way = tmp_path / "bot.sqlite3"
    folder_in_the_way.mkdir()  # SQLite cannot open a directory as its database file
    metrics = Metrics()
    url = f"sqlite:///{folder_in_the_way.as_posix()}"
    async with ConversationStore(url, tmp_path / "media", metrics=metrics) as store:
        assert await store.readiness() == "the database failed (OperationalError)"
    assert store_errors(metrics) == {"OperationalError": 1}
