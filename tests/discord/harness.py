"""The real bot (discord.py client + answering service on the tiny model) against the fake Discord server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from bot.answering import Answer, AnswerService
from bot.app import running_service
from bot.content import ConversationScope
from bot.discord import VisionBot
from bot.engine import EngineRequest, EngineStats, GenerationResult, RequestHandle
from bot.health import Readiness, serving_health
from bot.metrics import Metrics
from bot.settings import Settings
from tests.fakediscord.server import FakeDiscord
from tests.inference.proxy import InferenceProxy
from tests.tiny_settings import tiny_settings

TOKEN = "fake-token.never-logged.abc123XYZ"
UNLIMITED = {"max_in_flight_per_user": 1000, "burst": 1000}


def png_bytes(size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def bot_settings(
    model_dir: Path,
    data_dir: Path,
    fake: FakeDiscord,
    discord: dict[str, Any],
    *,
    engine: dict[str, Any] | None = None,
    server: InferenceProxy | None = None,
    server_options: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    storage: dict[str, Any] | None = None,
    health: bool = False,
) -> Settings:
    """The tiny model on CPU (greedy, short answers), storage in `data_dir`, Discord and media on loopback;
    `discord` and `engine` add to (or override) the `[discord]` and `[engine]` sections. With `server`, the
    bot answers through that proxy of the real inference server (`engine.backend = "server"`), with
    `server_options` added to the `[server]` section. Per-user limits are off unless `limits` sets them: the
    tests play a few users asking many questions within seconds. `storage` adds to `[storage]`. With
    `health`, the health endpoints are served on an ephemeral port of 127.0.0.1 (`RunningBot.health_port`)."""
    backend: dict[str, dict[str, Any]] = {}
    if server is not None:
        backend = {
            "engine": {"backend": "server", **(engine or {})},
            "server": {
                "base_url": server.base_url,
                "model": server.model,
                "connect_timeout_seconds": 1.0,
                **(server_options or {}),
            },
        }
    return tiny_settings(
        model_dir,
        data_dir,
        discord={"api_base_url": fake.api_base_url, "stream_edit_interval_seconds": 1.0, **discord},
        media={"allowed_hosts": ["127.0.0.1"], "retries": 0},
        limits=limits or UNLIMITED,
        metrics={"enabled": health, "host": "127.0.0.1", "port": 0},
        storage=storage or {},
        **{"engine": engine or {}, **backend},
    )


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class _RecordingHandle:
    """A real request's handle that adds its result to `results` when it arrives."""

    handle: RequestHandle
    results: list[GenerationResult]

    async def result(self) -> GenerationResult:
        result = await self.handle.result()
        self.results.append(result)
        return result

    def cancel(self) -> bool:
        return self.handle.cancel()

    def stop(self) -> None:
        self.handle.stop()


