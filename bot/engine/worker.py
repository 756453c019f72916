"""The inference worker: one thread owns the model; the event loop only queues requests and awaits futures.

The shape follows vLLM v1's engine core. `InferenceEngine.submit()` runs on the event loop: it appends the
request to a bounded FIFO and returns a handle at once. The worker thread blocks on a condition while idle;
while busy, each step forms a micro-batch, runs it through the pipeline and emits the outcomes back to the
loop with `loop.call_soon_threadsafe`. Nothing on the event loop touches torch.

Scheduling, in one place (`form_batch`):

- The oldest waiting request always leads the next batch, so nothing starves. Its generate kwargs define
  the batch; only requests with equal kwargs join it, the rest wait for a later step.
- A conversation never has two requests in one batch, and a later question never overtakes an earlier one:
  it waits for the previous answer.
- A batch holds at most `max_batch_size` requests and `max_batch_tokens` estimated padded tokens:
  batch size × the longest (estimated prompt + `max_new_tokens`), since padding makes every row that long.
- A request that arrives while the worker is idle waits at most `batch_wait_ms` for company; requests
  that arrived during a step have gathered meanwhile, so the next step starts at once.

Failures stay per request. A batch that raises is retried one request at a time, so one bad request does not
fail its batch-mates (`GenerationFailed`, the original as `__cause__`). Out of memory empties the CUDA cache
and retries each request alone with half the pixels, then fails that request with `OutOfMemory`. Callbacks
(`on_text`, `on_queue_position`) and results always arrive on the event loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bot.engine.loader import load_model
from bot.engine.pipeline import Pipeline, PipelineOutput, PipelineRequest
from bot.engine.vision_cache import VisionCache
from bot.errors import EngineError, EngineStopped, GenerationFailed, ModelLoadError, OutOfMemory, QueueFull
from bot.settings import Settings, VisionSettings

logger = logging.getLogger("bot.engine")

OOM_PIXEL_SCALE = 0.5  # pixel budget of the retry after running out of memory
_PATCH_PIXELS = 28 * 28  # one vision token (after the 2×2 merge) covers 28×28 pixels
_CHARS_PER_TOKEN = 3  # a cheap, generous estimate for mixed-language text
_TOKENS_PER_MESSAGE = 8  # chat template markers around each message
_ABORT_JOIN_SECONDS = 10.0  # how long stop() waits for an aborted batch to unwind

_Outcome = PipelineOutput | EngineError | None  # None: nobody waits for it any more


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One question for the model. Both callbacks are called on the event loop thread."""

    messages: list[dict]
    conversation_key: str
    generate_kwargs: dict[str, object] | None = None  # None: `settings.generation.generate_kwargs()`
    on_text: Callable[[str], None] | None = None  # each new piece of the answer, in order
    on_queue_position: Callable[[int], None] | None = None  # requests ahead; 0 = now running


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The answer to one request, with where its time went."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    queue_seconds: float
    generate_seconds: float


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the worker's counters (`InferenceEngine.stats`)."""

    batches: int
    batch_sizes: dict[int, int]  # batch size -> how many batches had that size
    completed: int
    failed: int
    cancelled: int
    aborted: int  # runs stopped midway because nobody waited for them any more
    oom_retries: int
    queued: int
    running: int


class _Aborted(Exception):
    """Raised from the streaming callback to stop a batch that nobody waits for any more."""


@dataclass(eq=False, slots=True)
class _Item:
    """A request inside the engine.

    `started_at`, `ahead` and `discarded` change under the engine's lock; `streamed` belongs to the worker
    thread and `timer` to the event loop.
    """

    seq: int
    request: EngineRequest
    generate_kwargs: dict[str, object]
    cost: int  # estimated tokens: prompt + max_new_tokens
    future: asyncio.Future[GenerationResult]
    submitted_at: float
    started_at: float = 0.0
    ahead: int = -1  # the position last published
    discarded: bool = False  # the future is done elsewhere (cancelled, timed out, stopped): drop the result
    streamed: str = ""  # text already sent to on_text (worker thread only)
    timer: asyncio.TimerHandle | None = None


