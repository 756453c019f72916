"""Every Prometheus metric the bot exports, defined once, in one registry per bot (never the global one).

Layers get a `Metrics` and call its methods (`question_finished`, `media_failed`, ...): none of them touches
prometheus_client or global state. The engine's queue and batch figures are read from its own `EngineStats`
at each scrape, so they have one owner. `bot.health` serves `registry` at /metrics. Imports no torch.

    qwenbot_questions_total{outcome,error}   questions by outcome (answered, stopped, unsaved, duplicate,
                                             failed, cancelled); `error` is the failure's class, "" otherwise
    qwenbot_first_text_seconds               question received → first streamed text (histogram)
    qwenbot_answer_seconds                   question received → whole answer (histogram)
    qwenbot_generated_tokens_total           tokens the model generated for answers
    qwenbot_queue_depth                      requests waiting for the engine
    qwenbot_running_requests                 requests the engine is answering
    qwenbot_batch_size                       requests per model run (histogram; 1 per request on a server)
    qwenbot_model_load_seconds               how long the engine took to start (model load, or server check)
    qwenbot_media_bytes                      bytes received per attachment (histogram)
    qwenbot_media_failures_total{error}      attachments refused, by error class
    qwenbot_media_decode_waits_total         images whose decode waited for others to free memory
    qwenbot_discord_http_errors_total{status}  Discord REST responses >= 400 by status (429: rate limited)
    qwenbot_store_errors_total{error}        database operations that failed, by SQLAlchemy error class
    qwenbot_store_write_retries_total        tries again of turns the database refused for a passing reason
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from bot.engine.api import EngineStats

PREFIX = "qwenbot"
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BYTES_BUCKETS = tuple(float(16 * 1024 * 4**power) for power in range(8))  # 16 KiB .. 256 MiB
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The bot's metrics and the methods the layers record through; thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._questions = Counter(
            f"{PREFIX}_questions_total",
            "Questions by outcome; error is the failure's class",
            ("outcome", "error"),
            registry=registry,
        )
        self._first_text = Histogram(
            f"{PREFIX}_first_text_seconds",
            "Seconds from a question to the first streamed text of its answer",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self._answer = Histogram(
            f"{PREFIX}_answer_seconds",
            "Seconds from a question to its whole answer",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self._tokens = Counter(
            f"{PREFIX}_generated_tokens_total", "Tokens generated for answers", registry=registry
        )
        self._model_load = Gauge(
            f"{PREFIX}_model_load_seconds",
            "Seconds the engine took to start: loading the model, or checking the inference server",
            registry=registry,
        )
        self._media_bytes = Histogram(
            f"{PREFIX}_media_bytes", "Bytes received per attachment", buckets=BYTES_BUCKETS, registry=registry
        )
        self._media_failures = Counter(
            f"{PREFIX}_media_failures_total",
            "Attachments refused, by error class",
            ("error",),
            registry=registry,
        )
        self._media_decode_waits = Counter(
            f"{PREFIX}_media_decode_waits_total",
            "Images whose decode waited for others to finish (their pixels together were over the cap)",
            registry=registry,
        )
        self._discord_http_errors = Counter(
            f"{PREFIX}_discord_http_errors_total",
            "Discord REST responses with status 400 or above, by status (429: rate limited)",
            ("status",),
            registry=registry,
        )
        self._store_errors = Counter(
            f"{PREFIX}_store_errors_total",
            "Database operations that failed, by error class",
            ("error",),
            registry=registry,
        )
        self._store_write_retries = Counter(
            f"{PREFIX}_store_write_retries_total",
            "Tries again of turns whose write failed for a passing reason (database locked, busy, lost)",
            registry=registry,
        )
        self._engine = _EngineCollector()
        registry.register(self._engine)

    # -- answering -----------------------------------------------------------------------------------------

    def question_finished(self, outcome: str, error: BaseException | None = None) -> None:
        """Count one question by its outcome, and by the class of the error that ended it."""
        self._questions.labels(outcome, type(error).__name__ if error is not None else "").inc()

    def first_text(self, seconds: float) -> None:
        """The first piece of an answer was shown `seconds` after its question arrived."""
        self._first_text.observe(seconds)

    def answered(self, seconds: float) -> None:
        """A whole answer was ready `seconds` after its question arrived."""
        self._answer.observe(seconds)

    def tokens_generated(self, count: int) -> None:
        """The model generated `count` tokens for an answer."""
        self._tokens.inc(count)

    # -- engine --------------------------------------------------------------------------------------------

    def engine_started(self, seconds: float) -> None:
        """The engine started in `seconds` (model loaded, or inference server checked)."""
        self._model_load.set(seconds)

    def watch_engine(self, stats: Callable[[], EngineStats]) -> None:
        """Read queue depth, running requests and batch sizes from `stats()` at each scrape."""
        self._engine.stats = stats

    # -- media ---------------------------------------------------------------------------------------------

    def media_received(self, size: int) -> None:
        """An attachment of `size` bytes arrived (downloaded, or handed over as bytes or a file)."""
        self._media_bytes.observe(size)

    def media_failed(self, error: Exception) -> None:
        """An attachment was refused with `error`."""
        self._media_failures.labels(type(error).__name__).inc()

    def media_decode_waited(self) -> None:
        """An image's decode waited for others to finish before it started."""
        self._media_decode_waits.inc()

    # -- store ---------------------------------------------------------------------------------------------

    def store_failed(self, error: Exception) -> None:
        """A database operation failed with `error` (SQLAlchemy's exception)."""
        self._store_errors.labels(type(error).__name__).inc()

    def store_write_retried(self) -> None:
        """A turn's write is tried again after a transient failure."""
        self._store_write_retries.inc()

    # -- Discord -------------------------------------------------------------------------------------------

    def discord_http_trace(self) -> aiohttp.TraceConfig:
        """A trace for discord.py's HTTP session (`http_trace=`) counting its error responses by status."""
        trace = aiohttp.TraceConfig()

        async def on_request_end(
            _session: aiohttp.ClientSession, _context: object, params: aiohttp.TraceRequestEndParams
        ) -> None:
            status = params.response.status
            if status >= 400:
                self._discord_http_errors.labels(str(status)).inc()

        trace.on_request_end.append(on_request_end)
        return trace


class _EngineCollector:
    """Queue depth, running requests and the batch size histogram, from the engine's own counters."""

    def __init__(self) -> None:
        self.stats: Callable[[], EngineStats] | None = None

    def collect(self) -> Iterable[Metric]:
        stats = self.stats() if self.stats is not None else None
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Requests waiting for the engine", value=stats.queued if stats else 0
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_running_requests",
            "Requests the engine is answering",
            value=stats.running if stats else 0,
        )
        sizes = stats.batch_sizes if stats else {}
        cumulative = [
            (str(float(bound)), float(sum(count for size, count in sizes.items() if size <= bound)))
            for bound in BATCH_BUCKETS
        ]
        cumulative.append(("+Inf", float(sum(sizes.values()))))
        yield HistogramMetricFamily(
            f"{PREFIX}_batch_size",
            "Requests per model run (on an inference server, 1 per request sent)",
            buckets=cumulative,
            sum_value=float(sum(size * count for size, count in sizes.items())),
        )
