"""A loopback HTTP proxy in front of the real inference server, for the faults a test needs on demand.

Real sockets both ways: the bot's `openai` client talks to the proxy, the proxy to `transformers serve`.
Faults are scripted per chat-completion request, in order: an HTTP status (429, 503, a 400 body), a cut
connection after the first streamed piece of text, or a silence. `hold()` keeps requests waiting until
released, `go_down()` / `come_back()` close and reopen the listening socket (connections are refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from tests.inference.server import InferenceServer

CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Fault:
    """What the proxy does to one chat-completion request instead of (or while) forwarding it."""

    status: int | None = None  # answer with this HTTP status and `message`, without forwarding
    message: str = "injected failure"
    retry_after: float | None = None
    cut_after_text: bool = False  # forward, then drop the connection after the first piece of text
    silence_seconds: float = 0.0  # wait this long before forwarding


class InferenceProxy:
    """Forwards `/v1/...` to the real `server`, applying scripted faults."""

    def __init__(self, server: InferenceServer) -> None:
        self._upstream = server.base_url.removesuffix("/v1")
        self.model = server.model
        self.faults: deque[Fault] = deque()
        self.bodies: list[dict] = []  # every chat-completion request body received, in order
        self._gate: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0
        self.in_flight = 0
        self.most_in_flight = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        await self.come_back()

    async def close(self) -> None:
        if self._gate is not None:
            self._gate.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def go_down(self) -> None:
        """Stop listening and drop open connections: the next request is refused, like a dead server's."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        assert self._runner is not None and self._runner.server is not None
        for connection in list(self._runner.server.connections):
            if connection.transport is not None:
                connection.transport.close()

    async def come_back(self) -> None:
        """Listen again, on the same port."""
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        if not self.port:
            server = self._site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @contextlib.contextmanager
    def hold(self) -> Iterator[asyncio.Event]:
        """Chat-completion requests wait (before reaching the server) until the yielded event is set."""
        self._gate = asyncio.Event()
        try:
            yield self._gate
        finally:
            self._gate.set()
            self._gate = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fault = Fault()
        if request.path == CHAT_PATH and request.method == "POST":
            self.bodies.append(json.loads(body))
            if self.faults:
                fault = self.faults.popleft()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self._gate is not None and request.path == CHAT_PATH:
                await self._gate.wait()
            if fault.silence_seconds:
                await asyncio.sleep(fault.silence_seconds)
            if fault.status is not None:
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                error = {"error": {"message": fault.message, "type": "injected", "code": fault.status}}
                return web.json_response(error, status=fault.status, headers=headers)
            return await self._forward(request, body, cut_after_text=fault.cut_after_text)
        finally:
            self.in_flight -= 1

    async def _forward(
        self, request: web.Request, body: bytes, *, cut_after_text: bool
    ) -> web.StreamResponse:
        assert self._session is not None
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() in {"content-type", "authorization"}
        }
        async with self._session.request(
            request.method, self._upstream + request.path_qs, data=body or None, headers=headers
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            response.content_type = upstream.content_type
            await response.prepare(request)
            text_sent = False
            async for line in upstream.content:
                await response.write(line)
                text_sent = text_sent or (cut_after_text and _carries_text(line))
                if text_sent and not line.strip():  # that event is complete: let it arrive, then drop
                    await asyncio.sleep(0.2)
                    assert request.transport is not None
                    request.transport.abort()
                    return response
            await response.write_eof()
            return response


def _carries_text(line: bytes) -> bool:
    """Whether an SSE line is a chunk with some answer text in it."""
    if not line.startswith(b"data: "):
        return False
    try:
        chunk = json.loads(line[len(b"data: ") :])
    except ValueError:
        return False
    return any(choice.get("delta", {}).get("content") for choice in chunk.get("choices", []))


def sent_image_count(body: dict) -> int:
    """How many images a chat-completion request body carries."""
    return sum(
        part.get("type") == "image_url"
        for message in body["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
    )
