"""Liveness, readiness and metrics over HTTP: one small aiohttp server that `python -m bot run` starts first
and stops last, when `[metrics] enabled = true`.

    GET /metrics  the bot's Prometheus metrics (`bot.metrics`)
    GET /healthz  200 "ok" while the process and its event loop answer (liveness)
    GET /readyz   200 "ready" when the Discord gateway is connected, the engine answers and the database is
                  reachable; else 503 with one line per part that is not, e.g. "engine: the model is loading"

Each part's check belongs to its owner (`VisionBot.readiness`, `Engine.readiness`,
`ConversationStore.readiness`) and is registered here by the wiring for as long as that part runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from bot.errors import ConfigError
from bot.metrics import Metrics
from bot.settings import MetricsSettings

log = logging.getLogger("bot.health")

Check = Callable[[], Awaitable[str | None]]  # None: up; else why not, in a few words
PARTS = ("gateway", "engine", "database")


class Readiness:
    """Whether the bot can answer now: every part in `PARTS` has a check, and each check passes."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}

    @contextmanager
    def watch(self, part: str, check: Check) -> Iterator[None]:
        """Judge `part` by `check` inside the block; outside it, the part is "not running"."""
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}")
        self._checks[part] = check
        try:
            yield
        finally:
            self._checks.pop(part, None)

    async def problems(self) -> list[str]:
        """Why the bot is not ready, as "part: reason" lines; empty when it is."""

        async def verdict(part: str) -> str | None:
            check = self._checks.get(part)
            return "not running" if check is None else await check()

        verdicts = await asyncio.gather(*(verdict(part) for part in PARTS))
        return [f"{part}: {reason}" for part, reason in zip(PARTS, verdicts, strict=True) if reason]


class HealthServer:
    """Serves /metrics, /healthz and /readyz; `start()` returns the bound port (useful with port 0)."""

    def __init__(self, metrics: Metrics, readiness: Readiness) -> None:
        self._readiness = readiness
        app = web.Application()
        app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
        app.router.add_get("/healthz", self._live)
        app.router.add_get("/readyz", self._ready)
        self._runner = web.AppRunner(app, access_log=None)  # probes every few seconds: not worth a line each

    async def start(self, host: str, port: int) -> int:
        """Listen on `host`:`port`; raise ConfigError when that address cannot be bound."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(f"metrics: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        bound: int = self._runner.addresses[0][1]
        return bound

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        await self._runner.cleanup()

    async def _live(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _ready(self, _request: web.Request) -> web.Response:
        problems = await self._readiness.problems()
        if problems:
            return web.Response(status=503, text="not ready\n" + "".join(f"{line}\n" for line in problems))
        return web.Response(text="ready\n")


@asynccontextmanager
async def serving_health(
    settings: MetricsSettings, metrics: Metrics, readiness: Readiness
) -> AsyncIterator[int | None]:
    """Serve the endpoints inside the block when `settings.enabled`; yields the bound port (None when off)."""
    if not settings.enabled:
        yield None
        return
    server = HealthServer(metrics, readiness)
    port = await server.start(settings.host, settings.port)
    log.info("serving /metrics, /healthz and /readyz on http://%s:%d", settings.host, port)
    try:
        yield port
    finally:
        await server.stop()
