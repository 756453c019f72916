"""Which database the store tests run on: a SQLite file by default, or the server in `BOT_TEST_DATABASE_URL`.

With `BOT_TEST_DATABASE_URL=postgresql+psycopg://user:password@127.0.0.1:5432/db` every store test gets its
own empty PostgreSQL schema (the test's URL sets `search_path` to it), which the migrations fill and which is
dropped with `DROP SCHEMA ... CASCADE` after the test. Tests of SQLite's own behaviour are skipped there.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from bot.store.database import create_engine_for

DATABASE_URL_ENV = "BOT_TEST_DATABASE_URL"


def server_url() -> str | None:
    """The database server the store tests should use instead of SQLite, or None."""
    return os.environ.get(DATABASE_URL_ENV) or None


def check_server_url() -> None:
    """Stop the test run at once when the variable names something other than PostgreSQL."""
    url = server_url()
    backend = make_url(url).get_backend_name() if url is not None else "postgresql"
    if backend != "postgresql":
        raise pytest.UsageError(f"{DATABASE_URL_ENV} must be a PostgreSQL URL, not a {backend} one")


def sqlite_only(reason: str) -> pytest.MarkDecorator:
    """Skip a test of SQLite-specific behaviour when the tests run on another database."""
    return pytest.mark.skipif(server_url() is not None, reason=f"SQLite-specific: {reason}")


def postgresql_only(reason: str) -> pytest.MarkDecorator:
    """Run a test of PostgreSQL-specific behaviour only when the tests run on PostgreSQL."""
    return pytest.mark.skipif(server_url() is None, reason=f"PostgreSQL-specific: {reason}")


@contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """A URL whose connections see only a new, empty schema on the server at `url`, dropped afterwards."""
    server = make_url(url)
    schema = f"store_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine_for(url)
    try:
        with admin.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA {schema}"))
        options = " ".join(filter(None, [str(server.query.get("options", "")), f"-csearch_path={schema}"]))
        yield server.update_query_dict({"options": options}).render_as_string(hide_password=False)
        with admin.begin() as connection:
            connection.execute(text("SET LOCAL lock_timeout = '10s'"))  # fail, never hang, on a leaked lock
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    finally:
        admin.dispose()
