"""Streaming replies: placeholder, throttled merged edits, final split text, failures that do not stop it."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

import discord
import pytest

from bot.discord.replies import ANSWERING_NOW, KEEP_VIEW, StreamingReply, queue_text

INTERVAL = 0.05
MAX_MESSAGES = 3


@dataclass
class _Sent:
    id: int
    content: str = ""


@dataclass
class _RecordingTarget:
    """A ReplyTarget that records (time, op, message id, content)."""

    fail_edits: int = 0
    ops: list[tuple[float, str, int, str]] = field(default_factory=list)
    contents: dict[int, str] = field(default_factory=dict)
    files: dict[int, tuple[str, str]] = field(default_factory=dict)  # message id -> (file name, text)
    views: dict[int, discord.ui.View] = field(default_factory=dict)  # message id -> components shown
    nonces: list[str] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def _attach(self, message_id: int, file: discord.File | None) -> None:
        if file is not None:
            self.files[message_id] = (file.filename, file.fp.read().decode())

    def _record(self, op: str, message_id: int, content: str) -> None:
        self.ops.append((asyncio.get_running_loop().time(), op, message_id, content))

    async def send(
        self,
        content: str,
        *,
        first: bool,
        file: discord.File | None = None,
        view: discord.ui.View | None = None,
        nonce: str | None = None,
    ) -> _Sent:
        if nonce is not None:
            self.nonces.append(nonce)
        message = _Sent(next(self._ids))
        self.contents[message.id] = content
        self._attach(message.id, file)
        if view is not None:
            self.views[message.id] = view
        self._record("send-first" if first else "send", message.id, content)
        return message

    async def edit(
        self, message: _Sent, content: str, *, file: discord.File | None = None, view: Any = KEEP_VIEW
    ) -> None:
        if self.fail_edits:
            self.fail_edits -= 1
            raise discord.HTTPException(_FakeResponse(), "rate limited")
        self.contents[message.id] = content
        self._attach(message.id, file)
        if view is None:
            self.views.pop(message.id, None)
        elif view is not KEEP_VIEW:
            self.views[message.id] = view
        self._record("edit", message.id, content)

    async def delete(self, message: _Sent) -> None:
        del self.contents[message.id]
        self._record("delete", message.id, "")

    async def fetch(self, message_id: int) -> _Sent | None:
        return _Sent(message_id, self.contents[message_id]) if message_id in self.contents else None


class _FakeResponse:
    status = 500
    reason = "Server Error"


def test_queue_text_counts_questions() -> None:
    assert queue_text(1) == "⏳ 1 question ahead of yours…"
    assert queue_text(3) == "⏳ 3 questions ahead of yours…"


async def test_deltas_are_merged_into_throttled_edits() -> None:
    target = _RecordingTarget()
    async with StreamingReply(target, interval=INTERVAL, max_messages=MAX_MESSAGES) as reply:
        words = [f"w{i} " for i in range(200)]
        for word in words:
            reply.on_text(word)
            await asyncio.sleep(0.001)
        messages = await reply.finish("".join(words).strip())
    assert [target.contents[m.id] for m in messages] == ["".join(words).strip()]
    assert target.ops[0][1] == "send-first" and target.ops[0][3].startswith("w0")
    edits = [op for op in target.ops if op[1] == "edit"]
    assert 1 <= len(edits) < 20, "edits must be merged, never one per delta"
    times = [op[0] for op in target.ops[:-1]]  # the final edit is not held back by the interval
    assert all(b - a >= INTERVAL * 0.9 for a, b in itertools.pairwise(times))


async def test_the_final_text_goes_out_at_once_not_after_the_interval() -> None:
    target = _RecordingTarget()
    long_interval = 30.0
    loop = asyncio.get_running_loop()
    async with StreamingReply(target, interval=long_interval, max_messages=MAX_MESSAGES) as reply:
        reply.on_text("The first words")
        await asyncio.sleep(0.05)
        reply.on_text(" and more")  # an intermediate round is now due 30 s after the first send
        finished_at = loop.time()
        messages = await reply.finish("The first words and more, all of it.")
    assert [target.contents[m.id] for m in messages] == ["The first words and more, all of it."]
    assert [op[1] for op in target.ops] == ["send-first", "edit"], "the pending round became the final one"
    assert target.ops[-1][0] - finished_at < long_interval / 3


async def test_queue_placeholder_is_updated_then_replaced_by_text() -> None:
    target = _RecordingTarget()
    async with StreamingReply(target, interval=INTERVAL, max_messages=MAX_MESSAGES) as reply:
        reply.on_queue_position(2)
        await asyncio.sleep(INTERVAL * 2)
        reply.on_queue_position(1)
        await asyncio.sleep(INTERVAL * 2)
        reply.on_queue_position(0)
        await asyncio.sleep(INTERVAL * 2)
        reply.on_text("The answer.")
        await reply.finish("The answer.")
    shown = [(op, content) for _, op, _, content in target.ops]
    assert shown == [
        ("send-first", queue_text(2)),
        ("edit", queue_text(1)),
        ("edit", ANSWERING_NOW),
        ("edit", "The answer."),
    ]


async def test_position_zero_without_placeholder_sends_nothing() -> None:
    target = _RecordingTarget()
    async with StreamingReply(target, interval=INTERVAL, max_messages=MAX_MESSAGES) as reply:
        reply.on_queue_position(0)
        await asyncio.sleep(INTERVAL)
        assert target.ops == []
        await reply.finish("Done.")
    assert [op[1] for op in target.ops] == ["send-first"]


async def test_long_answer_becomes_several_messages_the_first_a_reply() -> None:
    target = _RecordingTarget()
    text = "\n\n".join(f"Paragraph {i}. " + "lorem ipsum " * 60 for i in range(8))
    async with StreamingReply(target, interval=INTERVAL, max_messages=5) as reply:
        reply.on_text(text[:1500])
        await asyncio.sleep(INTERVAL / 2)
        messages = await reply.finish(text)
    contents = [target.contents[m.id] for m in messages]
    assert len(contents) >= 3
    assert all(len(content) <= 2000 for content in contents)
    assert contents[0].startswith("Paragraph 0.")
    assert [op[1] for op in target.ops].count("send-first") == 1


async def test_an_answer_longer_than_max_messages_arrives_as_a_preview_and_answer_md() -> None:
    target = _RecordingTarget()
    text = "\n\n".join(f"Paragraph {i}. " + "lorem ipsum " * 60 for i in range(8))  # 4 messages' worth
    async with StreamingReply(target, interval=INTERVAL, max_messages=2) as reply:
        reply.on_text(text[:3000])  # two messages so far
        await asyncio.sleep(INTERVAL / 2)
        reply.on_text(text[3000:5000])  # more than two: from now on a preview that says a file will come
        await asyncio.sleep(INTERVAL * 2)
        streaming = dict(target.contents)
        messages = await reply.finish(text)
    assert any("it will come as a file" in content for content in streaming.values())
    assert len(messages) == 1, "the messages streamed beyond the preview are gone"
    (preview,) = [target.contents[m.id] for m in messages]
    assert preview.startswith("Paragraph 0.") and len(preview) <= 2000
    assert preview.endswith("The whole answer is attached as answer.md.")
    assert target.files == {messages[0].id: ("answer.md", text)}


async def test_controls_show_on_the_first_message_while_streaming_and_go_with_the_final_round() -> None:
    target = _RecordingTarget()
    controls = discord.ui.View(timeout=None)
    async with StreamingReply(
        target, interval=INTERVAL, max_messages=MAX_MESSAGES, controls=controls
    ) as reply:
        reply.on_queue_position(1)
        await asyncio.sleep(INTERVAL / 2)
        assert list(target.views.values()) == [controls], "already on the queue placeholder"
        reply.on_text("Some words")
        await asyncio.sleep(INTERVAL * 2)
        assert list(target.views.values()) == [controls]
        messages = await reply.finish("Some words, all of them.")
    assert target.views == {} and target.contents[messages[0].id] == "Some words, all of them."


async def test_an_answer_that_ends_before_its_first_round_never_shows_controls() -> None:
    target = _RecordingTarget()
    controls = discord.ui.View(timeout=None)
    async with StreamingReply(
        target, interval=INTERVAL, max_messages=MAX_MESSAGES, controls=controls
    ) as reply:
        await reply.finish("Quick.")
    assert target.views == {} and [op[1] for op in target.ops] == ["send-first"]


async def test_finishing_with_nothing_removes_what_was_shown() -> None:
    target = _RecordingTarget()
    async with StreamingReply(target, interval=INTERVAL, max_messages=MAX_MESSAGES) as reply:
        reply.on_queue_position(4)
        await asyncio.sleep(INTERVAL / 2)
        assert await reply.finish("") == []
    assert target.contents == {}


async def test_a_failed_edit_is_logged_and_the_final_text_still_lands(
    caplog: pytest.LogCaptureFixture,
) -> None:
    target = _RecordingTarget(fail_edits=1)
    async with StreamingReply(target, interval=INTERVAL, max_messages=MAX_MESSAGES) as reply:
        reply.on_text("Par")
        await asyncio.sleep(INTERVAL / 2)
        reply.on_text("tial")
        await asyncio.sleep(INTERVAL * 2)
        messages = await reply.finish("Partial and complete.")
    assert [target.contents[m.id] for m in messages] == ["Partial and complete."]
    assert "could not update a reply" in caplog.text


async def test_a_finished_reply_can_be_amended_once_more() -> None:
    target = _RecordingTarget()
    async with StreamingReply(target, interval=30.0, max_messages=MAX_MESSAGES) as reply:
        reply.on_text("The answer")
        (shown,) = await reply.finish("The answer.")
        (amended,) = await reply.amend("The answer.\n\n-# a note")  # at once: not held back by the interval
    assert amended.id == shown.id and target.contents == {shown.id: "The answer.\n\n-# a note"}
    assert target.ops[-1][1:] == ("edit", shown.id, "The answer.\n\n-# a note")


async def test_leaving_early_stops_the_pump() -> None:
    target = _RecordingTarget()
    async with StreamingReply(target, interval=INTERVAL, max_messages=MAX_MESSAGES) as reply:
        reply.on_text("first")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        reply.on_text(" second")  # due one interval after the first send, after the block is left
    # A live pump would edit within one interval; wait four.
    await asyncio.sleep(4 * INTERVAL)
    assert [op[1] for op in target.ops] == ["send-first"], "no edit after the reply was abandoned"


@dataclass
class _RefusingTarget(_RecordingTarget):
    """Discord refuses every send with `status` (403: missing permissions; 401: a dead interaction token)."""

    status: int = 403
    attempts: int = 0

    async def send(
        self,
        content: str,
        *,
        first: bool,
        file: discord.File | None = None,
        view: discord.ui.View | None = None,
        nonce: str | None = None,
    ) -> _Sent:
        self.attempts += 1
        response = _FakeResponse()
        response.status = self.status
        error = discord.Forbidden if self.status == 403 else discord.HTTPException
        raise error(response, "Missing Permissions")


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_reply_is_not_retried_every_round(status: int) -> None:
    target = _RefusingTarget(status=status)
    async with StreamingReply(target, interval=INTERVAL, max_messages=MAX_MESSAGES) as reply:
        for word in ("one ", "two ", "three ", "four "):
            reply.on_text(word)
            await asyncio.sleep(INTERVAL * 1.5)
        assert await reply.finish("one two three four") == []
    assert target.attempts == 1, "401/403 must never be retried in a loop"


async def test_an_edit_of_a_deleted_reply_is_not_retried_every_round() -> None:
    target = _RecordingTarget()
    async with StreamingReply(target, interval=INTERVAL, max_messages=MAX_MESSAGES) as reply:
        reply.on_text("first")
        await asyncio.sleep(INTERVAL / 2)
        target.contents.clear()  # a moderator deleted the reply

        async def gone(
            message: _Sent, content: str, *, file: discord.File | None = None, view: Any = None
        ) -> None:
            target._record("edit-404", message.id, content)
            response = _FakeResponse()
            response.status = 404
            raise discord.NotFound(response, "Unknown Message")

        target.edit = gone  # type: ignore[method-assign]
        for word in (" second", " third", " fourth"):
            reply.on_text(word)
            await asyncio.sleep(INTERVAL * 1.5)
        await reply.finish("first second third fourth")
    assert [op[1] for op in target.ops] == ["send-first", "edit-404"]


async def test_a_reply_continues_an_earlier_processes_messages_and_notes_new_ones() -> None:
    target = _RecordingTarget()
    frozen = await target.send("half an ans", first=True)
    sent: list[int] = []

    async def on_sent(message: Any) -> None:
        sent.append(message.id)

    existing = [await target.fetch(frozen.id)]
    async with StreamingReply(
        target, interval=INTERVAL, max_messages=MAX_MESSAGES, existing=existing, on_sent=on_sent, nonce="77"
    ) as reply:
        messages = await reply.finish("a whole answer\n\n" + "x" * 2500)
    assert messages[0].id == frozen.id and target.contents[frozen.id].startswith("a whole answer")
    assert len(messages) == 2 and sent == [messages[1].id] and target.nonces == ["77.1"]


async def test_a_closed_session_ends_the_updates_without_escaping() -> None:
    class _ClosedTarget(_RecordingTarget):
        async def edit(self, message: _Sent, content: str, **options: Any) -> None:
            raise RuntimeError("Session is closed")

    target = _ClosedTarget()
    async with StreamingReply(target, interval=INTERVAL, max_messages=MAX_MESSAGES) as reply:
        reply.on_text("first words")
        await asyncio.sleep(INTERVAL * 2)
        await reply.finish("first words and the rest")  # the edit fails; nothing escapes
    assert list(target.contents.values()) == ["first words"]


async def test_interrupting_a_streaming_reply_leaves_its_sentence() -> None:
    target = _RecordingTarget()
    async with StreamingReply(target, interval=INTERVAL, max_messages=MAX_MESSAGES) as reply:
        reply.on_text("half of it")
        await asyncio.sleep(INTERVAL * 2)
        await reply.interrupt("I'll be back.")
    assert list(target.contents.values()) == ["I'll be back."]
