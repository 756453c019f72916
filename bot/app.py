"""Wiring: settings → store → media → engine → answering service, started and stopped in the right order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bot.answering import AnswerService
from bot.engine import create_engine
from bot.errors import BotError, ConfigError
from bot.media import MediaFetcher
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


def make_store(storage: StorageSettings) -> ConversationStore:
    """The conversation store for these storage settings (not yet opened)."""
    return ConversationStore(
        storage.resolved_database_url,
        storage.resolved_media_dir,
        busy_timeout_ms=storage.sqlite_busy_timeout_ms,
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
async def running_service(settings: Settings) -> AsyncIterator[AnswerService]:
    """Migrate the database, open the store, the media fetcher and the engine (the in-process model or an
    inference server, as `engine.backend` says); close them all on exit."""
    log.info("applying database migrations")
    await asyncio.to_thread(migrate, settings.storage)
    async with (
        make_store(settings.storage) as store,
        MediaFetcher(settings.media, settings.storage.resolved_media_dir) as media,
    ):
        engine = create_engine(settings)
        if settings.engine.backend == "server":
            log.info("checking the inference server at %s", settings.server.base_url)
        else:
            log.info("loading model %s", settings.model.name_or_path)
        await engine.start()
        try:
            yield AnswerService(settings, store, media, engine)
        finally:
            await engine.stop()
