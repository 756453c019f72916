"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.inference.server import InferenceServer, start_inference_server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen2.5-VL (seed 0), built once per test session."""
    from bot.engine.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


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
