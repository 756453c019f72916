"""The health endpoints over real HTTP on 127.0.0.1: liveness, readiness and its reasons, metrics, binding."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from bot.errors import ConfigError
from bot.health import Check, Readiness, serving_health
from bot.metrics import Metrics
from bot.settings import MetricsSettings

ON_ANY_PORT = MetricsSettings(enabled=True, host="127.0.0.1", port=0)


async def get(port: int, path: str) -> tuple[int, str, str]:
    """Status, content type and body of `GET path`."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, response.content_type, await response.text()


def check(reason: str | None) -> Check:
    """A readiness check that always gives `reason`."""

    async def verdict() -> str | None:
        return reason

    return verdict


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, Metrics, Readiness]]:
    metrics, readiness = Metrics(), Readiness()
    async with serving_health(ON_ANY_PORT, metrics, readiness) as port:
        assert port is not None and port > 0
        yield port, metrics, readiness


async def test_off_by_default_and_then_nothing_listens() -> None:
    assert MetricsSettings().enabled is False and MetricsSettings().host == "127.0.0.1"
    async with serving_health(MetricsSettings(), Metrics(), Readiness()) as port:
        assert port is None


async def test_ready_only_when_every_part_is_up(served: tuple[int, Metrics, Readiness]) -> None:
    port, _metrics, readiness = served
    status, _type, body = await get(port, "/readyz")
    assert status == 503
    assert body.splitlines() == [
        "not ready",
        "gateway: not running",
        "engine: not running",
        "database: not running",
    ]
    with (
        readiness.watch("gateway", check(None)),
        readiness.watch("engine", check("the model is loading")),
        readiness.watch("database", check(None)),
    ):
        assert (await get(port, "/readyz"))[::2] == (503, "not ready\nengine: the model is loading\n")
        with readiness.watch("engine", check(None)):
            assert await get(port, "/readyz") == (200, "text/plain", "ready\n")
    assert (await get(port, "/readyz"))[0] == 503, "parts no longer watched are not running"
    assert await get(port, "/healthz") == (200, "text/plain", "ok\n")


async def test_metrics_are_served_from_the_bots_own_registry(served: tuple[int, Metrics, Readiness]) -> None:
    port, metrics, _readiness = served
    other = Metrics()  # a second bot in the same process: its own registry, no clash
    metrics.question_finished("answered")
    other.question_finished("failed", ConfigError())
    status, content_type, body = await get(port, "/metrics")
    assert status == 200 and content_type == "text/plain"
    assert 'qwenbot_questions_total{error="",outcome="answered"} 1.0' in body
    assert "ConfigError" not in body


def test_an_unknown_part_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown part 'gpu'"), Readiness().watch("gpu", check(None)):
        pass


async def test_an_address_in_use_is_a_config_error_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = MetricsSettings(enabled=True, host="127.0.0.1", port=port)
        with pytest.raises(ConfigError, match=rf"metrics: cannot listen on 127\.0\.0\.1:{port}: "):
            async with serving_health(settings, Metrics(), Readiness()):
                pass
