"""A database URL or folder that cannot work fails at start with a sentence, never a SQLAlchemy traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError, SQLAlchemyError

from bot.errors import ConfigError, StoreError
from bot.store import upgrade
from bot.store.database import create_engine_for, is_transient


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


class _DriverError(Exception):
    """A DBAPI error as psycopg raises them: its SQLSTATE, or None for a failure without one."""

    def __init__(self, sqlstate: str | None) -> None:
        super().__init__(f"driver error {sqlstate}")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (OperationalError("INSERT", None, _DriverError("40001")), True),  # serialization failure
        (OperationalError("INSERT", None, _DriverError("40P01")), True),  # deadlock detected
        (OperationalError("INSERT", None, _DriverError("08006")), True),  # connection failure
        (OperationalError("INSERT", None, _DriverError("57P03")), True),  # cannot connect now
        (OperationalError("INSERT", None, _DriverError(None)), True),  # connection refused, no code
        (DBAPIError("INSERT", None, _DriverError("XX000"), connection_invalidated=True), True),
        (IntegrityError("INSERT", None, _DriverError("23505")), False),  # unique violation
        (ProgrammingError("INSERT", None, _DriverError("42P01")), False),  # undefined table
        (ProgrammingError("INSERT", None, _DriverError(None)), False),
    ],
    ids=[
        "serialization",
        "deadlock",
        "connection",
        "starting",
        "refused",
        "invalidated",
        "unique",
        "table",
        "bug",
    ],
)
def test_which_postgresql_failures_are_worth_a_retry(error: SQLAlchemyError, transient: bool) -> None:
    assert is_transient(error) is transient
