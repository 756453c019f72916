"""The server backend: answers through an OpenAI-compatible inference server, with the `openai` client.

vLLM, SGLang, Ollama and `transformers serve` all speak this API; batching, paged attention and parallelism
across GPUs are theirs, not ours. The bot keeps its own queue (`EngineFrontEnd`), sends at most
`server.max_in_flight` requests at once, and streams each answer (SSE) into the same callbacks as the
in-process engine. Images go inline, resized as the local engine would resize them (`openai_format`).

Failures become one `ServerError` each, and nothing reaches the store unless the answer is complete:

- refused or unreachable: retried until `connect_timeout_seconds` have passed, then `ServerUnavailable`;
- 429 and 5xx: retried with backoff (honouring Retry-After) until `retry_deadline_seconds`, then
  `ServerUnavailable`; retries happen only before any text was shown;
- context too long → `ContextTooLong`; any other 4xx → `ServerRejected`;
- no first token within `first_token_timeout_seconds` (or a silence that long mid-stream), or no end within
  `answer_timeout_seconds` → `ServerTimeout`; the stream breaking after text was shown → `AnswerIncomplete`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import openai

from bot.engine.api import GenerationResult
from bot.engine.budget import estimate_text_tokens
from bot.engine.frontend import EngineFrontEnd, settle
from bot.engine.openai_format import ImageUrlCache, to_openai_messages
from bot.engine.scheduler import ScheduledRequest
from bot.errors import (
    AnswerIncomplete,
    ContextTooLong,
    EngineError,
    EngineStopped,
    GenerationFailed,
    ModelLoadError,
    ServerError,
    ServerRejected,
    ServerTimeout,
    ServerUnavailable,
)
from bot.settings import Settings

logger = logging.getLogger("bot.engine.server")

T = TypeVar("T")

_FIRST_BACKOFF_SECONDS = 0.25
_MAX_BACKOFF_SECONDS = 5.0
_NO_KEY = "EMPTY"  # the client insists on a key; servers without auth ignore it
_VERDICT_SECONDS = 3.0  # how long a readiness verdict (or a successful answer) stands before asking again
_READINESS_TIMEOUT_SECONDS = 2.0
# How servers say a prompt does not fit (vLLM, SGLang, TGI, llama.cpp, transformers).
_CONTEXT_TOO_LONG = re.compile(
    r"context length|context window|maximum context|too long|max_model_len|exceeds? the", re.IGNORECASE
)


class ServerEngine(EngineFrontEnd):
    """An `Engine` that forwards requests to an OpenAI-compatible server; runs entirely on the event loop."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._server = settings.server
        self._client: openai.AsyncOpenAI | None = None
        self._tasks: dict[ScheduledRequest, asyncio.Task[None]] = {}
        cache_bytes = settings.server.image_cache_mb * 1024 * 1024
        self._image_urls = ImageUrlCache(cache_bytes)  # 0 bytes: nothing kept, decodes still one at a time
        self._stop_task: asyncio.Future[None] | None = None
        # For `readiness`: when the server last answered (None) or was found down (the reason).
        self._verdict: tuple[float, str | None] = (float("-inf"), None)

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Check that the server answers and serves `server.model`; raise ModelLoadError in one sentence."""
        if self._loop is not None:
            raise RuntimeError("the engine was already started")
        self._loop = asyncio.get_running_loop()
        server = self._server
        key = server.api_key()
        self._client = openai.AsyncOpenAI(
            base_url=server.base_url,
            api_key=key.get_secret_value() if key is not None else _NO_KEY,
            max_retries=0,  # retries are ours: bounded by deadlines, and never after text was shown
            timeout=openai.Timeout(
                server.answer_timeout_seconds,
                connect=server.connect_timeout_seconds,
                read=server.first_token_timeout_seconds,
            ),
        )
        try:
            served = await self._served_models()
        except BaseException:
            await self._client.close()
            raise
        if server.model not in served:
            await self._client.close()
            listed = ", ".join(repr(name) for name in served) or "no models"
            raise ModelLoadError(
                f"the inference server at {server.base_url} does not serve {server.model!r} (it serves "
                f"{listed}); set server.model to one of those"
            )
        logger.info("answering through %s with %s", server.base_url, server.model)
        self._verdict = (time.monotonic(), None)
        with self._lock:
            self._accepting = True

    async def readiness(self) -> str | None:
        """None while the server answers: it did within the last few seconds, or `GET /v1/models` does now
        (within two seconds); else why not. A verdict stands for a few seconds, so probes never flood it."""
        with self._lock:
            if not self._accepting:
                return "not started" if self._stop_task is None else "stopped"
        checked_at, reason = self._verdict
        if time.monotonic() - checked_at < _VERDICT_SECONDS:
            return reason
        try:
            async with asyncio.timeout(_READINESS_TIMEOUT_SECONDS):
                await self._list_models()
        except TimeoutError:
            reason = f"the inference server did not answer within {_READINESS_TIMEOUT_SECONDS:g}s"
        except openai.APIError as exc:
            reason = f"the inference server failed ({_describe(exc)})"
        else:
            reason = None
        self._verdict = (time.monotonic(), reason)
        return reason

    async def _served_models(self) -> list[str]:
        assert self._client is not None
        base_url = self._server.base_url
        try:
            return await self._with_retries(self._list_models)
        except ServerUnavailable as exc:
            raise ModelLoadError(
                f"cannot reach the inference server at {base_url} ({exc}); start it, or fix server.base_url"
            ) from None
        except ServerError as exc:
            raise ModelLoadError(
                f"the inference server at {base_url} refused to list its models ({exc}); check "
                f"server.base_url and the API key in ${self._server.api_key_env}"
            ) from None

    async def _list_models(self) -> list[str]:
        assert self._client is not None
        return [model.id async for model in self._client.models.list()]

    def count_text_tokens(self, text: str) -> int:
        """A generous estimate: the server's tokenizer is not loaded in the bot."""
        return estimate_text_tokens(text)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, fail queued requests, give running ones `grace` seconds, then cut them off."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._shutdown(grace))
        await asyncio.shield(self._stop_task)

    async def _shutdown(self, grace: float | None) -> None:
        grace = self._limits.shutdown_grace_seconds if grace is None else grace
        with self._lock:
            self._accepting = False
            queued = self._scheduler.take_waiting()
        for item in queued:
            settle(item.future, EngineStopped("the engine stopped before this request ran"))
        running = list(self._tasks.values())
        if running:
            logger.info("stopping: waiting up to %.1fs for %d answers in progress", grace, len(running))
            _done, late = await asyncio.wait(running, timeout=grace)
            for item, task in list(self._tasks.items()):
                if task in late:
                    settle(item.future, EngineStopped("the engine stopped while this request ran"))
                    task.cancel()
            if late:
                await asyncio.wait(late)
        if self._client is not None:
            await self._client.close()
        logger.info("server engine stopped")

    # -- scheduling (event loop) -------------------------------------------------------------------------

    def _wake(self) -> None:
        self._post(self._dispatch)

    def _dispatch(self) -> None:
        """Send what the in-flight limit allows, oldest first."""
        with self._lock:
            if not self._accepting:
                return
            free = self._server.max_in_flight - len(self._scheduler.running)
            batch = self._scheduler.next_batch(free, same_kwargs=False)
            if not batch:
                return
            self._scheduler.start(batch, time.monotonic())
            self._counters.batches += len(batch)
            self._counters.batch_sizes[1] += len(batch)
            self._publish_positions()
        assert self._loop is not None
        for item in batch:
            self._tasks[item] = self._loop.create_task(self._run(item), name=f"server-request-{item.seq}")

    def _on_discarded(self, item: ScheduledRequest) -> None:
        task = self._tasks.get(item)
        if task is not None:  # nobody waits: stop streaming, which frees the server's slot too
            task.cancel()

    async def _run(self, item: ScheduledRequest) -> None:
        outcome: GenerationResult | EngineError | None = None
        try:
            outcome = await self._answer(item)
        except asyncio.CancelledError:
            with self._lock:
                self._counters.aborted += 1
        except EngineError as exc:
            logger.warning("a request to the inference server failed: %r", exc, exc_info=exc.__cause__)
            outcome = exc
        except Exception as exc:  # a bug or an odd reply: fail this request only, with its cause logged
            logger.exception("unexpected failure while asking the inference server")
            outcome = GenerationFailed(repr(exc))
            outcome.__cause__ = exc
        finally:
            with self._lock:
                self._scheduler.finish([item])
                if isinstance(outcome, GenerationResult):
                    self._counters.completed += 1
                elif outcome is not None:
                    self._counters.failed += 1
                self._publish_positions()
            self._tasks.pop(item, None)
            self._dispatch()
        if outcome is not None:
            settle(item.future, outcome)

    # -- one request (event loop) ------------------------------------------------------------------------

    async def _answer(self, item: ScheduledRequest) -> GenerationResult:
        messages = await asyncio.to_thread(
            to_openai_messages,
            item.request.messages,
            self._settings.vision,
            accepts_video=self._server.accepts_video,
            cache=self._image_urls,
        )
        body = self._request_body(messages, item.generate_kwargs)
        started = time.monotonic()
        text = ""
        usage: Any = None
        try:
            async with asyncio.timeout(self._server.answer_timeout_seconds):
                stream = await self._with_retries(lambda: self._create(body))
                async with stream:  # closed on any exit, cancellation included: the server stops generating
                    async for chunk in stream:
                        if chunk.usage is not None:
                            usage = chunk.usage
                        delta = chunk.choices[0].delta.content if chunk.choices else None
                        if delta:
                            text += delta
                            self._deliver_text(item, delta)
                        if item.stop_requested:  # closing the stream stops the server generating
                            break
        except TimeoutError:
            if text:
                raise AnswerIncomplete("the answer timeout passed mid-stream", partial_text=text) from None
            raise ServerTimeout(f"no answer within {self._server.answer_timeout_seconds:.0f}s") from None
        except openai.APIError as exc:
            if text:
                raise AnswerIncomplete(f"the stream broke: {exc!r}", partial_text=text) from exc
            raise _server_error(exc) from exc
        self._verdict = (time.monotonic(), None)
        return GenerationResult(
            text=text,
            token_ids=[],
            prompt_tokens=usage.prompt_tokens if usage is not None else 0,
            completion_tokens=usage.completion_tokens if usage is not None else 0,
            queue_seconds=item.started_at - item.submitted_at,
            generate_seconds=time.monotonic() - started,
            stopped=item.stop_requested,
        )

    async def _create(self, body: dict[str, Any]) -> Any:
        assert self._client is not None
        return await self._client.chat.completions.create(**body)

    def _request_body(self, messages: list[dict[str, object]], kwargs: dict[str, object]) -> dict[str, Any]:
        """The chat completion request: the generate options in OpenAI's names, then `server.extra_body`."""
        body: dict[str, Any] = {
            "model": self._server.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},  # vLLM sends token counts only when asked
        }
        extra: dict[str, Any] = {}
        if "max_new_tokens" in kwargs:
            body["max_tokens"] = kwargs["max_new_tokens"]
        if kwargs.get("do_sample") is False:
            body["temperature"] = 0.0  # greedy, as servers spell it
        else:
            for name in ("temperature", "top_p"):
                if name in kwargs:
                    body[name] = kwargs[name]
            if "top_k" in kwargs:
                extra["top_k"] = kwargs["top_k"]
        if "repetition_penalty" in kwargs:
            extra["repetition_penalty"] = kwargs["repetition_penalty"]
        extra.update(self._server.extra_body)
        if extra:
            body["extra_body"] = extra
        return body

    async def _with_retries(self, call: Callable[[], Awaitable[T]]) -> T:
        """`await call()`, retried on refused connections (within the connect timeout) and on 429/5xx
        (within the retry deadline); other failures become their `ServerError` at once."""
        server = self._server
        started = time.monotonic()
        backoff = _FIRST_BACKOFF_SECONDS
        error: openai.APIError
        while True:
            try:
                return await call()
            except openai.APITimeoutError as exc:
                raise _server_error(exc) from exc
            except openai.APIConnectionError as exc:
                deadline, error = server.connect_timeout_seconds, exc
            except (openai.RateLimitError, openai.InternalServerError) as exc:
                deadline, error = server.retry_deadline_seconds, exc
            except openai.APIStatusError as exc:
                if exc.status_code < 500:
                    raise _server_error(exc) from exc
                deadline, error = server.retry_deadline_seconds, exc
            wait = max(backoff, _retry_after(error))
            if time.monotonic() - started + wait > deadline:
                raise _server_error(error, retried=True) from error
            logger.info("inference server: %s; retrying in %.2fs", _describe(error), wait)
            await asyncio.sleep(wait)
            backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)


def _retry_after(error: openai.APIError) -> float:
    """The server's Retry-After in seconds (capped), or 0."""
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return min(float(value), _MAX_BACKOFF_SECONDS) if value else 0.0
    except ValueError:
        return 0.0


def _describe(error: openai.APIError) -> str:
    status = getattr(error, "status_code", None)
    return f"HTTP {status}" if status is not None else type(error).__name__


def _server_error(error: openai.APIError, *, retried: bool = False) -> EngineError:
    """The error a client failure means for the user."""
    detail = f"{_describe(error)}: {error.message} {error.body or ''}".rstrip()
    if isinstance(error, openai.APITimeoutError):
        if type(error.__cause__).__name__ == "ConnectTimeout":
            return ServerUnavailable(detail)
        return ServerTimeout(detail)
    if isinstance(error, openai.APIConnectionError):
        return ServerUnavailable(detail)
    status = getattr(error, "status_code", None)
    if retried or (status is not None and (status == 429 or status >= 500)):
        return ServerUnavailable(detail)
    if _CONTEXT_TOO_LONG.search(detail):
        return ContextTooLong(detail)
    if status is None:  # an error event inside the stream: generation itself failed on the server
        return GenerationFailed(detail)
    return ServerRejected(detail)
