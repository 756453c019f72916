"""`ConversationStore`: the async face of the conversation database.

Every call runs on one dedicated thread (a single-worker executor) with a sync session, so the event loop
never waits on disk and SQLite writes are serialized. Methods return plain data from `bot.content` or
`bot.store.results`.
Database failures come out as `StoreError` (and are counted in `bot.metrics`), marked `transient` when a
retry may succeed; an unknown conversation id as `LookupError`. `retry_record_turn` retries a turn's write
from the event loop, each try holding the database thread only briefly.
`open()` does not migrate: run `bot.store.database.upgrade` first.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from bot.content import ChatMessage, ConversationScope
from bot.errors import StoreError
from bot.metrics import Metrics
from bot.store.database import create_engine_for, is_transient
from bot.store.results import (
    ConversationStats,
    FinalStatus,
    ForgetResult,
    NewQuestion,
    NewTurn,
    PurgeResult,
    RecordedTurn,
    UnfinishedQuestion,
)
from bot.store.sync_store import SyncStore

T = TypeVar("T")
DEFAULT_ORPHAN_GRACE = timedelta(hours=1)
READINESS_TIMEOUT_SECONDS = 2.0
RETRY_LOCK_WAIT_MS = 200  # a retried write waits this long for a lock: the thread serves others between tries
FIRST_RETRY_DELAY_SECONDS = 0.1
MAX_RETRY_DELAY_SECONDS = 2.0


class ConversationStore:
    """Conversations, their messages and media, behind an async API."""

    def __init__(
        self,
        database_url: str,
        media_dir: Path,
        *,
        busy_timeout_ms: int = 5000,
        metrics: Metrics | None = None,
    ) -> None:
        self._database_url = database_url
        self._media_dir = Path(media_dir)
        self._busy_timeout_ms = busy_timeout_ms
        self._metrics = metrics or Metrics()
        self._executor: ThreadPoolExecutor | None = None
        self._engine: Engine | None = None
        self._store: SyncStore | None = None

    async def open(self) -> None:
        """Start the database thread and connect (idempotent). The schema must already be migrated."""
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conversation-store")
        try:
            self._engine = await self._call(
                functools.partial(
                    create_engine_for, self._database_url, busy_timeout_ms=self._busy_timeout_ms
                )
            )
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._store = SyncStore(self._engine, self._media_dir)

    async def close(self) -> None:
        """Close the connections and stop the database thread (idempotent)."""
        if self._executor is None:
            return
        try:
            if self._engine is not None:
                await self._call(self._engine.dispose)
        finally:
            self._executor.shutdown(wait=False)  # nothing is queued behind the dispose that just finished
            self._executor = None
            self._engine = None
            self._store = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def readiness(self, timeout: float = READINESS_TIMEOUT_SECONDS) -> str | None:
        """None when the database answers `SELECT 1` within `timeout` seconds, else why not.

        The query waits its turn on the database thread like any operation, so a stuck thread shows too.
        """
        if self._store is None:
            return "the database is closed"
        try:
            async with asyncio.timeout(timeout):
                await self._run(lambda store: store.ping())
        except TimeoutError:
            return f"the database did not answer within {timeout:g}s"
        except StoreError as exc:
            return f"the database failed ({type(exc.__cause__).__name__})"
        return None

    async def conversation_for(self, scope: ConversationScope) -> int:
        """The id of the scope's conversation, created on first use."""
        return await self._run(lambda store: store.conversation_for(scope))

    async def find_conversation(self, scope: ConversationScope) -> int | None:
        """The id of the scope's conversation, or None when it has none yet."""
        return await self._run(lambda store: store.find_conversation(scope))

    async def is_recorded(self, conversation_id: int, discord_message_id: int) -> bool:
        """Whether a message with this Discord id is stored in the conversation."""
        return await self._run(lambda store: store.is_recorded(conversation_id, discord_message_id))

    async def record_turn(self, conversation_id: int, turn: NewTurn) -> RecordedTurn:
        """Store a question, its media and its answer in one transaction; a repeated question adds nothing."""
        return await self._run(lambda store: store.record_turn(conversation_id, turn))

    async def retry_record_turn(self, conversation_id: int, turn: NewTurn, *, within: float) -> RecordedTurn:
        """`record_turn` again, after it failed with a transient `StoreError`, for up to `within` seconds.

        Tries wait 0.1 s, then twice as long each time up to 2 s; each waits at most `RETRY_LOCK_WAIT_MS`
        for another connection's lock (SQLite), so a lock held for long never holds the database thread for
        long. A turn stored by an attempt that reported a failure comes back as a duplicate. Raises the last
        `StoreError` when the time is up or the failure is not transient; every retry is counted.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        delay = FIRST_RETRY_DELAY_SECONDS
        lock_wait_ms = min(RETRY_LOCK_WAIT_MS, self._busy_timeout_ms)
        while True:
            await asyncio.sleep(max(0.0, min(delay, deadline - loop.time())))
            self._metrics.store_write_retried()
            try:
                return await self._run(lambda store: store.record_turn(conversation_id, turn, lock_wait_ms))
            except StoreError as exc:
                if not exc.transient or loop.time() >= deadline:
                    raise
            delay = min(2 * delay, MAX_RETRY_DELAY_SECONDS)

    async def accept_question(self, conversation_id: int, question: NewQuestion, *, owner: str) -> int | None:
        """Keep `question` as pending, answered by `owner` (a process); its id, or None when the same Discord
        message is already recorded or kept (a re-delivery: answer nothing)."""
        return await self._run(lambda store: store.accept_question(conversation_id, question, owner))

    async def note_reply(self, question_id: int, discord_message_id: int) -> None:
        """Remember a Discord message showing the answer (a restart edits it rather than adding one)."""
        await self._run(lambda store: store.note_reply(question_id, discord_message_id))

    async def note_media(self, question_id: int, paths: Sequence[Path]) -> None:
        """Remember where the question's attachments are stored: a restart need not download them again."""
        await self._run(lambda store: store.note_media(question_id, paths))

    async def finish_question(self, question_id: int, status: FinalStatus) -> None:
        """End a kept question: an answered one once its answer is shown in full (`shown`), a pending one
        refused with a sentence (`failed`) or given up after a restart (`expired`).

        A question is marked answered by `record_turn` (`NewTurn.question_id`), in the turn's transaction.
        """
        await self._run(lambda store: store.finish_question(question_id, status))

    async def unfinished_questions(self, *, not_owner: str) -> list[UnfinishedQuestion]:
        """Questions another (earlier or other) process owns and did not finish, oldest first: pending ones,
        and answered ones whose answer was not shown in full (with `answer_text`)."""
        return await self._run(lambda store: store.unfinished_questions(not_owner))

    async def claim_question(self, question_id: int, *, from_owner: str, owner: str) -> bool:
        """Make `owner` answer a pending question `from_owner` owned; False if it is no longer theirs."""
        return await self._run(lambda store: store.claim_question(question_id, from_owner, owner))

    async def set_answer_discord_id(self, assistant_message_id: int, discord_message_id: int) -> bool:
        """Attach the Discord id of a sent answer; False when the message is gone (forgotten meanwhile)."""
        return await self._run(
            lambda store: store.set_answer_discord_id(assistant_message_id, discord_message_id)
        )

    async def load_window(self, conversation_id: int, max_messages: int) -> list[ChatMessage]:
        """The newest whole turns, at most `max_messages` messages, oldest first (O(window))."""
        return await self._run(lambda store: store.load_window(conversation_id, max_messages))

    async def fork_thread(
        self,
        parent_conversation_id: int,
        from_discord_message_id: int | None,
        thread_scope: ConversationScope,
        *,
        max_messages: int,
    ) -> int:
        """The thread's conversation, created as a copy of the parent's history up to the forking turn.

        The copy ends with the turn holding `from_discord_message_id` (the whole history when None or not
        found) and keeps at most `max_messages` of the newest whole turns. An existing thread is returned
        untouched.
        """
        return await self._run(
            lambda store: store.fork_thread(
                parent_conversation_id, from_discord_message_id, thread_scope, max_messages
            )
        )

    async def forget(self, conversation_id: int, *, keep_files: Collection[str] = ()) -> ForgetResult:
        """Delete the conversation's messages, then media files nothing else uses; the scope stays usable.

        Files whose sha256 is in `keep_files` (held by questions in flight) stay on disk.
        """
        return await self._run(lambda store: store.forget(conversation_id, keep_files))

    async def purge_older_than(
        self,
        days: int | None,
        *,
        orphan_grace: timedelta = DEFAULT_ORPHAN_GRACE,
        keep_files: Collection[str] = (),
    ) -> PurgeResult:
        """Delete turns older than `days` days (none when `days` is None) and media nothing uses anymore.

        Files under the media dir without a media row (stored for a question that then failed) go too, once
        their mtime is older than `orphan_grace`: a question in flight records its file well within it.
        Files whose sha256 is in `keep_files` (held by questions in flight) stay on disk.
        """
        return await self._run(lambda store: store.purge_older_than(days, orphan_grace, keep_files))

    async def stats(self, conversation_id: int) -> ConversationStats:
        """How many turns, images and videos the conversation holds."""
        return await self._run(lambda store: store.stats(conversation_id))

    async def _run(self, operation: Callable[[SyncStore], T]) -> T:
        if self._store is None:
            raise RuntimeError("the conversation store is not open")
        return await self._call(functools.partial(operation, self._store))

    async def _call(self, function: Callable[[], T]) -> T:
        if self._executor is None:
            raise RuntimeError("the conversation store is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, function)
        except SQLAlchemyError as exc:
            self._metrics.store_failed(exc)
            raise StoreError(f"database operation failed: {exc}", transient=is_transient(exc)) from exc