class RequestHandle:
    """The caller's side of a submitted request."""

    __slots__ = ("_item",)

    def __init__(self, item: _Item) -> None:
        self._item = item

    @property
    def ahead(self) -> int:
        """How many earlier-submitted requests are still queued or running; it only goes down.

        0 once this one runs (or is next: it then starts within `batch_wait_ms`).
        """
        return self._item.ahead

    def done(self) -> bool:
        """Whether the request has finished, failed or been cancelled."""
        return self._item.future.done()

    async def result(self) -> GenerationResult:
        """Wait for the answer. Cancelling the awaiting task cancels the request."""
        return await self._item.future

    def cancel(self) -> bool:
        """Drop the request: a queued one leaves the queue, a running one has its result discarded."""
        return self._item.future.cancel()


def estimate_prompt_tokens(messages: Sequence[dict], vision: VisionSettings) -> int:
    """A cheap upper-bound guess of a prompt's length: text chars / 3 plus each image's pixel budget."""
    chars = 0
    vision_tokens = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
            continue
        for part in content or ():
            kind = part.get("type")
            if kind == "text":
                chars += len(part.get("text", ""))
            elif kind == "image":
                vision_tokens += int(part.get("max_pixels", vision.max_pixels)) // _PATCH_PIXELS
            elif kind == "video":
                frames = vision.video_max_frames // 2  # two frames share one temporal patch
                vision_tokens += (
                    frames * int(part.get("max_pixels", vision.video_max_pixels)) // _PATCH_PIXELS
                )
    return chars // _CHARS_PER_TOKEN + vision_tokens + _TOKENS_PER_MESSAGE * len(messages)


def form_batch(queue: Sequence[_Item], max_size: int, max_tokens: int) -> list[_Item]:
    """Pick the next batch from the FIFO `queue` (non-empty); see the module docstring for the rules."""
    head = queue[0]
    batch = [head]
    widest = head.cost
    blocked = {head.request.conversation_key}  # conversations whose next request must not jump ahead
    for item in queue[1:]:
        if len(batch) >= max_size:
            break
        key = item.request.conversation_key
        if key in blocked:
            continue
        blocked.add(key)
        if item.generate_kwargs != head.generate_kwargs:
            continue
        candidate = max(widest, item.cost)
        if (len(batch) + 1) * candidate > max_tokens:
            continue
        widest = candidate
        batch.append(item)
    return batch


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


def _as_engine_error(exc: Exception) -> EngineError:
    error: EngineError = OutOfMemory(f"out of memory: {exc}") if _is_oom(exc) else GenerationFailed(repr(exc))
    error.__cause__ = exc
    return error


