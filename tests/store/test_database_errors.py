"""A database URL or folder that cannot work fails at start with a sentence, never a SQLAlchemy traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from bot.errors import ConfigError, StoreError
from bot.store import upgrade
from bot.store.database import create_engine_for


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "storage.database_url"),
        ("nonsense://user@127.0.0.1/db", "storage.database_url"),
        ("mysql+nosuchdriver://user@127.0.0.1/db", "storage.database_url"),
        ("mysql+pymysql://user@127.0.0.1/db", "pymysql"),  # a real dialect whose driver is not installed
    ],
    ids=["unparseable", "unknown-dialect", "unknown-driver", "driver-not-installed"],
)
def test_unusable_database_url_is_a_config_error(url: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        create_engine_for(url)


def test_uncreatable_sqlite_folder_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    with pytest.raises(ConfigError, match="cannot create the database folder"):
        upgrade(f"sqlite:///{(blocker / 'data' / 'bot.sqlite3').as_posix()}")


def test_database_that_cannot_be_opened_is_a_store_error(tmp_path: Path) -> None:
    folder_in_the_way = tmp_path / "bot.sqlite3"
    folder_in_the_way.mkdir()  # SQLite cannot open a directory as its database file

    with pytest.raises(StoreError, match="cannot migrate the database"):
        upgrade(f"sqlite:///{folder_in_the_way.as_posix()}")


def test_unreachable_postgresql_is_one_line() -> None:
    pytest.importorskip("psycopg")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with pytest.raises(StoreError) as caught:
        upgrade(f"postgresql+psycopg://bot:secret@127.0.0.1:{port}/bot")

    message = str(caught.value)
    assert message.startswith("cannot migrate the database: ") and f"port {port} failed" in message
    assert "\n" not in message and "sqlalche.me" not in message and "secret" not in message
