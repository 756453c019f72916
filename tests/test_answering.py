"""The answering service end to end on the real stack: SQLite store, media checks, tiny Qwen2.5-VL engine.

The service is wired here as `bot.app` wires it, with two thin wrappers handed to its constructor: the real
engine behind a watcher that records each request (and can hold answers back), and the real media fetcher
signalling each stored file. No test reaches into the service's private attributes.
"""

from __future__ import annotations

import asyncio
import io
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from bot.answering import (
    EMPTY_ANSWER_TEXT,
    STOPPED_NOTE,
    UNSAVED_NOTE,
    AnswerService,
    AttachmentRef,
    Question,
    ThreadOrigin,
    display_text,
)
from bot.app import make_store, migrate, purge_periodically, running_service
from bot.content import ConversationScope, StoredMedia
from bot.engine import Engine, EngineRequest, EngineStats, GenerationResult, RequestHandle, create_engine
from bot.errors import (
    AnswerStopped,
    EmptyQuestion,
    EngineStopped,
    QueueFull,
    TooManyImages,
    UnsupportedMediaType,
)
from bot.media import MediaFetcher
from bot.metrics import Metrics
from bot.settings import Settings
from bot.store import ConversationStore
from tests.engine.media_files import write_mp4
from tests.tiny_settings import tiny_settings

CHANNEL = ConversationScope(platform="discord", guild_id=1, channel_id=10)
OTHER_CHANNEL = ConversationScope(platform="discord", guild_id=1, channel_id=20)
THREAD = ConversationScope(platform="discord", guild_id=1, channel_id=10, thread_id=555)


class WatchedEngine:
    """The real engine, recording each request's messages; while `held` is set, answers wait for it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seen: list[list[dict]] = []
        self.submitted = asyncio.Event()
        self.held: asyncio.Event | None = None

    async def start(self) -> None:
        await self.engine.start()

    def submit(self, request: EngineRequest) -> RequestHandle | HeldHandle:
        self.seen.append(request.messages)
        handle = self.engine.submit(request)
        self.submitted.set()
        return handle if self.held is None else HeldHandle(handle, self.held)

    def count_text_tokens(self, text: str) -> int:
        return self.engine.count_text_tokens(text)

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    async def stop(self, grace: float | None = None) -> None:
        await self.engine.stop(grace)


@dataclass
class HeldHandle:
    """A real request whose result is handed over only once `release` is set."""

    handle: RequestHandle
    release: asyncio.Event

    async def result(self) -> GenerationResult:
        await self.release.wait()
        return await self.handle.result()

    def cancel(self) -> bool:
        return self.handle.cancel()

    def stop(self) -> None:
        self.handle.stop()


class SignallingFetcher(MediaFetcher):
    """The real media fetcher; `stored` is set each time a local file has been stored."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stored = asyncio.Event()

    async def store_file(self, path: Path) -> StoredMedia:
        media = await super().store_file(path)
        self.stored.set()
        return media


@dataclass
class Wiring:
    service: AnswerService
    store: ConversationStore
    media: SignallingFetcher
    engine: WatchedEngine
    metrics: Metrics

    def questions(self, outcome: str, error: str = "") -> float:
        """How many questions ended with `outcome` (and `error`), as the metrics count them."""
        labels = {"outcome": outcome, "error": error}
        return self.metrics.registry.get_sample_value("qwenbot_questions_total", labels) or 0.0


@asynccontextmanager
async def wired(settings: Settings) -> AsyncIterator[Wiring]:
    """The service on the real store, media fetcher and engine, as `bot.app.running_service` makes it."""
    await asyncio.to_thread(migrate, settings.storage)
    metrics = Metrics()
    async with (
        make_store(settings.storage, metrics) as store,
        SignallingFetcher(settings.media, settings.storage.resolved_media_dir, metrics=metrics) as media,
    ):
        engine = WatchedEngine(create_engine(settings))
        await engine.start()
        try:
            service = AnswerService(settings, store, media, engine, metrics=metrics)
            yield Wiring(service, store, media, engine, metrics)
        finally:
            await engine.stop()


@pytest.fixture
async def wiring(tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator[Wiring]:
    async with wired(tiny_settings(tiny_model_dir, tmp_path / "data")) as parts:
        yield parts


@pytest.fixture
def service(wiring: Wiring) -> AnswerService:
    return wiring.service


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (96, 64), (200, 30, 30)).save(path)
    return path


