"""The answering service end to end on the real stack: SQLite store, media checks, tiny Qwen2.5-VL engine."""

from __future__ import annotations

import asyncio
import io
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from bot.answering import (
    EMPTY_ANSWER_TEXT,
    AnswerService,
    AttachmentRef,
    Question,
    ThreadOrigin,
    display_text,
)
from bot.app import purge_periodically, running_service
from bot.content import ConversationScope
from bot.engine import EngineRequest, GenerationResult, RequestHandle
from bot.errors import EmptyQuestion, EngineStopped, QueueFull, TooManyImages, UnsupportedMediaType
from tests.engine.media_files import write_mp4
from tests.tiny_settings import tiny_settings

CHANNEL = ConversationScope(platform="discord", guild_id=1, channel_id=10)
OTHER_CHANNEL = ConversationScope(platform="discord", guild_id=1, channel_id=20)
THREAD = ConversationScope(platform="discord", guild_id=1, channel_id=10, thread_id=555)


@pytest.fixture
async def service(tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator[AnswerService]:
    async with running_service(tiny_settings(tiny_model_dir, tmp_path / "data")) as answering:
        yield answering


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (96, 64), (200, 30, 30)).save(path)
    return path


class SubmittedMessages:
    """Records the `messages` each request carried, while the real engine answers it."""

    def __init__(self, service: AnswerService, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[list[dict]] = []
        engine = service._engine
        submit = engine.submit

        def recording_submit(request: EngineRequest):
            self.seen.append(request.messages)
            return submit(request)

        monkeypatch.setattr(engine, "submit", recording_submit)


def _image_parts(messages: list[dict]) -> list[str]:
    return [part["image"] for message in messages for part in message["content"] if part["type"] == "image"]


async def test_follow_up_without_image_still_sees_the_image(
    service: AnswerService, photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = SubmittedMessages(service, monkeypatch)
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
    service: AnswerService, photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = SubmittedMessages(service, monkeypatch)
    await service.answer(Question(scope=CHANNEL, text="  ", local_files=(photo,)))
    assert spy.seen[0][-1]["content"][-1] == {"type": "text", "text": "Describe this image."}


async def test_channels_never_share_history(service: AnswerService, photo: Path) -> None:
    await service.answer(Question(scope=CHANNEL, text="secret", local_files=(photo,)))
    await service.answer(Question(scope=OTHER_CHANNEL, text="hello"))
    assert (await service.stats(CHANNEL)).turns == 1
    other = await service.stats(OTHER_CHANNEL)
    assert (other.turns, other.images) == (1, 0)


async def test_empty_question_and_too_many_images_store_nothing(service: AnswerService, photo: Path) -> None:
    with pytest.raises(EmptyQuestion) as empty:
        await service.answer(Question(scope=CHANNEL, text="   "))
    assert "ask me something" in empty.value.user_message
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


async def test_the_same_discord_message_twice_is_answered_once(service: AnswerService) -> None:
    question = Question(scope=CHANNEL, text="hello", discord_message_id=42)
    first, second = await asyncio.gather(service.answer(question), service.answer(question))
    third = await service.answer(question)
    assert sorted([first.duplicate, second.duplicate]) == [False, True]
    assert third.duplicate and third.text == ""
    assert (await service.stats(CHANNEL)).turns == 1


async def test_thread_starts_from_the_parent_conversation_and_continues_alone(
    service: AnswerService, photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer = await service.answer(Question(scope=CHANNEL, text="what is it?", local_files=(photo,)))
    await service.attach_reply(answer, 555)
    await service.answer(Question(scope=CHANNEL, text="later channel question"))
    spy = SubmittedMessages(service, monkeypatch)
    origin = ThreadOrigin(parent_scope=CHANNEL, starter_message_id=555)
    await service.answer(Question(scope=THREAD, text="tell me more", thread_origin=origin))
    texts = [part.get("text") for message in spy.seen[0] for part in message["content"]]
    assert "what is it?" in texts and "later channel question" not in texts
    assert len(_image_parts(spy.seen[0])) == 1
    assert (await service.stats(THREAD)).turns == 2
    assert (await service.stats(CHANNEL)).turns == 2


async def test_concurrent_questions_in_one_channel_are_answered_in_order(
    service: AnswerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = SubmittedMessages(service, monkeypatch)
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


async def test_engine_failure_stores_nothing(service: AnswerService) -> None:
    await service._engine.stop()
    with pytest.raises(EngineStopped) as stopped:
        await service.answer(Question(scope=CHANNEL, text="hello"))
    assert stopped.value.user_message
    assert (await service.stats(CHANNEL)).turns == 0


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
async def loopback_service(tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator[AnswerService]:
    settings = tiny_settings(
        tiny_model_dir,
        tmp_path / "data",
        media={"allowed_hosts": ["127.0.0.1"], "retries": 0},
        engine={"max_queue_size": 2},
    )
    async with running_service(settings) as answering:
        yield answering


def _slow_question(url: str, text: str, message_id: int) -> Question:
    return Question(
        scope=CHANNEL,
        text=text,
        attachments=(AttachmentRef(url=url, filename="slow.png"),),
        discord_message_id=message_id,
    )


async def test_a_slow_download_is_not_overtaken_in_its_conversation(
    loopback_service: AnswerService, slow_image_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = SubmittedMessages(loopback_service, monkeypatch)
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
    service: AnswerService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    video = write_mp4(tmp_path / "clip.mp4")
    spy = SubmittedMessages(service, monkeypatch)
    first = await service.answer(Question(scope=CHANNEL, text="", local_files=(video,)))
    await service.answer(Question(scope=CHANNEL, text="what happens next?"))
    assert first.text
    assert spy.seen[0][-1]["content"][-1] == {"type": "text", "text": "Describe this video."}
    videos = [part for message in spy.seen[1] for part in message["content"] if part["type"] == "video"]
    assert len(videos) == 1 and videos[0]["video"].endswith(".mp4")
    stats = await service.stats(CHANNEL)
    assert (stats.turns, stats.images, stats.videos) == (2, 0, 1)


async def test_a_reset_elsewhere_keeps_the_files_of_questions_in_flight(
    service: AnswerService, photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await service.answer(Question(scope=CHANNEL, text="what is it?", local_files=(photo,)))
    engine = service._engine
    submit = engine.submit
    submitted, release = asyncio.Event(), asyncio.Event()

    class HeldHandle:
        """The real request, whose result is handed over only once the test releases it."""

        def __init__(self, handle: RequestHandle) -> None:
            self._handle = handle

        async def result(self) -> GenerationResult:
            await release.wait()
            return await self._handle.result()

        def cancel(self) -> bool:
            return self._handle.cancel()

    def held_submit(request: EngineRequest) -> HeldHandle:
        handle = HeldHandle(submit(request))
        submitted.set()
        return handle

    monkeypatch.setattr(engine, "submit", held_submit)
    # The same picture in another channel: its question is in flight when the first channel is reset.
    in_flight = asyncio.create_task(
        service.answer(Question(scope=OTHER_CHANNEL, text="and here?", local_files=(photo,)))
    )
    await submitted.wait()
    forgotten = await service.reset(CHANNEL)
    assert forgotten.messages_deleted == 2
    release.set()
    answer = await in_flight
    assert answer.assistant_message_id is not None
    stats = await service.stats(OTHER_CHANNEL)
    assert (stats.turns, stats.images) == (1, 1)
    window = await service._store.load_window(await service._store.find_conversation(OTHER_CHANNEL), 10)
    (stored,) = window[0].media
    assert stored.path.is_file()


async def test_a_reset_elsewhere_keeps_the_files_of_questions_waiting_for_their_turn(
    service: AnswerService, photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await service.answer(Question(scope=CHANNEL, text="what is it?", local_files=(photo,)))
    store_file = service._media.store_file
    stored = asyncio.Event()

    async def signalling_store_file(path: Path):
        media = await store_file(path)
        stored.set()
        return media

    monkeypatch.setattr(service._media, "store_file", signalling_store_file)
    # An answer in progress in the other channel: the next question there has its picture downloaded (the
    # first channel's file, reused) but waits for its turn while the first channel is reset.
    async with service._conversation_locks.hold(OTHER_CHANNEL.key):
        waiting = asyncio.create_task(
            service.answer(Question(scope=OTHER_CHANNEL, text="and here?", local_files=(photo,)))
        )
        await stored.wait()
        forgotten = await service.reset(CHANNEL)
        assert forgotten.messages_deleted == 2
    answer = await waiting
    assert answer.assistant_message_id is not None
    window = await service._store.load_window(await service._store.find_conversation(OTHER_CHANNEL), 10)
    (kept,) = window[0].media
    assert kept.path.is_file()
