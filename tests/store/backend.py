"""The databases the store tests run on: a SQLite file, and the PostgreSQL server in `BOT_TEST_DATABASE_URL`.

Every test that uses the `database_url` fixture runs once per backend (ids `[sqlite]` and `[postgresql]`),
unless marked `sqlite_only` or `postgresql_only` (the `database` marker). On PostgreSQL each test gets its own
empty schema (the test's URL sets `search_path` to it), which the migrations fill and which is dropped with
`DROP SCHEMA ... CASCADE` after the test. Without `BOT_TEST_DATABASE_URL` the PostgreSQL cases are skipped,
except under `CI=true`, where they fail: CI never skips them silently (`.ci/run` starts a server).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from bot.store.database import create_engine_for

DATABASE_URL_ENV = "BOT_TEST_DATABASE_URL"
BACKENDS = ("sqlite", "postgresql")


def server_url() -> str | None:
    """The PostgreSQL server the tests should use besides SQLite, or None."""
    return os.environ.get(DATABASE_URL_ENV) or None


def check_server_url() -> None:
    """Stop the test run at once when the variable names something other than PostgreSQL."""
    url = server_url()
    backend = make_url(url).get_backend_name() if url is not None else "postgresql"
    if backend != "postgresql":
        raise pytest.UsageError(f"{DATABASE_URL_ENV} must be a PostgreSQL URL, not a {backend} one")


def required_server_url() -> str:
    """The server URL; skips the calling test without one, or fails it under CI."""
    url = server_url()
    if url is not None:
        return url
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI must run the PostgreSQL tests: set {DATABASE_URL_ENV} (.ci/run does)")
    pytest.skip(f"no PostgreSQL server: set {DATABASE_URL_ENV} to run this case")


def sqlite_only(reason: str) -> pytest.MarkDecorator:
    """Run a test of SQLite-specific behaviour (`reason` says which) on SQLite only."""
    return pytest.mark.database("sqlite", reason=f"SQLite-specific: {reason}")


def postgresql_only(reason: str) -> pytest.MarkDecorator:
    """Run a test of PostgreSQL-specific behaviour (`reason` says which) on PostgreSQL only."""
    return pytest.mark.database("postgresql", reason=f"PostgreSQL-specific: {reason}")


@contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """A URL whose connections see only a new, empty schema on the server at `url`, dropped afterwards."""
    server = make_url(url)
    schema = f"store_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine_for(url)
    try:
        try:
            with admin.begin() as connection:
                connection.execute(text(f"CREATE SCHEMA {schema}"))
        except OperationalError as exc:
            pytest.fail(
                f"cannot reach PostgreSQL at {server.host}:{server.port} ({DATABASE_URL_ENV}): {exc.orig}",
                pytrace=False,
            )
        options = " ".join(filter(None, [str(server.query.get("options", "")), f"-csearch_path={schema}"]))
        yield server.update_query_dict({"options": options}).render_as_string(hide_password=False)
        with admin.begin() as connection:
            connection.execute(text("SET LOCAL lock_timeout = '10s'"))  # fail, never hang, on a leaked lock
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    finally:
        admin.dispose()
