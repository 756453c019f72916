"""Migrations create the schema, match the models, go down and back up; SQLite gets WAL, busy timeout, FKs."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from asyncio.subprocess import PIPE, STDOUT
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text

from bot.store import upgrade
from bot.store.database import alembic_config, create_engine_for, upgrade_in
from bot.store.models import Base
from tests.store.backend import postgresql_only, sqlite_only

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"alembic_version", "conversations", "messages", "media", "message_media", "questions"}


def test_upgrade_from_empty_creates_the_schema(database_url: str) -> None:
    upgrade(database_url)

    engine = create_engine_for(database_url)
    try:
        schema = inspect(engine)
        assert set(schema.get_table_names()) == TABLES
        columns = {column["name"] for column in schema.get_columns("messages")}
        assert columns == {
            "id",
            "conversation_id",
            "position",
            "role",
            "content",
            "discord_message_id",
            "created_at",
        }
        uniques = {tuple(u["column_names"]) for u in schema.get_unique_constraints("messages")}
        assert uniques == {("conversation_id", "position"), ("conversation_id", "discord_message_id")}
        assert {tuple(u["column_names"]) for u in schema.get_unique_constraints("media")} == {("sha256",)}
        assert {tuple(u["column_names"]) for u in schema.get_unique_constraints("conversations")} == {
            ("scope_key",)
        }
        link_indexes = {tuple(i["column_names"]) for i in schema.get_indexes("message_media")}
        assert ("media_id",) in link_indexes
        with engine.connect() as connection:
            assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0002"
    finally:
        engine.dispose()


def test_second_upgrade_is_a_no_op(database_url: str) -> None:
    upgrade(database_url)
    engine = create_engine_for(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO conversations (scope_key, platform, channel_id, created_at, updated_at) "
                    "VALUES ('cli:0:1:1', 'cli', 1, '2024-01-01 00:00:00', '2024-01-01 00:00:00')"
                )
            )
        upgrade(database_url)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT scope_key FROM conversations")).scalars().all() == [
                "cli:0:1:1"
            ]
            assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [
                "0002"
            ]
    finally:
        engine.dispose()


def test_models_match_the_migrations(database_url: str) -> None:
    upgrade(database_url)
    engine = create_engine_for(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


@sqlite_only("the database is a file whose folder the store creates")
def test_upgrade_creates_the_sqlite_file_and_its_folder(database_url: str, tmp_path: Path) -> None:
    upgrade(database_url)

    assert (tmp_path / "data" / "bot.sqlite3").is_file()


def test_downgrade_to_base_and_upgrade_again(database_url: str) -> None:
    upgrade(database_url)
    engine = create_engine_for(database_url)
    try:
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
            assert set(inspect(connection).get_table_names()) == {"alembic_version"}
        upgrade(database_url)
        assert set(inspect(engine).get_table_names()) == TABLES
    finally:
        engine.dispose()


@sqlite_only("WAL, busy_timeout and foreign_keys are SQLite pragmas")
def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(database_url: str) -> None:
    engine = create_engine_for(database_url, busy_timeout_ms=1234)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 1234
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
    finally:
        engine.dispose()


def test_migration_renders_for_postgresql() -> None:
    buffer = io.StringIO()
    config = Config(output_buffer=buffer)
    config.set_main_option("script_location", alembic_config().get_main_option("script_location") or "")
    config.set_main_option("sqlalchemy.url", "postgresql://bot@127.0.0.1/bot")

    command.upgrade(config, "head", sql=True)  # offline: renders the DDL without connecting

    ddl = buffer.getvalue()
    assert "CREATE TABLE messages" in ddl
    assert "content JSON NOT NULL" in ddl
    assert "discord_message_id BIGINT" in ddl
    assert "created_at TIMESTAMP WITH TIME ZONE NOT NULL" in ddl


@postgresql_only("processes starting together share one database server")
async def test_a_process_starting_during_a_migration_waits_for_it(database_url: str, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f"[storage]\ndata_dir = {json.dumps(str(tmp_path))}\ndatabase_url = {json.dumps(database_url)}\n"
    )
    engine = create_engine_for(database_url)
    try:
        with engine.connect() as connection:
            with connection.begin():  # another shard's migration, not yet committed
                upgrade_in(connection)
                starting = await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "bot", "--config", str(config), "db", "upgrade"),
                    stdout=PIPE,
                    stderr=STDOUT,
                    cwd=ROOT,
                )
                await _wait_until_a_session_waits_for_a_lock(connection)
            output, _ = await asyncio.wait_for(starting.communicate(), timeout=60)
            assert starting.returncode == 0, output.decode()
            assert set(inspect(connection).get_table_names()) == TABLES
    finally:
        engine.dispose()


async def _wait_until_a_session_waits_for_a_lock(connection: Connection) -> None:
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
    )
    async with asyncio.timeout(60):
        while True:
            connection.execute(text("SELECT pg_stat_clear_snapshot()"))  # else fixed for the transaction
            if connection.execute(waiting).scalar_one():
                return
            await asyncio.sleep(0.05)