def _settle(future: asyncio.Future[Any], outcome: object) -> None:
    """Resolve `future` on the loop thread unless it is already done (cancelled, timed out)."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


@dataclass(slots=True)
class _Counters:
    batches: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    aborted: int = 0
    oom_retries: int = 0


class InferenceEngine:
    """Runs Qwen2.5-VL on one dedicated thread and serves requests from the event loop in micro-batches.

    `submit`, `generate`, `count_text_tokens`, `stats` and `stop` are called on the event loop thread.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._limits = settings.engine
        self._cond = threading.Condition()
        # Shared with the worker thread; guarded by `_cond`.
        self._queue: list[_Item] = []  # waiting, oldest first
        self._running: list[_Item] = []
        self._abort_running = False
        self._accepting = False
        self._stopping = False
        self._counters = _Counters()
        # Owned by the worker thread (the tokenizer copy is the loop's, built there once).
        self._pipeline: Pipeline | None = None
        self._step_ended_at = 0.0  # time.monotonic() at the end of the last step
        self._tokenizer: Any = None
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_task: asyncio.Future[None] | None = None

    # -- event loop side ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model and processor in the worker thread; raise ModelLoadError if that fails."""
        if self._thread is not None:
            raise RuntimeError("the engine was already started")
        self._loop = asyncio.get_running_loop()
        loaded: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(loaded,), name="inference-worker", daemon=True
        )
        self._thread.start()
        try:
            await loaded
        except BaseException:
            self._signal_stop()  # the thread ends after loading, or already has
            raise
        with self._cond:
            if self._stopping:
                raise EngineStopped("the engine was stopped while the model loaded")
            self._accepting = True

    def count_text_tokens(self, text: str) -> int:
        """Tokens in `text` (no special tokens), as `Pipeline.count_text_tokens` counts them.

        Runs on the loop with the engine's own copy of the fast tokenizer: cheap (Rust), and it never shares
        tokenizer state with the worker, whose padded batch encoding mutates its tokenizer.
        """
        if self._tokenizer is None:
            raise EngineStopped("the engine has not been started")
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def worker_alive(self) -> bool:
        """Whether the worker thread is running (loading, idle or busy)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the counters: batches, batch sizes, outcomes, queue lengths."""
        with self._cond:
            counters = self._counters
            return EngineStats(
                batches=counters.batches,
                batch_sizes=dict(counters.batch_sizes),
                completed=counters.completed,
                failed=counters.failed,
                cancelled=counters.cancelled,
                aborted=counters.aborted,
                oom_retries=counters.oom_retries,
                queued=len(self._queue),
                running=len(self._running),
            )

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue `request` and return its handle; raise QueueFull or EngineStopped at once."""
        loop = self._loop
        if loop is None:
            raise EngineStopped("the engine has not been started")
        kwargs = (
            dict(request.generate_kwargs)
            if request.generate_kwargs is not None
            else self._settings.generation.generate_kwargs()
        )
        new_tokens = kwargs.get("max_new_tokens")
        cost = estimate_prompt_tokens(request.messages, self._settings.vision)
        cost += new_tokens if isinstance(new_tokens, int) else 0
        item = _Item(next(self._seq), request, kwargs, cost, loop.create_future(), time.monotonic())
        with self._cond:
            if not self._accepting:
                raise EngineStopped("the engine is not accepting requests")
            if len(self._queue) >= self._limits.max_queue_size:
                raise QueueFull(f"{len(self._queue)} requests are already waiting")
            self._queue.append(item)
            self._publish_positions()
            self._cond.notify()
        item.future.add_done_callback(functools.partial(self._on_future_done, item))
        item.timer = loop.call_later(self._limits.request_timeout_seconds, self._expire, item)
        return RequestHandle(item)

    async def generate(
        self,
        messages: list[dict],
        *,
        conversation_key: str,
        generate_kwargs: dict[str, object] | None = None,
        on_text: Callable[[str], None] | None = None,
        on_queue_position: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Submit one request and wait for its answer."""
        request = EngineRequest(messages, conversation_key, generate_kwargs, on_text, on_queue_position)
        return await self.submit(request).result()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, fail queued requests, give running ones `grace` seconds, join the thread.

        Idempotent: later calls wait for the first one.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._shutdown(grace))
        await asyncio.shield(self._stop_task)

    async def _shutdown(self, grace: float | None) -> None:
        grace = self._limits.shutdown_grace_seconds if grace is None else grace
        queued = self._signal_stop()
        for item in queued:
            _settle(item.future, EngineStopped("the engine stopped before this request ran"))
        thread = self._thread
        if thread is None:
            return
        logger.info(
            "stopping: %d queued requests failed, waiting up to %.1fs for the running batch",
            len(queued),
            grace,
        )
        await asyncio.to_thread(thread.join, grace)
        if thread.is_alive():
            with self._cond:
                self._abort_running = True
                running = list(self._running)
            logger.warning("the running batch outlived the %.1fs grace period; aborting it", grace)
            for item in running:
                _settle(item.future, EngineStopped("the engine stopped while this request ran"))
            await asyncio.to_thread(thread.join, _ABORT_JOIN_SECONDS)
        if thread.is_alive():
            logger.error("the inference worker did not stop; leaving it behind as a daemon thread")
        else:
            logger.info("engine stopped")

    def _signal_stop(self) -> list[_Item]:
        """Refuse new requests, tell the worker to finish, and take the queued requests out."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify_all()
            queued, self._queue = self._queue, []
        return queued

    def _on_future_done(self, item: _Item, future: asyncio.Future[GenerationResult]) -> None:
        """Loop thread: forget a request whose future finished for any reason."""
        if item.timer is not None:
            item.timer.cancel()
        with self._cond:
            if future.cancelled():
                self._counters.cancelled += 1
            if item in self._queue:
                self._queue.remove(item)
                self._publish_positions()
            elif item in self._running:
                item.discarded = True

    def _expire(self, item: _Item) -> None:
        seconds = self._limits.request_timeout_seconds
        _settle(
            item.future,
            GenerationFailed(
                f"request timed out after {seconds:.0f}s",
                user_message="That took too long to answer. Please try again in a moment.",
            ),
        )

    def _deliver_text(self, item: _Item, delta: str) -> None:
        callback = item.request.on_text
        if callback is None or item.future.done():
            return
        try:
            callback(delta)
        except Exception:
            logger.exception("an on_text callback failed")

    def _deliver_positions(self, updates: list[tuple[_Item, int]]) -> None:
        for item, ahead in updates:
            callback = item.request.on_queue_position
            if callback is None or item.future.done():
                continue
            try:
                callback(ahead)
            except Exception:
                logger.exception("an on_queue_position callback failed")

    # -- shared (called with `_cond` held) ----------------------------------------------------------------

    def _publish_positions(self) -> None:
        """Recompute every request's position and send the changed ones to the loop.

        A queued request's position counts the earlier-submitted requests still queued or running, so it
        only ever goes down; a running request is at 0.
        """
        running = set(self._running)
        updates: list[tuple[_Item, int]] = []
        in_order = sorted(self._queue + self._running, key=lambda entry: entry.seq)
        for earlier, item in enumerate(in_order):
            ahead = 0 if item in running else earlier
            if item.ahead != ahead:
                item.ahead = ahead
                updates.append((item, ahead))
        if updates:
            self._post(self._deliver_positions, updates)

    def _post(self, callback: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to tell
            self._loop.call_soon_threadsafe(callback, *args)

    # -- worker thread -----------------------------------------------------------------------------------

    def _thread_main(self, loaded: asyncio.Future[None]) -> None:
        try:
            self._pipeline = self._load()
        except ModelLoadError as exc:
            self._post(_settle, loaded, exc)
            return
        except Exception as exc:
            error = ModelLoadError(f"cannot load the model: {exc}")
            error.__cause__ = exc
            self._post(_settle, loaded, error)
            return
        self._post(_settle, loaded, None)
        try:
            self._serve()
        except BaseException:  # a bug in the engine itself: fail everyone rather than hang them
            logger.exception("the inference worker crashed")
            self._fail_everything(GenerationFailed("the inference worker stopped unexpectedly"))
        finally:
            self._pipeline = None
            torch.cuda.empty_cache()

    def _load(self) -> Pipeline:
        started = time.monotonic()
        loaded = load_model(self._settings.model)
        vision = self._settings.vision
        pipeline = Pipeline(
            loaded.model,
            loaded.processor,
            min_pixels=vision.min_pixels,
            max_pixels=vision.max_pixels,
            vision_cache=_vision_cache(self._limits.vision_cache_mb),
        )
        self._tokenizer = copy.deepcopy(loaded.processor.tokenizer)
        logger.info("inference worker ready on %s in %.1fs", loaded.device, time.monotonic() - started)
        return pipeline

    def _serve(self) -> None:
        """The busy loop: block while idle; each step forms a batch, runs it and emits the outcomes."""
        while True:
            # 1. Block until there is work, then form a batch (None: the engine is stopping).
            batch = self._next_batch()
            if batch is None:
                return
            # 2. Run it; every failure becomes a per-request outcome, never an exception.
            started = time.monotonic()
            outcomes = self._execute(batch)
            self._step_ended_at = time.monotonic()
            # 3. Emit: settle each future on the loop, count, and move the queue forward.
            self._finish(batch, outcomes, self._step_ended_at - started)

    def _next_batch(self) -> list[_Item] | None:
        wait = self._limits.batch_wait_ms / 1000
        with self._cond:
            while True:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                # A request that arrived after the last step gets up to batch_wait_ms to find company, unless
                # a full batch already waits; one that waited through a step had company gather meanwhile.
                head = self._queue[0]
                deadline = head.submitted_at + wait if head.submitted_at >= self._step_ended_at else 0.0
                while self._queue and not self._stopping and len(self._queue) < self._limits.max_batch_size:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._stopping:
                    return None
                if self._queue:  # else every waiting request was cancelled meanwhile
                    break
            batch = form_batch(self._queue, self._limits.max_batch_size, self._limits.max_batch_tokens)
            now = time.monotonic()
            for item in batch:
                self._queue.remove(item)
                item.started_at = now
            self._running = batch
            self._abort_running = False
            self._publish_positions()
        return batch

    def _execute(self, batch: list[_Item]) -> list[_Outcome]:
        try:
            return list(self._attempt(batch, 1.0))
        except _Aborted:
            self._count_abort()
            return [None] * len(batch)
        except Exception as exc:
            if _is_oom(exc):
                self._release_memory()
                logger.warning(
                    "out of memory on a batch of %d; retrying each request alone with %.0f%% of the pixels",
                    len(batch),
                    OOM_PIXEL_SCALE * 100,
                )
                return [self._run_alone(item, OOM_PIXEL_SCALE) for item in batch]
            if len(batch) == 1:
                return [self._failed(exc)]
            logger.warning(
                "a batch of %d failed (%s); retrying each request alone", len(batch), type(exc).__name__
            )
            return [self._run_alone(item, 1.0) for item in batch]

    def _run_alone(self, item: _Item, scale: float) -> _Outcome:
        if item.discarded or self._abort_running:
            return None
        try:
            return self._attempt([item], scale)[0]
        except _Aborted:
            self._count_abort()
            return None
        except Exception as exc:
            if _is_oom(exc) and scale > OOM_PIXEL_SCALE:
                self._release_memory()
                return self._run_alone(item, OOM_PIXEL_SCALE)
            return self._failed(exc)

    @staticmethod
    def _failed(exc: Exception) -> EngineError:
        """The request's error; the cause is logged with its traceback, since users only see a sentence."""
        logger.warning("a request failed: %s", exc, exc_info=exc)
        return _as_engine_error(exc)

    def _attempt(self, items: list[_Item], scale: float) -> list[PipelineOutput]:
        assert self._pipeline is not None
        if scale != 1.0:
            with self._cond:
                self._counters.oom_retries += 1
        requests = [
            PipelineRequest(item.request.messages, item.generate_kwargs, self._text_sink(item, items))
            for item in items
        ]
        outputs = self._pipeline.run_batch(requests, pixel_scale=scale)
        if len(outputs) != len(items):
            raise RuntimeError(f"the pipeline returned {len(outputs)} outputs for {len(items)} requests")
        return outputs

    def _count_abort(self) -> None:
        with self._cond:
            self._counters.aborted += 1

    def _text_sink(self, item: _Item, attempt: list[_Item]) -> Callable[[str], None]:
        """The pipeline's streaming callback for `item`: forwards new text to the loop, aborts dead runs.

        Installed even without `on_text`, because raising from it is how a run that nobody waits for
        (cancelled, or past the shutdown grace) stops between two tokens. A retried request regenerates
        from the start; only text beyond what was already sent is forwarded.
        """
        forward = item.request.on_text is not None
        text = ""

        def sink(delta: str) -> None:
            nonlocal text
            if self._abort_running or all(entry.discarded for entry in attempt):
                raise _Aborted
            text += delta
            if forward and len(text) > len(item.streamed):
                fresh = text[len(item.streamed) :]
                item.streamed = text
                self._post(self._deliver_text, item, fresh)

        return sink

    def _finish(self, batch: list[_Item], outcomes: list[_Outcome], elapsed: float) -> None:
        failed = sum(isinstance(outcome, EngineError) for outcome in outcomes)
        with self._cond:
            self._running = []
            counters = self._counters
            counters.batches += 1
            counters.batch_sizes[len(batch)] += 1
            counters.failed += failed
            counters.completed += sum(isinstance(outcome, PipelineOutput) for outcome in outcomes)
            self._publish_positions()
        waited = max(item.started_at - item.submitted_at for item in batch)
        logger.info(
            "batch of %d in %.2fs (longest queue wait %.3fs, %d failed)", len(batch), elapsed, waited, failed
        )
        for item, outcome in zip(batch, outcomes, strict=True):
            if outcome is None:
                continue
            if isinstance(outcome, EngineError):
                self._post(_settle, item.future, outcome)
                continue
            tail = outcome.text[len(item.streamed) :]
            if item.request.on_text is not None and tail and outcome.text.startswith(item.streamed):
                self._post(self._deliver_text, item, tail)
            result = GenerationResult(
                text=outcome.text,
                token_ids=list(outcome.token_ids),
                prompt_tokens=outcome.prompt_tokens,
                queue_seconds=item.started_at - item.submitted_at,
                generate_seconds=elapsed,
            )
            self._post(_settle, item.future, result)

    def _fail_everything(self, error: EngineError) -> None:
        with self._cond:
            self._accepting = False
            self._stopping = True
            items, self._queue, self._running = self._queue + self._running, [], []
        for item in items:
            self._post(_settle, item.future, error)

    @staticmethod
    def _release_memory() -> None:
        torch.cuda.empty_cache()


def _vision_cache(budget_mb: int) -> VisionCache | None:
    """The pipeline's vision-encoder cache with `budget_mb` of memory, or None when disabled."""
    return VisionCache(max_bytes=budget_mb * 1024 * 1024) if budget_mb > 0 else None
