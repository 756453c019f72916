"""Engine creation and schema migration.

`create_engine_for` turns a URL into an engine. For SQLite it creates the file's folder (owner-only) and makes
the database file readable by its owner only (SQLite gives its WAL and shared-memory files the same mode, and
everyone's conversations are in there). On every new connection it sets WAL mode (readers never block the
writer), a busy timeout (a second process waits for the write lock instead of failing at once) and
`foreign_keys=ON` (SQLite leaves foreign keys off by default). `upgrade` runs the Alembic migrations to head;
it is the only way the schema is created. On PostgreSQL it holds an advisory lock meanwhile, so that several
processes starting at once (shards) migrate one after another. `is_transient` tells the failures a retry may
mend from the others, and `lock_wait` shortens SQLite's busy timeout for one transaction.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

import migrations
from bot.errors import ConfigError, StoreError

_MIGRATION_LOCK_KEY = 0x71776E5F626F74  # PostgreSQL advisory lock held while migrating ("qwn_bot")
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6  # primary result codes (the low byte of an extended code)
# PostgreSQL SQLSTATEs worth a retry: serialization failure, deadlock, the server shutting down or starting.
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03"})


def create_engine_for(database_url: str, *, busy_timeout_ms: int = 5000) -> Engine:
    """A SQLAlchemy engine for `database_url`, with the SQLite connection settings applied when relevant.

    Raises ConfigError when the URL does not parse, names an unknown dialect or a driver that is not
    installed, or when the SQLite file's folder cannot be created.
    """
    try:
        url = make_url(database_url)
        # hide_parameters: SQL errors (which reach logs) never carry the values, i.e. users' messages.
        if url.get_backend_name() != "sqlite":
            return create_engine(url, pool_pre_ping=True, hide_parameters=True)
        engine = create_engine(url, hide_parameters=True)
    except (ArgumentError, ImportError) as exc:  # ArgumentError covers NoSuchModuleError (unknown dialect)
        raise ConfigError(f"storage.database_url cannot be used: {exc}") from None
    path = _sqlite_file(url)
    if path is not None:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the database folder {path.parent}: {exc.strerror}") from None
        _make_owner_only(path)

    @event.listens_for(engine, "connect")
    def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            # Safe with WAL: a power cut can lose the last commits but never corrupts the file.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    return engine


def is_transient(error: SQLAlchemyError) -> bool:
    """Whether the same operation may succeed when tried again: SQLite busy or locked (another process
    writes), a PostgreSQL serialization failure or deadlock, a connection lost or refused."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    cause = getattr(error, "orig", None)
    if isinstance(cause, sqlite3.Error):
        return getattr(cause, "sqlite_errorcode", 0) & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    sqlstate = getattr(cause, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08")  # class 08: connection exception
    return isinstance(error, OperationalError)  # a driver's error without a code: the connection failed


@contextlib.contextmanager
def lock_wait(session: Session, milliseconds: int | None) -> Iterator[None]:
    """Within the block, SQLite waits at most `milliseconds` for another connection's lock (the connection's
    busy timeout, restored after); None, or another database, leaves the connection as it is."""
    connection = session.connection()
    if milliseconds is None or connection.dialect.name != "sqlite":
        yield
        return
    previous = int(connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one())
    connection.exec_driver_sql(f"PRAGMA busy_timeout={int(milliseconds)}")
    try:
        yield
    finally:
        connection.exec_driver_sql(f"PRAGMA busy_timeout={previous}")


def _sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL naming one (not in-memory, not a `file:` URI), else None."""
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return None if database.startswith("file:") else Path(database)


def _make_owner_only(database: Path) -> None:
    """Create the SQLite file as 0600 before SQLite does (it would follow the umask, often 0644), and take
    group and world access away from an existing one and its WAL and shared-memory files."""
    try:
        os.close(os.open(database, os.O_CREAT | os.O_RDWR, 0o600))
    except OSError:
        return  # not a file we can create or open: SQLite's own error says why, on connecting
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)


def alembic_config() -> Config:
    """An Alembic config pointing at the installed `migrations` package (works from a wheel too)."""
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return config


def upgrade(database_url: str, *, busy_timeout_ms: int = 5000) -> None:
    """Migrate the database at `database_url` to the newest schema (a no-op when it is already there).

    Raises ConfigError for an unusable URL (see `create_engine_for`), StoreError when the database fails.
    """
    engine = create_engine_for(database_url, busy_timeout_ms=busy_timeout_ms)
    try:
        with engine.begin() as connection:
            upgrade_in(connection)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot migrate the database: {_reason(exc)}") from exc
    finally:
        engine.dispose()


def upgrade_in(connection: Connection) -> None:
    """Migrate to the newest schema inside the caller's transaction on `connection`.

    On PostgreSQL the transaction holds the migration lock first: processes started together (shards) migrate
    one at a time, and the later ones find the schema already at head.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def schema_revisions(database_url: str, *, busy_timeout_ms: int = 5000) -> tuple[str | None, str | None]:
    """(the database's Alembic revision, the newest one); migrates nothing, and creates no SQLite file.

    The first is None when the database has no schema yet (a missing SQLite file included). Raises
    ConfigError for an unusable URL, StoreError when the database cannot be read.
    """
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with contextlib.suppress(ArgumentError):  # create_engine_for says what is wrong with the URL
        path = _sqlite_file(make_url(database_url))
        if path is not None and not path.is_file():
            return None, head
    engine = create_engine_for(database_url, busy_timeout_ms=busy_timeout_ms)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision(), head
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot read the database: {_reason(exc)}") from exc
    finally:
        engine.dispose()


def _reason(exc: SQLAlchemyError) -> str:
    """The driver's own first line (e.g. "... port 5432 failed: Connection refused"), without SQLAlchemy's
    statement and link to its error guide."""
    message = str(exc.orig if isinstance(exc, DBAPIError) else exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__
