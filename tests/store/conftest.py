"""Fixtures for the store tests: a migrated database on each backend, and a media folder.

`database_url` is a SQLite file in tmp_path, or a fresh PostgreSQL schema (see `tests.store.backend`); every
test that uses it runs on both, or on the one its `database` marker names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.store import ConversationStore, upgrade
from tests.store.backend import BACKENDS


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database_url" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("database")
        metafunc.parametrize("database", [marker.args[0]] if marker else BACKENDS, indirect=True)


@pytest.fixture
def database(request: pytest.FixtureRequest) -> str:
    """Which database this case runs on: "sqlite" or "postgresql"."""
    return str(request.param)


@pytest.fixture
def database_url(database: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if database == "sqlite":
        return f"sqlite:///{(tmp_path / 'data' / 'bot.sqlite3').as_posix()}"
    return str(request.getfixturevalue("postgresql_url"))


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
