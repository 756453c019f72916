"""One question → one answer, the same for Discord and the terminal.

The flow is one way: validate the question → find (or fork) its conversation → download its media → load the
history window → build the Qwen `messages` → generate on the engine → record the whole turn atomically.
Failures raise `bot.errors.BotError` subclasses whose `user_message` the caller shows; nothing is stored
unless the answer is complete.

A turn the database refuses for a passing reason (locked by another process, busy, connection lost) does not
cost the answer: it is returned at once with `Answer.recording` set, and the write is retried in the
background for `storage.write_retry_seconds`. Writes stay in order per conversation: the conversation's next
question (and a reset) waits for that write before it loads the history, so it sees the turn when it was
stored. Only when the retries give up does the caller add `UNSAVED_NOTE` to the answer it shows.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import unicodedata
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from bot.content import ChatMessage, ConversationScope, MediaPart, StoredMedia, TextPart
from bot.conversation import build_messages
from bot.engine import Engine, EngineRequest, RequestHandle
from bot.errors import AnswerStopped, EmptyQuestion, QueueFull, StoreError, TooManyImages
from bot.media import MediaFetcher
from bot.metrics import Metrics
from bot.settings import Settings
from bot.store import (
    ConversationStats,
    ConversationStore,
    FinalStatus,
    ForgetResult,
    NewQuestion,
    NewTurn,
    PurgeResult,
    UnfinishedQuestion,
)

log = logging.getLogger("bot.answering")

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a str holds surrogates only when they are unpaired

DEFAULT_IMAGE_QUESTION = "Describe this image."
DEFAULT_VIDEO_QUESTION = "Describe this video."
UNSAVED_NOTE = "\n\n-# ⚠️ I couldn't save this turn, so I won't remember it in follow-ups."
STOPPED_NOTE = "\n\n-# ⏹️ Stopped."
EMPTY_ANSWER_TEXT = (
    "(The model returned an empty answer. Try rephrasing the question, or /reset if the conversation "
    "has gone off track.)"
)


@dataclass(frozen=True, slots=True)
class AttachmentRef:
    """An attachment to download: Discord's CDN URL and what Discord announced about it."""

    url: str
    filename: str
    size: int | None = None
    content_type: str | None = None


@dataclass(frozen=True, slots=True)
class ThreadOrigin:
    """Where a thread came from: its parent channel's scope and the message it was started from."""

    parent_scope: ConversationScope
    starter_message_id: int | None


@dataclass(frozen=True, slots=True)
class Question:
    """A user's question, as the Discord layer (or the CLI) hands it over."""

    scope: ConversationScope
    text: str
    attachments: tuple[AttachmentRef, ...] = ()
    local_files: tuple[Path, ...] = ()
    discord_message_id: int | None = None
    thread_origin: ThreadOrigin | None = None
    durable_id: int | None = None  # the kept question (`AnswerService.keep`) its answer completes


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer to show (never empty) and where it was recorded.

    `recording` is set when the turn's first write failed for a passing reason and is being retried: it ends
    with the answer's message id once stored, or None when the store gave up (show `with_unsaved_note`).
    """

    text: str
    assistant_message_id: int | None  # None: a duplicate, a turn not stored, or one still being retried
    duplicate: bool = False
    stopped: bool = False  # ended early by `stop`: the text so far, recorded as the turn
    recording: asyncio.Task[int | None] | None = None

    async def stored_id(self) -> int | None:
        """The stored answer's message id, once any retried write has ended; None when it was not stored.

        Cancelling the caller leaves the write going on.
        """
        if self.recording is None:
            return self.assistant_message_id
        await asyncio.wait({self.recording})
        return _recorded_id(self.recording)


def _recorded_id(recording: asyncio.Task[int | None]) -> int | None:
    """A finished retried write's message id; None when it gave up, failed otherwise or was cancelled."""
    if recording.cancelled() or recording.exception() is not None:
        return None
    return recording.result()


def with_unsaved_note(text: str) -> str:
    """An answer's text with the note that its turn could not be saved."""
    return text + UNSAVED_NOTE


