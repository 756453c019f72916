"""Fixtures for the store tests: a migrated SQLite file in tmp_path and a media folder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.store import ConversationStore, upgrade


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{(tmp_path / 'data' / 'bot.sqlite3').as_posix()}"


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    path = tmp_path / "media"
    path.mkdir()
    return path


@pytest.fixture
async def store(database_url: str, media_dir: Path) -> AsyncIterator[ConversationStore]:
    upgrade(database_url)
    async with ConversationStore(database_url, media_dir) as opened:
        yield opened
