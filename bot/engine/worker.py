"""The inference worker: one thread owns the model; the event loop only queues requests and awaits futures.

The shape follows vLLM v1's engine core. `InferenceEngine.submit()` runs on the event loop: it appends the
request to a bounded FIFO and returns a handle at once. The worker thread blocks on a condition while idle;
while busy, each step forms a micro-batch, runs it through the pipeline and emits the outcomes back to the
loop with `loop.call_soon_threadsafe`. Nothing on the event loop touches torch.

The queue, positions and timeouts are `bot.engine.frontend`'s; which requests form a batch, or join one, is
`bot.engine.scheduler`'s. The worker adds two timing rules: a request that arrives while the worker is idle
waits at most `batch_wait_ms` for company; and a request that arrives while a batch runs joins it within
`join_interval_steps` decode steps: every that many steps the running batch pauses if someone may join, and
the next step resumes its rows (from their answers so far, see `bot.engine.pipeline`) with the newcomers.

Failures stay per request. A batch that raises is retried one request at a time from the start of each
answer, so one bad request (a newcomer too) does not fail its batch-mates (`GenerationFailed`, the original as
`__cause__`). Out of memory empties the CUDA cache and retries each request alone with half the pixels, then
fails that request with `OutOfMemory`. Callbacks (`on_text`, `on_queue_position`) and results always arrive on
the event loop thread.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bot.engine.api import GenerationResult
from bot.engine.frontend import EngineFrontEnd, settle
from bot.engine.loader import load_model
from bot.engine.pipeline import Pipeline, PipelineOutput, PipelineRequest
from bot.engine.scheduler import ScheduledRequest
from bot.engine.vision_cache import VisionCache
from bot.errors import EngineError, EngineStopped, GenerationFailed, ModelLoadError, OutOfMemory
from bot.settings import Settings

logger = logging.getLogger("bot.engine")

OOM_PIXEL_SCALE = 0.5  # pixel budget of the retry after running out of memory
_ABORT_JOIN_SECONDS = 10.0  # how long stop() waits for an aborted batch to unwind

_Outcome = PipelineOutput | EngineError | None  # None: nobody waits for it any more


class _Aborted(Exception):
    """Raised from the streaming callback to stop a batch that nobody waits for any more."""


@dataclass(eq=False, slots=True)
class _Row:
    """A running request and what the pipeline runs for it; between two steps it holds the answer so far."""

    item: ScheduledRequest
    request: PipelineRequest


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


def _as_engine_error(exc: Exception) -> EngineError:
    error: EngineError = OutOfMemory(f"out of memory: {exc}") if _is_oom(exc) else GenerationFailed(repr(exc))
    error.__cause__ = exc
    return error


class InferenceEngine(EngineFrontEnd):
    """Runs Qwen2.5-VL on one dedicated thread and serves requests from the event loop in micro-batches.

    `submit`, `count_text_tokens`, `stats` and `stop` are called on the event loop thread.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        # Shared with the worker thread; guarded by `_lock`.
        self._abort_running = False
        self._stopping = False
        # Owned by the worker thread (the tokenizer copy is the loop's, built there once).
        self._pipeline: Pipeline | None = None
        self._step_ended_at = 0.0  # time.monotonic() at the end of the last step
        self._members: list[ScheduledRequest] = []  # the requests of the pipeline call in progress
        self._tokenizer: Any = None
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
        with self._lock:
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

    async def readiness(self) -> str | None:
        """None once the model is loaded and the worker thread runs, else why not."""
        if self._thread is None:
            return "not started"
        with self._lock:
            stopping, accepting = self._stopping, self._accepting
        if stopping:  # stop() was called, the model failed to load, or the worker crashed
            return "stopped"
        if not self._thread.is_alive():
            return "the inference worker has stopped"
        return None if accepting else "the model is loading"

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
            settle(item.future, EngineStopped("the engine stopped before this request ran"))
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
            with self._lock:
                self._abort_running = True
                running = list(self._scheduler.running)
            logger.warning("the running batch outlived the %.1fs grace period; aborting it", grace)
            for item in running:
                settle(item.future, EngineStopped("the engine stopped while this request ran"))
            await asyncio.to_thread(thread.join, _ABORT_JOIN_SECONDS)
        if thread.is_alive():
            logger.error("the inference worker did not stop; leaving it behind as a daemon thread")
        else:
            logger.info("engine stopped")

    def _signal_stop(self) -> list[ScheduledRequest]:
        """Refuse new requests, tell the worker to finish, and take the queued requests out."""
        with self._lock:
            self._accepting = False
            self._stopping = True
            self._lock.notify_all()
            return self._scheduler.take_waiting()

    def _wake(self) -> None:
        self._lock.notify()

    # -- worker thread -----------------------------------------------------------------------------------

    def _thread_main(self, loaded: asyncio.Future[None]) -> None:
        try:
            self._pipeline = self._load()
        except ModelLoadError as exc:
            self._post(settle, loaded, exc)
            return
        except Exception as exc:
            error = ModelLoadError(f"cannot load the model: {exc}")
            error.__cause__ = exc
            self._post(settle, loaded, error)
            return
        self._post(settle, loaded, None)
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
        batch: list[_Row] = []  # the rows of a paused batch, carried to the next step
        while True:
            # 1. Block until there is work, then form a batch, or let waiting requests join the paused one
            #    (None: the engine is stopping).
            formed = self._next_batch(batch)
            if formed is None:
                return
            # 2. Run it until its rows end, or it pauses for newcomers; every failure becomes a per-request
            #    outcome, never an exception.
            started = time.monotonic()
            outcomes = self._execute(formed)
            self._step_ended_at = time.monotonic()
            # 3. Emit: settle each ended request's future on the loop, count, and move the queue forward.
            batch = self._finish(formed, outcomes, self._step_ended_at - started)

    def _next_batch(self, paused: list[_Row]) -> list[_Row] | None:
        limits = self._limits
        waiting = self._scheduler.waiting
        with self._lock:
            if paused:
                joining = self._joiners()
                self._scheduler.start(joining, time.monotonic())
                self._publish_positions()
                return paused + [self._row(item) for item in joining]
            while True:
                while not waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return None
                # A request that arrived after the last step gets up to batch_wait_ms to find company, unless
                # a full batch already waits; one that waited through a step had company gather meanwhile.
                head = waiting[0]
                wait = limits.batch_wait_ms / 1000
                deadline = head.submitted_at + wait if head.submitted_at >= self._step_ended_at else 0.0
                while waiting and not self._stopping and len(waiting) < limits.max_batch_size:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._lock.wait(remaining)
                if self._stopping:
                    return None
                if waiting:  # else every waiting request was cancelled meanwhile
                    break
            batch = self._scheduler.next_batch(limits.max_batch_size, limits.max_batch_tokens)
            self._scheduler.start(batch, time.monotonic())
            self._abort_running = False
            self._publish_positions()
        return [self._row(item) for item in batch]

    def _row(self, item: ScheduledRequest) -> _Row:
        """A fresh attempt at `item`: its pipeline request, streaming through `_text_sink`."""
        request = PipelineRequest(
            item.request.messages,
            item.generate_kwargs,
            self._text_sink(item),
            should_stop=functools.partial(_ends_early, item),
        )
        return _Row(item, request)

    def _joins_due(self) -> Callable[[], bool] | None:
        """The pipeline's `pause` for one step: every `join_interval_steps` decode steps, whether a waiting
        request may join the batch (None when joins are off)."""
        interval = self._limits.join_interval_steps
        if interval == 0:
            return None
        steps = itertools.count(1)

        def due() -> bool:
            if next(steps) % interval:
                return False
            with self._lock:
                return bool(self._joiners())

        return due

    def _joiners(self) -> list[ScheduledRequest]:
        """The waiting requests that may join the running batch now; called with `_lock` held."""
        if self._stopping:
            return []
        limits = self._limits
        return self._scheduler.next_batch(limits.max_batch_size, limits.max_batch_tokens, join=True)

    def _execute(self, batch: list[_Row]) -> list[_Outcome]:
        try:
            return list(self._attempt(batch, 1.0, self._joins_due()))
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
                return [self._run_alone(row.item, OOM_PIXEL_SCALE) for row in batch]
            if len(batch) == 1:
                return [self._failed(exc)]
            logger.warning(
                "a batch of %d failed (%s); retrying each request alone", len(batch), type(exc).__name__
            )
            return [self._run_alone(row.item, 1.0) for row in batch]

    def _run_alone(self, item: ScheduledRequest, scale: float) -> _Outcome:
        """`item` from the start of its answer, alone and to its end."""
        if item.discarded or self._abort_running:
            return None
        try:
            return self._attempt([self._row(item)], scale, None)[0]
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

    def _attempt(
        self, rows: list[_Row], scale: float, pause: Callable[[], bool] | None
    ) -> list[PipelineOutput]:
        assert self._pipeline is not None
        if scale != 1.0:
            with self._lock:
                self._counters.oom_retries += 1
        self._members = [row.item for row in rows]
        outputs = self._pipeline.run_batch([row.request for row in rows], pixel_scale=scale, pause=pause)
        if len(outputs) != len(rows):
            raise RuntimeError(f"the pipeline returned {len(outputs)} outputs for {len(rows)} requests")
        return outputs

    def _count_abort(self) -> None:
        with self._lock:
            self._counters.aborted += 1

    def _text_sink(self, item: ScheduledRequest) -> Callable[[str], None]:
        """The pipeline's streaming callback for one attempt at `item`: forwards new text to the loop, aborts
        dead runs.

        Installed even without `on_text`, because raising from it is how a run that nobody waits for
        (cancelled, or past the shutdown grace) stops between two tokens. A retried request regenerates
        from the start; only text beyond what was already sent is forwarded.
        """
        forward = item.request.on_text is not None
        text = ""

        def sink(delta: str) -> None:
            nonlocal text
            if self._abort_running or all(entry.discarded for entry in self._members):
                raise _Aborted
            text += delta
            if forward and len(text) > len(item.streamed):
                fresh = text[len(item.streamed) :]
                item.streamed = text
                self._post(self._deliver_text, item, fresh)

        return sink

    def _finish(self, batch: list[_Row], outcomes: list[_Outcome], elapsed: float) -> list[_Row]:
        """Settle the requests that ended; return the paused rows, to run on in the next step."""
        paused, ended = [], []
        for row, outcome in zip(batch, outcomes, strict=True):
            # A row stopped or dropped right at the pause ends there, with its text so far.
            if (
                isinstance(outcome, PipelineOutput)
                and outcome.resume is not None
                and not _ends_early(row.item)
            ):
                row.request.resume = outcome.resume
                paused.append(row)
                continue
            ended.append((row.item, outcome))
        failed = sum(isinstance(outcome, EngineError) for _, outcome in ended)
        with self._lock:
            self._scheduler.finish([item for item, _ in ended])
            counters = self._counters
            counters.batches += 1
            counters.batch_sizes[len(batch)] += 1
            counters.failed += failed
            counters.completed += sum(isinstance(outcome, PipelineOutput) for _, outcome in ended)
            self._publish_positions()
        waited = max(row.item.started_at - row.item.submitted_at for row in batch)
        logger.info(
            "batch of %d in %.2fs (%d paused for newcomers, longest queue wait %.3fs, %d failed)",
            len(batch),
            elapsed,
            len(paused),
            waited,
            failed,
        )
        now = time.monotonic()
        for item, outcome in ended:
            if outcome is None:
                continue
            if isinstance(outcome, EngineError):
                self._post(settle, item.future, outcome)
                continue
            tail = outcome.text[len(item.streamed) :]
            if item.request.on_text is not None and tail and outcome.text.startswith(item.streamed):
                self._post(self._deliver_text, item, tail)
            result = GenerationResult(
                text=outcome.text,
                token_ids=list(outcome.token_ids),
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=len(outcome.token_ids),
                queue_seconds=item.started_at - item.submitted_at,
                generate_seconds=now - item.started_at,
                stopped=item.stop_requested,
            )
            self._post(settle, item.future, result)
        return paused

    def _fail_everything(self, error: EngineError) -> None:
        with self._lock:
            self._accepting = False
            self._stopping = True
            items = self._scheduler.take_waiting() + self._scheduler.running
            self._scheduler.finish(list(items))
        for item in items:
            self._post(settle, item.future, error)

    @staticmethod
    def _release_memory() -> None:
        torch.cuda.empty_cache()


def _ends_early(item: ScheduledRequest) -> bool:
    """Whether `item`'s row should end at this decode step: stopped by the user, or nobody waits for it."""
    return item.stop_requested or item.discarded


def _vision_cache(budget_mb: int) -> VisionCache | None:
    """The pipeline's vision-encoder cache with `budget_mb` of memory, or None when disabled."""
    return VisionCache(max_bytes=budget_mb * 1024 * 1024) if budget_mb > 0 else None
