"""Fixtures for the media tests: a real aiohttp server on 127.0.0.1, a traced client session, a fetcher."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bot.media import MediaFetcher
from bot.settings import MediaSettings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class MediaServer:
    """A loopback HTTP server whose routes the test sets; it records every request path it receives."""

    base_url: str
    handlers: dict[str, Handler] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    peers: list[tuple[str, int]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def serve_bytes(self, path: str, body: bytes, content_type: str = "application/octet-stream") -> str:
        """Serve `body` with a Content-Length at `path`; return its URL."""

        async def handler(_request: web.Request) -> web.StreamResponse:
            return web.Response(body=body, content_type=content_type)

        self.handlers[path] = handler
        return self.url(path)

    def count(self, path: str) -> int:
        return self.requests.count(path)


@asynccontextmanager
async def running_media_server(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[MediaServer]:
    """A `MediaServer` on an ephemeral port of 127.0.0.1 (https when given an SSL context)."""
    server: MediaServer | None = None

    async def dispatch(request: web.Request) -> web.StreamResponse:
        assert server is not None
        server.requests.append(request.path)
        server.peers.append(request.transport.get_extra_info("peername") if request.transport else ("", 0))
        handler = server.handlers.get(request.path)
        if handler is None:
            raise web.HTTPNotFound()
        return await handler(request)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", dispatch)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
    host, port = runner.addresses[0][:2]
    server = MediaServer(base_url=f"{'https' if ssl_context else 'http'}://{host}:{port}")
    try:
        yield server
    finally:
        server.release.set()  # lets handlers that wait on purpose (slow hosts) finish
        await runner.cleanup()


@pytest.fixture
async def media_server() -> AsyncIterator[MediaServer]:
    async with running_media_server() as server:
        yield server


@pytest.fixture
def media_settings() -> MediaSettings:
    return MediaSettings(
        allowed_hosts=["127.0.0.1"],
        max_bytes=200_000,
        max_video_bytes=400_000,
        max_pixels=1_000_000,
        connect_timeout_seconds=0.5,
        total_timeout_seconds=1.0,
        retries=2,
        retry_backoff_seconds=0.01,
    )


@pytest.fixture
async def client_requests() -> AsyncIterator[tuple[aiohttp.ClientSession, list[str]]]:
    """A client session that records the URL of every request it starts, before connecting."""
    started: list[str] = []

    async def on_request_start(
        _session: object, _context: object, params: aiohttp.TraceRequestStartParams
    ) -> None:
        started.append(str(params.url))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        yield session, started


@pytest.fixture
async def fetcher(
    media_settings: MediaSettings, tmp_path: Path, client_requests: tuple[aiohttp.ClientSession, list[str]]
) -> AsyncIterator[MediaFetcher]:
    async with MediaFetcher(media_settings, tmp_path / "media", session=client_requests[0]) as media_fetcher:
        yield media_fetcher


@pytest.fixture
def started_requests(client_requests: tuple[aiohttp.ClientSession, list[str]]) -> list[str]:
    """Every URL the fetcher's session started a request for."""
    return client_requests[1]
