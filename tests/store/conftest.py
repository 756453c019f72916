"""Fixtures for the store tests: a migrated database and a media folder.

The database is a SQLite file in tmp_path, or a fresh PostgreSQL schema when `BOT_TEST_DATABASE_URL` is set
(see `tests.store.backend`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.store import ConversationStore, upgrade
from tests.store.backend import check_server_url, fresh_schema, server_url


def pytest_configure(config: pytest.Config) -> None:
    check_server_url()


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    server = server_url()
    if server is None:
        yield f"sqlite:///{(tmp_path / 'data' / 'bot.sqlite3').as_posix()}"
        return
    with fresh_schema(server) as url:
        yield url


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