def _image_parts(messages: list[dict]) -> list[str]:
    return [part["image"] for message in messages for part in message["content"] if part["type"] == "image"]


async def test_follow_up_without_image_still_sees_the_image(
    service: AnswerService, wiring: Wiring, photo: Path
) -> None:
    spy = wiring.engine
    first = await service.answer(Question(scope=CHANNEL, text="what is it?", local_files=(photo,)))
    second = await service.answer(Question(scope=CHANNEL, text="and the colour?"))
    assert first.text and second.text and not first.duplicate
    assert first.assistant_message_id is not None and second.assistant_message_id is not None
    assert len(_image_parts(spy.seen[1])) == 1
    assert [message["role"] for message in spy.seen[1]] == ["system", "user", "assistant", "user"]
    # The stored answer is a plain string, never the decoded list the seed appended.
    assert isinstance(spy.seen[1][2]["content"][0]["text"], str)
    assert not spy.seen[1][2]["content"][0]["text"].startswith("[")
    stats = await service.stats(CHANNEL)
    assert (stats.turns, stats.images) == (2, 1)


async def test_bare_image_gets_the_default_question(
    service: AnswerService, wiring: Wiring, photo: Path
) -> None:
    spy = wiring.engine
    await service.answer(Question(scope=CHANNEL, text="  ", local_files=(photo,)))
    assert spy.seen[0][-1]["content"][-1] == {"type": "text", "text": "Describe this image."}


async def test_channels_never_share_history(service: AnswerService, photo: Path) -> None:
    await service.answer(Question(scope=CHANNEL, text="secret", local_files=(photo,)))
    await service.answer(Question(scope=OTHER_CHANNEL, text="hello"))
    assert (await service.stats(CHANNEL)).turns == 1
    other = await service.stats(OTHER_CHANNEL)
    assert (other.turns, other.images) == (1, 0)


async def test_invalid_unicode_is_cleaned_before_the_tokenizer(
    service: AnswerService, wiring: Wiring
) -> None:
    answer = await service.answer(Question(scope=CHANNEL, text="broken \ud83d here"))  # half an emoji
    assert answer.text and answer.assistant_message_id is not None
    asked = wiring.engine.seen[-1][-1]["content"][-1]
    assert asked == {"type": "text", "text": "broken \ufffd here"}
    (stored, _answer) = await wiring.store.load_window(await wiring.store.conversation_for(CHANNEL), 2)
    assert stored.text == "broken \ufffd here"


async def test_empty_question_and_too_many_images_store_nothing(service: AnswerService, photo: Path) -> None:
    with pytest.raises(EmptyQuestion) as empty:
        await service.answer(Question(scope=CHANNEL, text="   "))
    assert "ask me something" in empty.value.user_message
    with pytest.raises(EmptyQuestion):  # only invisible characters: zero-width space, joiner, BOM
        await service.answer(Question(scope=CHANNEL, text=" \u200b\u200d\ufeff "))
    with pytest.raises(TooManyImages) as too_many:
        await service.answer(Question(scope=CHANNEL, text="all", local_files=(photo, photo, photo)))
    assert "up to 2" in too_many.value.user_message
    assert (await service.stats(CHANNEL)).turns == 0


