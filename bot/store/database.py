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

import migrations


def create_engine_for(database_url: str, *, busy_timeout_ms: int = 5000) -> Engine:
    """A SQLAlchemy engine for `database_url`, with the SQLite connection settings applied when relevant."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)

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
    """Migrate the database at `database_url` to the newest schema (a no-op when it is already there)."""
    engine = create_engine_for(database_url, busy_timeout_ms=busy_timeout_ms)
    try:
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()
