"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.inference.server import InferenceServer, start_inference_server
from tests.store.backend import check_server_url, fresh_schema, required_server_url


def pytest_configure(config: pytest.Config) -> None:
    check_server_url()
    config.addinivalue_line("markers", "database(name, reason): run this store test on that database only")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen2.5-VL (seed 0), built once per test session."""
    from bot.engine.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def postgresql_server() -> str:
    """The PostgreSQL server of `BOT_TEST_DATABASE_URL`; skips the tests without it, fails them under CI."""
    return required_server_url()


@pytest.fixture
def postgresql_url(postgresql_server: str) -> Iterator[str]:
    """A fresh, empty schema on that server, dropped after the test (see `tests.store.backend`)."""
    with fresh_schema(postgresql_server) as url:
        yield url


@pytest.fixture(scope="session")
def inference_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InferenceServer]:
    """`transformers serve` on the tiny model on 127.0.0.1, started once per test session."""
    server = start_inference_server(tiny_model_dir, tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        yield server
    finally:
        server.stop()