async def test_bad_attachment_stores_nothing(service: AnswerService, tmp_path: Path, photo: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a picture")
    with pytest.raises(UnsupportedMediaType):
        await service.answer(Question(scope=CHANNEL, text="what is it?", local_files=(fake,)))
    with pytest.raises(UnsupportedMediaType):  # one bad attachment among good ones fails the question
        await service.answer(Question(scope=CHANNEL, text="and these?", local_files=(photo, fake)))
    assert (await service.stats(CHANNEL)).turns == 0


async def test_the_same_discord_message_twice_is_answered_once(
    service: AnswerService, wiring: Wiring
) -> None:
    question = Question(scope=CHANNEL, text="hello", discord_message_id=42)
    first, second = await asyncio.gather(service.answer(question), service.answer(question))
    third = await service.answer(question)
    assert sorted([first.duplicate, second.duplicate]) == [False, True]
    assert third.duplicate and third.text == ""
    assert (await service.stats(CHANNEL)).turns == 1
    assert (wiring.questions("answered"), wiring.questions("duplicate")) == (1, 2)


async def test_thread_starts_from_the_parent_conversation_and_continues_alone(
    service: AnswerService, wiring: Wiring, photo: Path
) -> None:
    answer = await service.answer(Question(scope=CHANNEL, text="what is it?", local_files=(photo,)))
    await service.attach_reply(answer, 555)
    await service.answer(Question(scope=CHANNEL, text="later channel question"))
    origin = ThreadOrigin(parent_scope=CHANNEL, starter_message_id=555)
    await service.answer(Question(scope=THREAD, text="tell me more", thread_origin=origin))
    asked = wiring.engine.seen[-1]
    texts = [part.get("text") for message in asked for part in message["content"]]
    assert "what is it?" in texts and "later channel question" not in texts
    assert len(_image_parts(asked)) == 1
    assert (await service.stats(THREAD)).turns == 2
    assert (await service.stats(CHANNEL)).turns == 2


async def test_concurrent_questions_in_one_channel_are_answered_in_order(
    service: AnswerService, wiring: Wiring
) -> None:
    spy = wiring.engine
    positions: list[int] = []
    await asyncio.gather(
        service.answer(Question(scope=CHANNEL, text="first")),
        service.answer(Question(scope=CHANNEL, text="second"), on_queue_position=positions.append),
    )
    # The second question waited for the first answer and saw it in its history.
    assert [m["content"][-1]["text"] for m in spy.seen[1] if m["role"] == "user"] == ["first", "second"]
    assert positions and positions[0] >= 1
    assert (await service.stats(CHANNEL)).turns == 2


async def test_history_survives_a_restart(tiny_model_dir: Path, tmp_path: Path, photo: Path) -> None:
    settings = tiny_settings(tiny_model_dir, tmp_path / "data")
    async with running_service(settings) as first_run:
        await first_run.answer(Question(scope=CHANNEL, text="remember this", local_files=(photo,)))
    async with running_service(settings) as second_run:
        stats = await second_run.stats(CHANNEL)
        assert (stats.turns, stats.images) == (1, 1)
        forgotten = await second_run.reset(CHANNEL)
        assert (forgotten.messages_deleted, forgotten.media_deleted) == (2, 1)
        assert (await second_run.stats(CHANNEL)).turns == 0


async def test_an_answer_the_store_cannot_save_is_still_shown_with_a_note(
    service: AnswerService, wiring: Wiring, tmp_path: Path
) -> None:
    with sqlite3.connect(tmp_path / "data" / "bot.sqlite3") as db:  # writes of turns fail from now on
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    answer = await service.answer(Question(scope=CHANNEL, text="hello"))
    assert answer.text.endswith(UNSAVED_NOTE) and answer.text.removesuffix(UNSAVED_NOTE).strip()
    assert answer.assistant_message_id is None
    assert (await service.stats(CHANNEL)).turns == 0
    assert (wiring.questions("unsaved"), wiring.questions("answered")) == (1, 0)


async def test_engine_failure_stores_nothing(service: AnswerService, wiring: Wiring) -> None:
    await wiring.engine.stop()
    with pytest.raises(EngineStopped) as stopped:
        await service.answer(Question(scope=CHANNEL, text="hello"))
    assert stopped.value.user_message
    assert (await service.stats(CHANNEL)).turns == 0
    assert wiring.questions("failed", "EngineStopped") == 1


async def test_a_question_cancelled_while_generating_is_counted_as_cancelled(
    service: AnswerService, wiring: Wiring
) -> None:
    wiring.engine.held = asyncio.Event()  # the answer never arrives
    asking = asyncio.create_task(service.answer(Question(scope=CHANNEL, text="hello")))
    await wiring.engine.submitted.wait()
    asking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asking
    assert (wiring.questions("cancelled"), wiring.questions("answered")) == (1, 0)


def test_empty_model_output_is_shown_as_a_clear_message() -> None:
    assert display_text("  \n") == EMPTY_ANSWER_TEXT
    assert display_text(" hi ") == "hi"


async def test_periodic_purge_applies_the_retention(service: AnswerService, tmp_path: Path) -> None:
    await service.answer(Question(scope=CHANNEL, text="old news"))
    with sqlite3.connect(tmp_path / "data" / "bot.sqlite3") as db:
        db.execute("UPDATE messages SET created_at = '2000-01-01 00:00:00.000000'")
    await service.answer(Question(scope=CHANNEL, text="fresh"))
    purging = asyncio.create_task(purge_periodically(service, interval=3600))
    try:
        async with asyncio.timeout(10):
            while (await service.stats(CHANNEL)).turns != 1:
                await asyncio.sleep(0.05)
    finally:
        purging.cancel()
    assert (await service.stats(CHANNEL)).turns == 1


@pytest.fixture
async def slow_image_url() -> AsyncIterator[str]:
    """A loopback server whose image arrives after a delay, so a question waits for its download."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "green").save(buffer, format="PNG")

    async def slow_png(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "0.8")))
        return web.Response(body=buffer.getvalue(), content_type="image/png")

    app = web.Application()
    app.router.add_get("/slow.png", slow_png)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/slow.png"))
    finally:
        await server.close()


@pytest.fixture
async def loopback(tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator[Wiring]:
    settings = tiny_settings(
        tiny_model_dir,
        tmp_path / "data",
        media={"allowed_hosts": ["127.0.0.1"], "retries": 0},
        engine={"max_queue_size": 2},
    )
    async with wired(settings) as parts:
        yield parts


@pytest.fixture
def loopback_service(loopback: Wiring) -> AnswerService:
    return loopback.service


def _slow_question(url: str, text: str, message_id: int) -> Question:
    return Question(
        scope=CHANNEL,
        text=text,
        attachments=(AttachmentRef(url=url, filename="slow.png"),),
        discord_message_id=message_id,
    )


async def test_a_slow_download_is_not_overtaken_in_its_conversation(
    loopback_service: AnswerService, loopback: Wiring, slow_image_url: str
) -> None:
    spy = loopback.engine
    first = asyncio.create_task(loopback_service.answer(_slow_question(slow_image_url, "first", 1)))
    await asyncio.sleep(0.2)
    await loopback_service.answer(Question(scope=CHANNEL, text="second", discord_message_id=2))
    await first
    questions = [[m["content"][-1]["text"] for m in seen if m["role"] == "user"] for seen in spy.seen]
    assert questions == [["first"], ["first", "second"]]


async def test_reset_waits_for_the_answer_in_progress(
    loopback_service: AnswerService, slow_image_url: str
) -> None:
    answering = asyncio.create_task(loopback_service.answer(_slow_question(slow_image_url, "q", 1)))
    await asyncio.sleep(0.2)
    forgotten = await loopback_service.reset(CHANNEL)
    assert (await answering).assistant_message_id is not None
    assert forgotten.messages_deleted == 2
    assert (await loopback_service.stats(CHANNEL)).turns == 0


async def test_a_flooded_conversation_is_told_to_retry(
    loopback_service: AnswerService, slow_image_url: str
) -> None:
    waiting = [
        asyncio.create_task(loopback_service.answer(_slow_question(slow_image_url, f"q{i}", i)))
        for i in (1, 2)
    ]
    await asyncio.sleep(0.2)
    with pytest.raises(QueueFull) as full:
        await loopback_service.answer(Question(scope=CHANNEL, text="one too many", discord_message_id=3))
    assert "try again" in full.value.user_message
    await asyncio.gather(*waiting)
    assert (await loopback_service.stats(CHANNEL)).turns == 2


async def test_a_video_is_answered_and_its_follow_up_still_sees_it(
    service: AnswerService, wiring: Wiring, tmp_path: Path
) -> None:
    video = write_mp4(tmp_path / "clip.mp4")
    spy = wiring.engine
    first = await service.answer(Question(scope=CHANNEL, text="", local_files=(video,)))
    await service.answer(Question(scope=CHANNEL, text="what happens next?"))
    assert first.text
    assert spy.seen[0][-1]["content"][-1] == {"type": "text", "text": "Describe this video."}
    videos = [part for message in spy.seen[1] for part in message["content"] if part["type"] == "video"]
    assert len(videos) == 1 and videos[0]["video"].endswith(".mp4")
    stats = await service.stats(CHANNEL)
    assert (stats.turns, stats.images, stats.videos) == (2, 0, 1)


async def test_a_reset_elsewhere_keeps_the_files_of_questions_in_flight(
    service: AnswerService, wiring: Wiring, photo: Path
) -> None:
    await service.answer(Question(scope=CHANNEL, text="what is it?", local_files=(photo,)))
    release = wiring.engine.held = asyncio.Event()
    wiring.engine.submitted.clear()
    # The same picture in another channel: its question is in flight when the first channel is reset.
    in_flight = asyncio.create_task(
        service.answer(Question(scope=OTHER_CHANNEL, text="and here?", local_files=(photo,)))
    )
    await wiring.engine.submitted.wait()
    forgotten = await service.reset(CHANNEL)
    assert forgotten.messages_deleted == 2
    release.set()
    answer = await in_flight
    assert answer.assistant_message_id is not None
    stats = await service.stats(OTHER_CHANNEL)
    assert (stats.turns, stats.images) == (1, 1)
    window = await wiring.store.load_window(await wiring.store.conversation_for(OTHER_CHANNEL), 10)
    (stored,) = window[0].media
    assert stored.path.is_file()


async def test_a_reset_elsewhere_keeps_the_files_of_questions_waiting_for_their_turn(
    service: AnswerService, wiring: Wiring, photo: Path
) -> None:
    await service.answer(Question(scope=CHANNEL, text="what is it?", local_files=(photo,)))
    # An answer in progress in the other channel, held back: the next question there has its picture
    # downloaded (the first channel's file, reused) but waits for its turn while the first channel is reset.
    release = wiring.engine.held = asyncio.Event()
    wiring.engine.submitted.clear()
    in_progress = asyncio.create_task(service.answer(Question(scope=OTHER_CHANNEL, text="first here")))
    await wiring.engine.submitted.wait()
    wiring.media.stored.clear()
    waiting = asyncio.create_task(
        service.answer(Question(scope=OTHER_CHANNEL, text="and here?", local_files=(photo,)))
    )
    await wiring.media.stored.wait()
    forgotten = await service.reset(CHANNEL)
    assert forgotten.messages_deleted == 2
    release.set()
    await in_progress
    answer = await waiting
    assert answer.assistant_message_id is not None
    window = await wiring.store.load_window(await wiring.store.conversation_for(OTHER_CHANNEL), 10)
    (kept,) = window[-2].media
    assert kept.path.is_file()


async def test_stop_while_generating_keeps_and_records_the_text_so_far(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = tiny_settings(tiny_model_dir, tmp_path / "data", generation={"max_new_tokens": 200})
    async with wired(settings) as wiring:
        service = wiring.service
        full = await service.answer(Question(scope=OTHER_CHANNEL, text="tell me a long story"))
        stop = asyncio.Event()
        stopped = await service.answer(
            Question(scope=CHANNEL, text="tell me a long story"), on_text=lambda _delta: stop.set(), stop=stop
        )
        assert stopped.stopped and stopped.text.endswith(STOPPED_NOTE)
        partial = stopped.text.removesuffix(STOPPED_NOTE)
        assert partial and full.text.startswith(partial) and len(partial) < len(full.text)
        assert stopped.assistant_message_id is not None
        await service.answer(Question(scope=CHANNEL, text="go on"))
        assert wiring.engine.seen[-1][2]["content"][0]["text"] == partial, "a follow-up sees the text so far"
        assert wiring.questions("stopped") == 1 and wiring.questions("answered") == 2


async def test_stop_before_generation_ends_the_wait_and_stores_nothing(
    service: AnswerService, wiring: Wiring
) -> None:
    release = wiring.engine.held = asyncio.Event()
    wiring.engine.submitted.clear()
    first = asyncio.create_task(service.answer(Question(scope=CHANNEL, text="first")))
    await wiring.engine.submitted.wait()
    stop = asyncio.Event()
    waiting = asyncio.create_task(service.answer(Question(scope=CHANNEL, text="second"), stop=stop))
    await asyncio.sleep(0.05)
    stop.set()
    with pytest.raises(AnswerStopped):
        await asyncio.wait_for(waiting, timeout=5)  # at once: it does not wait for the first answer
    assert not first.done()
    release.set()
    await first
    stats = await service.stats(CHANNEL)
    assert stats.turns == 1
    assert wiring.questions("stopped", "") == 1


@asynccontextmanager
async def locked_later(settings: Settings) -> AsyncIterator[tuple[Wiring, sqlite3.Connection]]:
    """The service, and another connection to its database: `BEGIN IMMEDIATE` there holds the write lock, as
    another process writing for long would (rolled back at the end)."""
    async with wired(settings) as parts:
        holder = sqlite3.connect(settings.storage.data_dir / "bot.sqlite3", isolation_level=None)
        try:
            yield parts, holder
        finally:
            if holder.in_transaction:
                holder.execute("ROLLBACK")
            holder.close()


def _busy_settings(tiny_model_dir: Path, tmp_path: Path, retry_seconds: float) -> Settings:
    storage = {"sqlite_busy_timeout_ms": 50, "write_retry_seconds": retry_seconds}
    return tiny_settings(tiny_model_dir, tmp_path / "data", storage=storage)


def _user_texts(messages: list[dict]) -> list[str]:
    return [m["content"][-1]["text"] for m in messages if m["role"] == "user"]


async def test_a_locked_database_keeps_the_answer_and_stores_it_in_order_once_free(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with locked_later(_busy_settings(tiny_model_dir, tmp_path, retry_seconds=60)) as (parts, lock):
        service, spy = parts.service, parts.engine
        # Both conversations exist before the lock: creating one is a write too.
        await service.answer(Question(scope=CHANNEL, text="hello"))
        await service.answer(Question(scope=OTHER_CHANNEL, text="hello there"))
        lock.execute("BEGIN IMMEDIATE")

        first = await service.answer(Question(scope=CHANNEL, text="first while locked", discord_message_id=7))
        assert first.text and UNSAVED_NOTE not in first.text and first.assistant_message_id is None
        assert first.recording is not None and not first.recording.done()
        follow_up = asyncio.create_task(service.answer(Question(scope=CHANNEL, text="second while locked")))
        again = await service.answer(Question(scope=CHANNEL, text="first while locked", discord_message_id=7))
        assert again.duplicate, "a redelivery while the write is retried is not answered twice"
        # Another channel is answered meanwhile, well within the time the lock is held.
        asked_elsewhere = service.answer(Question(scope=OTHER_CHANNEL, text="and here?"))
        elsewhere = await asyncio.wait_for(asked_elsewhere, 30)
        assert elsewhere.text and elsewhere.recording is not None
        assert not follow_up.done(), "the next question in the channel waits for the earlier write"
        assert _user_texts(spy.seen[-1]) == ["hello there", "and here?"]
        lock.execute("ROLLBACK")

        second = await asyncio.wait_for(follow_up, 30)
        assert await first.stored_id() is not None and await second.stored_id() is not None
        assert await elsewhere.stored_id() is not None
        # The follow-up was generated after the first turn was stored, and saw it.
        assert _user_texts(spy.seen[-1]) == ["hello", "first while locked", "second while locked"]
        window = await parts.store.load_window(await parts.store.conversation_for(CHANNEL), 10)
        assert [m.text for m in window if m.role == "user"] == _user_texts(spy.seen[-1])
        assert (await service.stats(OTHER_CHANNEL)).turns == 2
        assert (parts.questions("answered"), parts.questions("unsaved")) == (5, 0)
        retries = parts.metrics.registry.get_sample_value("qwenbot_store_write_retries_total")
        assert retries is not None and retries >= 2


async def test_a_lock_held_past_the_retry_window_ends_with_the_note_and_nothing_half_written(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with locked_later(_busy_settings(tiny_model_dir, tmp_path, retry_seconds=0.5)) as (parts, lock):
        service = parts.service
        await service.answer(Question(scope=CHANNEL, text="hello"))
        lock.execute("BEGIN IMMEDIATE")
        answer = await service.answer(Question(scope=CHANNEL, text="never stored"))
        assert answer.recording is not None
        assert await asyncio.wait_for(answer.stored_id(), 10) is None
        lock.execute("ROLLBACK")
        rows = lock.execute("SELECT role FROM messages ORDER BY position").fetchall()
        assert rows == [("user",), ("assistant",)], "no question without its answer"
        later = await service.answer(Question(scope=CHANNEL, text="after"))
        assert "never stored" not in _user_texts(parts.engine.seen[-1])
        assert await later.stored_id() is not None
        assert (parts.questions("answered"), parts.questions("unsaved")) == (2, 1)
