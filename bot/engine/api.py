"""The engine boundary: what `AnswerService` sees of any backend. Imports no torch.

Two implementations: `bot.engine.worker.InferenceEngine` runs the model in this process, and
`bot.engine.server.ServerEngine` asks an OpenAI-compatible inference server (vLLM, SGLang, Ollama,
`transformers serve`). Both queue requests with `bot.engine.scheduler.Scheduler`, so queue positions,
per-conversation order and timeouts follow the same rules; callbacks always arrive on the event loop thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NotRequired, Protocol, TypedDict

from bot.content import Role

if TYPE_CHECKING:
    from bot.engine.scheduler import ScheduledRequest


class QwenTextPart(TypedDict):
    type: Literal["text"]
    text: str


class QwenImagePart(TypedDict):
    type: Literal["image"]
    image: str  # a local file; nothing in the engines downloads
    min_pixels: NotRequired[int]  # absent: `vision.min_pixels` / `max_pixels`
    max_pixels: NotRequired[int]


class QwenVideoPart(TypedDict):
    type: Literal["video"]
    video: str  # a local file
    max_frames: NotRequired[int]
    fps: NotRequired[float]
    max_pixels: NotRequired[int]  # per frame


QwenPart = QwenTextPart | QwenImagePart | QwenVideoPart


class QwenMessage(TypedDict):
    """One entry of the `messages` list Qwen2.5-VL's chat template and `qwen_vl_utils` take."""

    role: Role
    content: str | list[QwenPart]


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One question for the model. Both callbacks are called on the event loop thread."""

    messages: list[QwenMessage]
    conversation_key: str
    generate_kwargs: dict[str, object] | None = None  # None: `settings.generation.generate_kwargs()`
    on_text: Callable[[str], None] | None = None  # each new piece of the answer, in order
    on_queue_position: Callable[[int], None] | None = None  # requests ahead; 0 = now running


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The answer to one request, with where its time went."""

    text: str
    token_ids: list[int]  # empty when the backend does not return ids (an inference server)
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    generate_seconds: float
    stopped: bool = False  # ended early by `RequestHandle.stop`: `text` is what was written until then


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of an engine's counters."""

    batches: int  # model runs (the server backend: requests sent)
    batch_sizes: dict[int, int]  # batch size -> how many batches had that size
    completed: int
    failed: int
    cancelled: int
    aborted: int  # runs stopped midway because nobody waited for them any more
    oom_retries: int
    queued: int
    running: int


class RequestHandle:
    """The caller's side of a submitted request."""

    __slots__ = ("_item", "_stop")

    def __init__(self, item: ScheduledRequest, stop: Callable[[ScheduledRequest], None]) -> None:
        self._item = item
        self._stop = stop

    @property
    def ahead(self) -> int:
        """Earlier-submitted requests still queued or running; it only goes down, and is 0 once running."""
        return self._item.ahead

    def done(self) -> bool:
        """Whether the request has finished, failed or been cancelled."""
        return self._item.future.done()

    async def result(self) -> GenerationResult:
        """Wait for the answer. Cancelling the awaiting task cancels the request."""
        return await self._item.future

    def cancel(self) -> bool:
        """Drop the request: a queued one leaves the queue, a running one is aborted or its result dropped."""
        return self._item.future.cancel()

    def stop(self) -> None:
        """End the request early but keep its answer so far: a running one ends at its next decode step (its
        batch-mates go on) and its result has `stopped` set; a queued one ends at once with no text."""
        self._stop(self._item)


class Engine(Protocol):
    """A backend that answers Qwen `messages` lists; every method is called on the event loop thread."""

    async def start(self) -> None:
        """Get ready to answer (load the model, or check the server); raise ModelLoadError or ConfigError."""
        ...

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue `request` and return its handle; raise QueueFull or EngineStopped at once."""
        ...

    def count_text_tokens(self, text: str) -> int:
        """Tokens in `text`, exact where the tokenizer is loaded, else a generous estimate."""
        ...

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the counters."""
        ...

    async def readiness(self) -> str | None:
        """None when a request submitted now would be answered, else why not (a few words); cheap."""
        ...

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, fail queued requests, give running ones `grace` seconds; idempotent."""
        ...


async def generate(
    engine: Engine,
    messages: list[QwenMessage],
    *,
    conversation_key: str,
    generate_kwargs: dict[str, object] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Submit one request to `engine` and wait for its answer (cancelling the wait cancels the request)."""
    handle = engine.submit(EngineRequest(messages, conversation_key, generate_kwargs, on_text))
    try:
        return await handle.result()
    except asyncio.CancelledError:
        handle.cancel()
        raise
