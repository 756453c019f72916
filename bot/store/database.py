"""Engine creation and schema migration.

`create_engine_for` turns a URL into an engine; for SQLite it creates the file's folder and sets, on every new
connection, WAL mode (readers never block the writer), a busy timeout (a second process waits for the write
lock instead of failing at once) and `foreign_keys=ON` (SQLite leaves foreign keys off by default).
`upgrade` runs the Alembic migrations to head; it is the only way the schema is created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

import migrations
from bot.errors import ConfigError, StoreError


def create_engine_for(database_url: str, *, busy_timeout_ms: int = 5000) -> Engine:
    """A SQLAlchemy engine for `database_url`, with the SQLite connection settings applied when relevant.

    Raises ConfigError when the URL does not parse, names an unknown dialect or a driver that is not
    installed, or when the SQLite file's folder cannot be created.
    """
    try:
        url = make_url(database_url)
        if url.get_backend_name() != "sqlite":
            return create_engine(url, pool_pre_ping=True)
        engine = create_engine(url)
    except (ArgumentError, ImportError) as exc:  # ArgumentError covers NoSuchModuleError (unknown dialect)
        raise ConfigError(f"storage.database_url cannot be used: {exc}") from None
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        folder = Path(url.database).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the database folder {folder}: {exc.strerror}") from None

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
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot migrate the database: {exc}") from exc
    finally:
        engine.dispose()