@dataclass
class RunningBot:
    """One bot process's objects, wired as `python -m bot run` wires them (the health endpoints when
    `settings.metrics.enabled`); `restart()` replaces them all, keeping the data directory."""

    settings: Settings
    fake: FakeDiscord
    proxy: InferenceProxy | None = None  # the inference server's proxy, on the server backend
    replies: list[tuple[Answer, int]] = field(default_factory=list)
    prompts: list[list[dict]] = field(default_factory=list)
    results: list[GenerationResult] = field(default_factory=list)
    log: _Recorder = field(default_factory=_Recorder)
    client: VisionBot | None = None
    service: AnswerService | None = None
    health_port: int | None = None  # where /metrics, /healthz and /readyz are served
    _stack: AsyncExitStack | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _previous_level: int = logging.WARNING

    async def start(self, *, before_connect: Callable[[], Awaitable[None]] | None = None) -> None:
        """Start the service and connect; `before_connect` runs once the client exists, before it connects."""
        root = logging.getLogger()
        root.addHandler(self.log)
        self._previous_level, root.level = root.level, logging.DEBUG  # the token must not show even at DEBUG
        self._stack = stack = AsyncExitStack()
        metrics, readiness = Metrics(), Readiness()
        self.health_port = await stack.enter_async_context(
            serving_health(self.settings.metrics, metrics, readiness)
        )
        self.service = service = await stack.enter_async_context(
            running_service(self.settings, metrics=metrics, readiness=readiness)
        )
        self._observe(service)
        self.client = client = VisionBot(
            self.settings.discord, self.settings.limits, service, metrics=metrics, guild_ready_timeout=0.1
        )
        await stack.enter_async_context(client)
        stack.enter_context(readiness.watch("gateway", client.readiness))
        if before_connect is not None:
            await before_connect()
        task = asyncio.create_task(client.start(TOKEN))
        stack.push_async_callback(self._stop_client, client, task)
        async with asyncio.timeout(60):
            await client.wait_until_ready()

    async def stop(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
        logging.getLogger().removeHandler(self.log)
        logging.getLogger().setLevel(self._previous_level)
        self._stack = self.client = self.service = self.health_port = None

    async def get(self, path: str) -> tuple[int, str]:
        """GET `path` from the health endpoints: the status and the body."""
        assert self.health_port is not None, "settings.metrics.enabled"
        url = f"http://127.0.0.1:{self.health_port}{path}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status, await response.text()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def wait_reply(self, channel_id: int, *, after: int, timeout: float = 60) -> int:
        """The Discord id of the first reply message in `channel_id` linked to a stored answer after the
        first `after` replies (take `after` as `len(bot.replies)` before acting)."""
        prefix = f"{channel_id}"
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for _answer, message_id in self.replies[after:]:
                    if self.fake.messages[message_id]["channel_id"] == prefix:
                        return message_id
                await self._changed.wait()

    @contextlib.contextmanager
    def hold_engine(self, timeout: float = 60) -> Iterator[threading.Event | asyncio.Event]:
        """Make the engine busy: every batch waits in the worker thread, before the real model runs, until
        the yielded event is set (at the latest on leaving the block, or after `timeout` seconds). On the
        server backend, requests wait in the proxy before they reach the server."""
        if self.proxy is not None:
            with self.proxy.hold() as release:
                yield release
            return
        assert self.service is not None
        pipeline = self.service._engine._pipeline
        assert pipeline is not None, "the engine is running"
        run_batch = pipeline.run_batch
        gate = threading.Event()

        def gated_run_batch(requests: list[Any], **options: Any) -> Any:
            gate.wait(timeout)
            return run_batch(requests, **options)

        pipeline.run_batch = gated_run_batch  # type: ignore[method-assign]
        try:
            yield gate
        finally:
            gate.set()
            del pipeline.run_batch  # the class's method again

    async def wait_engine(self, predicate: Callable[[EngineStats], bool], *, timeout: float = 30) -> None:
        """Poll the engine's counters until `predicate` holds."""
        assert self.service is not None
        engine = self.service._engine
        async with asyncio.timeout(timeout):
            while not predicate(engine.stats):
                await asyncio.sleep(0.01)

    def _observe(self, service: AnswerService) -> None:
        """Record what the real service is asked to link and to generate (the real calls still happen)."""
        attach_reply, submit = service.attach_reply, service._engine.submit

        async def recording_attach_reply(answer: Answer, discord_message_id: int) -> None:
            await attach_reply(answer, discord_message_id)
            async with self._changed:
                self.replies.append((answer, discord_message_id))
                self._changed.notify_all()

        def recording_submit(request: EngineRequest) -> Any:
            self.prompts.append(request.messages)
            return _RecordingHandle(submit(request), self.results)

        service.attach_reply = recording_attach_reply  # type: ignore[method-assign]
        service._engine.submit = recording_submit  # type: ignore[method-assign]

    @staticmethod
    async def _stop_client(client: VisionBot, task: asyncio.Task[None]) -> None:
        await client.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)


def image_parts(messages: list[dict]) -> list[Any]:
    """The image entries of a Qwen `messages` list."""
    return [part for message in messages for part in message["content"] if part.get("type") == "image"]


@dataclass
class GuildWorld:
    """A fake guild with its channels, and the bot serving it; test modules add their users."""

    fake: FakeDiscord
    bot: RunningBot
    guild_id: int
    channels: dict[str, int]

    def scope(self, channel: str, thread_id: int | None = None) -> ConversationScope:
        return ConversationScope("discord", self.channels[channel], self.guild_id, thread_id)

    async def stats(self, scope: ConversationScope) -> tuple[int, int]:
        assert self.bot.service is not None
        result = await self.bot.service.stats(scope)
        return result.turns, result.images

    def image(self, name: str) -> dict:
        data = png_bytes()
        return self.fake.attachment(self.fake.add_file(name, data, "image/png"), name, len(data), "image/png")


@contextlib.asynccontextmanager
async def backend_proxy(request: pytest.FixtureRequest, backend: str) -> AsyncIterator[InferenceProxy | None]:
    """For the "server" backend, a started proxy before the session's inference server; None for "local"."""
    if backend != "server":
        yield None
        return
    proxy = InferenceProxy(request.getfixturevalue("inference_server"))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
