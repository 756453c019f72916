"""Wiring: settings → store → media → engine → answering service, started and stopped in the right order."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bot.answering import AnswerService
from bot.engine import create_engine
from bot.errors import BotError, ConfigError
from bot.health import Readiness
from bot.media import MediaFetcher
from bot.metrics import Metrics
from bot.settings import Settings, StorageSettings
from bot.store import ConversationStore, upgrade

log = logging.getLogger("bot.app")


def migrate(storage: StorageSettings) -> None:
    """Create the data directories (owner-only) and bring the database to the latest schema (blocking)."""
    directories = (("storage.data_dir", storage.data_dir), ("storage.media_dir", storage.resolved_media_dir))
    for key, path in directories:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{key}: cannot create {path}: {exc.strerror}") from None
    upgrade(storage.resolved_database_url, busy_timeout_ms=storage.sqlite_busy_timeout_ms)


def make_store(storage: StorageSettings, metrics: Metrics | None = None) -> ConversationStore:
    """The conversation store for these storage settings (not yet opened)."""
    return ConversationStore(
        storage.resolved_database_url,
        storage.resolved_media_dir,
        busy_timeout_ms=storage.sqlite_busy_timeout_ms,
        metrics=metrics,
    )


PURGE_INTERVAL_SECONDS = 24 * 60 * 60


async def purge_periodically(service: AnswerService, interval: float = PURGE_INTERVAL_SECONDS) -> None:
    """Apply the history retention and sweep orphaned media now, then every `interval` seconds."""
    while True:
        try:
            result = await service.purge_expired()
        except BotError as exc:
            log.warning("retention purge failed: %r", exc)
        else:
            if result.messages_deleted or result.orphan_files_deleted:
                log.info(
                    "purge: %d old messages, %d unused media files and %d orphaned files deleted",
                    result.messages_deleted,
                    result.media_deleted,
                    result.orphan_files_deleted,
                )
        await asyncio.sleep(interval)


@asynccontextmanager
async def running_service(
    settings: Settings, *, metrics: Metrics | None = None, readiness: Readiness | None = None
) -> AsyncIterator[AnswerService]:
    """Migrate the database, open the store, the media fetcher and the engine (the in-process model or an
    inference server, as `engine.backend` says); close them all on exit.

    Every part records into `metrics`; the database and the engine are on `readiness` while they run.
    """
    metrics = metrics or Metrics()
    readiness = readiness or Readiness()
    log.info("applying database migrations")
    await asyncio.to_thread(migrate, settings.storage)
    async with (
        make_store(settings.storage, metrics) as store,
        MediaFetcher(settings.media, settings.storage.resolved_media_dir, metrics=metrics) as media,
    ):
        engine = create_engine(settings)
        metrics.watch_engine(lambda: engine.stats)
        if settings.engine.backend == "server":
            log.info("checking the inference server at %s", settings.server.base_url)
        else:
            log.info("loading model %s", settings.model.name_or_path)
        with readiness.watch("database", store.readiness), readiness.watch("engine", engine.readiness):
            started = time.monotonic()
            await engine.start()
            metrics.engine_started(time.monotonic() - started)
            service = AnswerService(settings, store, media, engine, metrics=metrics)
            try:
                yield service
            finally:
                await service.finish_writes()
                await engine.stop()