@dataclass(slots=True)
class _Listeners:
    """What follows one question: the caller's callbacks, and the engine's handle once it is submitted."""

    on_text: Callable[[str], None] | None
    on_queue_position: Callable[[int], None] | None
    handle: RequestHandle | None = None
    stopped_waiting: bool = False  # Stop came before generation: the waiting task was cancelled for it


async def _route_stop(stop: asyncio.Event, listeners: _Listeners, task: asyncio.Task[object]) -> None:
    """Once `stop` is set: end the generation at its next step, or, before it started, the wait for it."""
    await stop.wait()
    if listeners.handle is not None:
        listeners.handle.stop()
    else:
        listeners.stopped_waiting = True
        task.cancel()


class _KeyedLocks:
    """One asyncio lock per conversation, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    def waiting(self, key: str) -> int:
        """How many callers hold or wait for `key`'s lock."""
        entry = self._locks.get(key)
        return entry[1][0] if entry else 0

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]


class AnswerService:
    """Answers questions in conversations; owns no resources, only wires store, media and engine.

    `metrics` counts every question by outcome, with its time to first text and to the whole answer.
    """

    def __init__(
        self,
        settings: Settings,
        store: ConversationStore,
        media: MediaFetcher,
        engine: Engine,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._media = media
        self._engine = engine
        self._metrics = metrics or Metrics()
        self._conversation_locks = _KeyedLocks()
        # conversation key → the write of its last turn, still being retried (see `_record_later`)
        self._pending_writes: dict[str, asyncio.Task[int | None]] = {}
        self._in_flight: set[tuple[str, int]] = set()
        # sha256 → questions in flight holding that media file (a reset elsewhere must not delete it).
        self._held_media: Counter[str] = Counter()
        # Names this process as the owner of the questions it keeps: after a restart, the new process
        # finds the old one's unfinished questions by their other owner.
        self.instance = uuid.uuid4().hex

    async def answer(
        self,
        question: Question,
        *,
        on_text: Callable[[str], None] | None = None,
        on_queue_position: Callable[[int], None] | None = None,
        stop: asyncio.Event | None = None,
    ) -> Answer:
        """Answer `question` in its conversation and record the turn; raise BotError subclasses on failure.

        Setting `stop` ends the answer at the model's next step: the text so far is recorded as the turn and
        returned marked as stopped (AnswerStopped when nothing was written yet).
        """
        started = time.monotonic()
        try:
            listeners = _Listeners(self._timing_first_text(on_text, started), on_queue_position)
            answer = await self._answer_once(question, listeners, stop)
        except asyncio.CancelledError:
            self._metrics.question_finished("cancelled")
            raise
        except AnswerStopped:
            self._metrics.question_finished("stopped")
            raise
        except Exception as exc:
            self._metrics.question_finished("failed", exc)
            raise
        if answer.duplicate:
            self._metrics.question_finished("duplicate")
            return answer
        self._metrics.answered(time.monotonic() - started)
        if answer.recording is None:
            self._metrics.question_finished(_outcome(answer, stored=answer.assistant_message_id is not None))
        else:
            answer.recording.add_done_callback(
                lambda done: self._metrics.question_finished(
                    _outcome(answer, stored=_recorded_id(done) is not None)
                )
            )
        return answer

    def _timing_first_text(
        self, on_text: Callable[[str], None] | None, started: float
    ) -> Callable[[str], None] | None:
        """`on_text`, noting in the metrics when the first piece of text arrives."""
        if on_text is None:
            return None
        first = True

        def timed(delta: str) -> None:
            nonlocal first
            if first:
                first = False
                self._metrics.first_text(time.monotonic() - started)
            on_text(delta)

        return timed

    async def _answer_once(
        self, question: Question, listeners: _Listeners, stop: asyncio.Event | None
    ) -> Answer:
        """`answer`, with a question already in flight (the same Discord message) answered as a duplicate."""
        self.check(question)
        in_flight_key = (question.scope.key, question.discord_message_id or 0)
        if question.discord_message_id is not None:
            if in_flight_key in self._in_flight:
                return Answer(text="", assistant_message_id=None, duplicate=True)
            self._in_flight.add(in_flight_key)
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(_route_stop(stop, listeners, task)) if stop is not None else None
        recording: asyncio.Task[int | None] | None = None
        try:
            answer = await self._answer(question, listeners)
            recording = answer.recording
            return answer
        except asyncio.CancelledError:
            if not listeners.stopped_waiting:
                raise
            task.uncancel()
            raise AnswerStopped("stopped while waiting") from None
        finally:
            if watcher is not None:
                watcher.cancel()
            if recording is None:
                self._in_flight.discard(in_flight_key)
            else:  # Discord delivering the question again meanwhile must not find it unrecorded
                recording.add_done_callback(lambda _: self._in_flight.discard(in_flight_key))

    async def _answer(self, question: Question, listeners: _Listeners) -> Answer:
        conversation_id = await self._conversation_id(question)
        if question.discord_message_id is not None and await self._store.is_recorded(
            conversation_id, question.discord_message_id
        ):
            return Answer(text="", assistant_message_id=None, duplicate=True)

        key = question.scope.key
        waiting = self._conversation_locks.waiting(key)
        if waiting >= self._settings.engine.max_queue_size:
            raise QueueFull(f"{waiting} questions already wait in {key}")
        # The downloads start now but are awaited only once this question has its turn in the conversation,
        # so a question whose images download slowly is never overtaken by a later one.
        held: list[str] = []
        downloads = asyncio.ensure_future(self._download(question, held))
        recording: asyncio.Task[int | None] | None = None
        try:
            if waiting and listeners.on_queue_position is not None:
                listeners.on_queue_position(waiting)
            async with self._conversation_locks.hold(key):
                media = await downloads
                if question.durable_id is not None and media:
                    await self._note_media(question.durable_id, media)
                await self._pending_write(key)
                answer = await self._generate_and_record(
                    question, conversation_id, _user_message(question, media), listeners
                )
                recording = answer.recording
                return answer
        finally:
            if not downloads.done():
                downloads.cancel()
            elif not downloads.cancelled():
                downloads.exception()  # retrieved: a failure raised above is not reported twice
            if recording is None:
                self._release(held)
            else:  # the files stay held until their turn is recorded or given up
                recording.add_done_callback(lambda _: self._release(held))

    async def _note_media(self, durable_id: int, media: list[StoredMedia]) -> None:
        """Remember the kept question's downloaded files: a restart answers it from them."""
        try:
            await self._store.note_media(durable_id, [item.path for item in media])
        except StoreError as exc:  # a restart downloads them again
            log.warning("could not note the media of question %s: %r", durable_id, exc)

    async def _hold(self, stored: Awaitable[StoredMedia], held: list[str]) -> StoredMedia:
        """`stored`'s media, marked as used by a question in flight (see `_release`) as soon as it is stored.

        From then until the question ends, a reset or purge elsewhere leaves its file on disk, also while the
        question still waits for its turn in the conversation.
        """
        media = await stored
        self._held_media[media.sha256] += 1
        held.append(media.sha256)
        return media

    def _release(self, held: list[str]) -> None:
        """Undo `_hold` for the hashes in `held`."""
        self._held_media.subtract(held)
        for sha256 in held:
            if self._held_media[sha256] <= 0:
                del self._held_media[sha256]
        held.clear()

    async def _download(self, question: Question, held: list[str]) -> list[StoredMedia]:
        """Every attachment of `question`, stored and held (see `_hold`); the first failure is raised."""
        # Every download runs to its end (none is left unobserved); the first failure is the one reported.
        outcomes = await asyncio.gather(
            *(self._hold(self._media.store_file(path), held) for path in question.local_files),
            *(
                self._hold(
                    self._media.fetch(ref.url, announced_size=ref.size, announced_type=ref.content_type), held
                )
                for ref in question.attachments
            ),
            return_exceptions=True,
        )
        media = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            media.append(outcome)
        return media

    async def _generate_and_record(
        self,
        question: Question,
        conversation_id: int,
        user_message: ChatMessage,
        listeners: _Listeners,
    ) -> Answer:
        """Load the window, generate and record the turn; the caller holds the conversation's lock."""
        key = question.scope.key
        history = await self._store.load_window(
            conversation_id, max_messages=2 * self._settings.history.max_turns
        )
        messages = build_messages(
            history,
            user_message,
            vision=self._settings.vision,
            history_settings=self._settings.history,
            generation=self._settings.generation,
            count_text_tokens=self._engine.count_text_tokens,
        )
        handle = self._engine.submit(
            EngineRequest(
                messages=messages,
                conversation_key=key,
                on_text=listeners.on_text,
                on_queue_position=listeners.on_queue_position,
            )
        )
        listeners.handle = handle
        try:
            result = await handle.result()
        except asyncio.CancelledError:
            handle.cancel()
            raise
        self._metrics.tokens_generated(result.completion_tokens)
        if result.stopped and not has_visible_text(result.text):
            raise AnswerStopped("stopped before any text")
        shown = display_text(result.text) + (STOPPED_NOTE if result.stopped else "")
        turn = NewTurn(
            user_message,
            result.text,
            question_discord_id=question.discord_message_id,
            question_id=question.durable_id,
        )
        try:
            recorded = await self._store.record_turn(conversation_id, turn)
        except StoreError as exc:  # the answer is written: show it, and say if it will not be remembered
            retry_seconds = self._settings.storage.write_retry_seconds
            if not exc.transient or retry_seconds <= 0:
                log.error("could not store the answer in %s: %s", key, exc)
                return Answer(
                    text=with_unsaved_note(shown), assistant_message_id=None, stopped=result.stopped
                )
            log.warning("could not store the answer in %s yet, retrying for %gs: %s", key, retry_seconds, exc)
            recording = asyncio.create_task(self._record_later(key, conversation_id, turn))
            self._pending_writes[key] = recording
            return Answer(text=shown, assistant_message_id=None, stopped=result.stopped, recording=recording)
        if not recorded.duplicate:  # else another process stored it first, and this answer is dropped
            log.info(
                "answered in %s: %d prompt tokens, %d new tokens, %.2fs queued, %.2fs generating",
                key,
                result.prompt_tokens,
                result.completion_tokens,
                result.queue_seconds,
                result.generate_seconds,
            )
        return Answer(
            text=shown,
            assistant_message_id=recorded.assistant_message_id,
            duplicate=recorded.duplicate,
            stopped=result.stopped,
        )

    async def _record_later(self, key: str, conversation_id: int, turn: NewTurn) -> int | None:
        """Retry a turn's write; its answer's message id, or None when the store gave up."""
        try:
            recorded = await self._store.retry_record_turn(
                conversation_id, turn, within=self._settings.storage.write_retry_seconds
            )
        except StoreError as exc:
            log.error("gave up storing the answer in %s: %s", key, exc)
            return None
        finally:
            if self._pending_writes.get(key) is asyncio.current_task():
                del self._pending_writes[key]
        log.info("stored the answer in %s after retrying", key)
        return recorded.assistant_message_id

    async def _pending_write(self, key: str) -> None:
        """Wait for the retried write of the conversation's last turn, if any (the caller holds its lock)."""
        pending = self._pending_writes.get(key)
        if pending is not None:
            await asyncio.wait({pending})

    async def finish_writes(self) -> None:
        """Wait for the retried writes to end (each within `storage.write_retry_seconds`); call it before the
        store closes."""
        pending = set(self._pending_writes.values())
        if pending:
            log.info("waiting for %d answers to be stored", len(pending))
            await asyncio.wait(pending)

    def check(self, question: Question) -> None:
        """Raise the InputError `question` would meet, before any work is done for it."""
        media_count = len(question.attachments) + len(question.local_files)
        if not has_visible_text(question.text) and media_count == 0:
            raise EmptyQuestion()
        limit = self._settings.vision.max_images_per_message
        if media_count > limit:
            raise TooManyImages(f"{media_count} attachments", limit=limit)

    async def _conversation_id(self, question: Question) -> int:
        existing = await self._store.find_conversation(question.scope)
        if existing is not None:
            return existing
        origin = question.thread_origin
        if origin is not None:
            parent = await self._store.find_conversation(origin.parent_scope)
            if parent is not None:
                return await self._store.fork_thread(
                    parent,
                    origin.starter_message_id,
                    question.scope,
                    max_messages=2 * self._settings.history.max_turns,
                )
        return await self._store.conversation_for(question.scope)

    async def keep(self, question: Question, asked: NewQuestion) -> int | None:
        """Keep `question` until it is finished, so a restart can answer it again; its durable id, or None
        when the same message is already answered or kept (a re-delivery: answer nothing)."""
        conversation_id = await self._conversation_id(question)
        return await self._store.accept_question(conversation_id, asked, owner=self.instance)

    async def note_reply(self, durable_id: int, discord_message_id: int) -> None:
        """Remember a Discord message that shows the kept question's answer."""
        await self._store.note_reply(durable_id, discord_message_id)

    async def finish_kept(self, durable_id: int, status: FinalStatus) -> None:
        """End a kept question: its answer is shown in full, or it got a sentence instead."""
        await self._store.finish_question(durable_id, status)

    async def unfinished(self) -> list[UnfinishedQuestion]:
        """Kept questions that earlier (or other) processes did not finish, oldest first."""
        return await self._store.unfinished_questions(not_owner=self.instance)

    async def claim(self, unfinished: UnfinishedQuestion) -> bool:
        """Take over an unfinished question; False when another process took it first."""
        return await self._store.claim_question(
            unfinished.id, from_owner=unfinished.owner, owner=self.instance
        )

    async def attach_reply(self, answer: Answer, discord_message_id: int) -> None:
        """Remember which Discord message carries `answer`, so threads started from it find their context
        (once a retried write has stored it)."""
        assistant_message_id = await answer.stored_id()
        if assistant_message_id is not None:
            await self._store.set_answer_discord_id(assistant_message_id, discord_message_id)

    async def reset(self, scope: ConversationScope) -> ForgetResult:
        """Forget the conversation of `scope` (its messages and media no one else uses).

        Waits for the answer in progress there, so that answer cannot be recorded after the reset.
        """
        async with self._conversation_locks.hold(scope.key):
            await self._pending_write(scope.key)
            conversation_id = await self._store.find_conversation(scope)
            if conversation_id is None:
                return ForgetResult(messages_deleted=0, media_deleted=0)
            return await self._store.forget(conversation_id, keep_files=frozenset(self._held_media))

    async def stats(self, scope: ConversationScope) -> ConversationStats:
        """How many turns and images the conversation of `scope` holds."""
        conversation_id = await self._store.find_conversation(scope)
        if conversation_id is None:
            return ConversationStats(turns=0, images=0)
        return await self._store.stats(conversation_id)

    async def has_conversation(self, scope: ConversationScope) -> bool:
        """Whether the bot already talks in `scope` (used for threads answered without a mention)."""
        return await self._store.find_conversation(scope) is not None

    async def purge_expired(self) -> PurgeResult:
        """Delete turns older than the configured retention (if any) and media files nothing uses."""
        return await self._store.purge_older_than(
            self._settings.history.retention, keep_files=frozenset(self._held_media)
        )


def _outcome(answer: Answer, *, stored: bool) -> str:
    """How the metrics count a question that got `answer`."""
    if not stored:
        return "unsaved"
    return "stopped" if answer.stopped else "answered"


def display_text(model_output: str) -> str:
    """What to show for a model's answer: Discord rejects empty messages, so say what happened."""
    return model_output.strip() or EMPTY_ANSWER_TEXT


def clean_text(text: str) -> str:
    """`text` as the model may take it: lone surrogates (invalid Unicode: the tokenizer refuses them)
    replaced by U+FFFD, surrounding whitespace removed."""
    return _LONE_SURROGATE.sub("\ufffd", text).strip()


def has_visible_text(text: str) -> bool:
    """Whether `text` holds more than whitespace and invisible format characters (zero-width spaces and
    joiners, BOM): something that could be read as a question."""
    return any(not char.isspace() and unicodedata.category(char) != "Cf" for char in text)


def _user_message(question: Question, media: list[StoredMedia]) -> ChatMessage:
    text = clean_text(question.text) if has_visible_text(question.text) else ""
    if not text:
        only_video = all(item.kind == "video" for item in media)
        text = DEFAULT_VIDEO_QUESTION if only_video else DEFAULT_IMAGE_QUESTION
    parts: list[MediaPart | TextPart] = [MediaPart(item) for item in media]
    parts.append(TextPart(text))
    return ChatMessage(role="user", parts=tuple(parts))
