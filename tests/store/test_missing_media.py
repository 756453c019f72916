"""A media file gone from disk never breaks the conversations whose turns still reference it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bot.content import ChatMessage, MediaPart, TextPart
from bot.store import ConversationStore, NewTurn
from tests.store.factories import question, scope, write_media


async def test_window_leaves_out_a_missing_file_and_keeps_the_text(
    store: ConversationStore, media_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kept, lost = write_media(media_dir, 1), write_media(media_dir, 2)
    conversation = await store.conversation_for(scope(1))
    await store.record_turn(
        conversation, NewTurn(question("compare", kept, lost), "ok", question_discord_id=1)
    )
    lost.path.unlink()

    with caplog.at_level(logging.WARNING, logger="bot.store"):
        window = await store.load_window(conversation, 10)

    assert window == [
        ChatMessage("user", (MediaPart(kept), TextPart("compare"))),
        ChatMessage("assistant", (TextPart("ok"),)),
    ]
    assert any(lost.sha256 in record.getMessage() for record in caplog.records)


async def test_forget_racing_a_question_in_flight_leaves_no_dangling_image(
    store: ConversationStore, media_dir: Path
) -> None:
    # The same picture is in channel 1's history and, freshly downloaded, in a question being answered in
    # channel 2 (not recorded yet). /reset in channel 1 deletes the file, then channel 2 records its turn.
    picture = write_media(media_dir, 1)
    one = await store.conversation_for(scope(1))
    two = await store.conversation_for(scope(2))
    await store.record_turn(one, NewTurn(question("first", picture), "a", question_discord_id=1))

    await store.forget(one)
    await store.record_turn(two, NewTurn(question("second", picture), "b", question_discord_id=2))

    window = await store.load_window(two, 10)
    assert [message.text for message in window] == ["second", "b"]
    assert all(item.path.is_file() for message in window for item in message.media)
