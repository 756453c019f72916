"""Durable questions: kept when accepted, once per Discord message, completed with their turn, claimed
by one process after a restart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from bot.store import ConversationStore, NewQuestion, NewTurn
from tests.store.factories import question, scope, write_media

ATTACHMENT = {"url": "https://cdn/x.png?ex=1", "filename": "x.png", "size": 10, "content_type": "image/png"}


def asked(discord_id: int = 500, *, kind: str = "message") -> NewQuestion:
    return NewQuestion(
        discord_message_id=discord_id,
        kind="command" if kind == "command" else "message",
        channel_id=11,
        reply_channel_id=11,
        asker_id=42,
        text="what is this?",
        attachments=(ATTACHMENT,),
        attachments_message_id=discord_id,
    )


async def test_an_accepted_question_is_unfinished_for_other_processes_only(store: ConversationStore) -> None:
    conversation = await store.conversation_for(scope(11))
    question_id = await store.accept_question(conversation, asked(), owner="old")
    assert question_id is not None
    await store.note_reply(question_id, 900)
    await store.note_reply(question_id, 901)
    await store.note_reply(question_id, 900)  # noted once

    assert await store.unfinished_questions(not_owner="old") == []
    (unfinished,) = await store.unfinished_questions(not_owner="new")
    assert unfinished.id == question_id and unfinished.scope == scope(11) and unfinished.owner == "old"
    assert unfinished.question == asked() and unfinished.reply_ids == (900, 901)
    assert unfinished.answer_text is None  # not answered yet
    assert abs(unfinished.created_at - datetime.now(UTC)) < timedelta(minutes=1)


async def test_a_question_is_kept_once_per_discord_message(store: ConversationStore) -> None:
    conversation = await store.conversation_for(scope(11))
    assert await store.accept_question(conversation, asked(), owner="a") is not None
    assert await store.accept_question(conversation, asked(), owner="a") is None
    assert await store.accept_question(conversation, asked(), owner="b") is None  # another process, too
    other = await store.conversation_for(scope(12))
    assert await store.accept_question(other, asked(), owner="a") is not None  # ids are per conversation


async def test_recording_the_turn_answers_the_question_and_showing_it_finishes_it(
    store: ConversationStore,
) -> None:
    conversation = await store.conversation_for(scope(11))
    question_id = await store.accept_question(conversation, asked(), owner="a")
    assert question_id is not None
    turn = NewTurn(question("what is this?"), "a cat", question_discord_id=500, question_id=question_id)
    await store.record_turn(conversation, turn)
    # Recorded, not yet shown in full (a crash before the final edit): the next start shows the recorded text.
    (unfinished,) = await store.unfinished_questions(not_owner="b")
    assert unfinished.id == question_id and unfinished.answer_text == "a cat"
    await store.finish_question(question_id, "shown")
    assert await store.unfinished_questions(not_owner="b") == []
    # Delivered again after it was answered: nothing to keep, nothing to answer.
    assert await store.accept_question(conversation, asked(), owner="b") is None


async def test_a_turn_recorded_before_the_question_was_kept_counts_as_answered(
    store: ConversationStore,
) -> None:
    conversation = await store.conversation_for(scope(11))
    await store.record_turn(conversation, NewTurn(question("q"), "a", question_discord_id=500))
    assert await store.accept_question(conversation, asked(), owner="a") is None


async def test_finished_questions_are_not_unfinished(store: ConversationStore) -> None:
    conversation = await store.conversation_for(scope(11))
    failed = await store.accept_question(conversation, asked(1), owner="a")
    expired = await store.accept_question(conversation, asked(2, kind="command"), owner="a")
    pending = await store.accept_question(conversation, asked(3), owner="a")
    assert failed is not None and expired is not None and pending is not None
    await store.finish_question(failed, "failed")
    await store.finish_question(expired, "expired")
    await store.finish_question(pending, "shown")  # only an answered question can be shown
    assert [q.id for q in await store.unfinished_questions(not_owner="b")] == [pending]


async def test_one_process_claims_a_question(store: ConversationStore) -> None:
    conversation = await store.conversation_for(scope(11))
    question_id = await store.accept_question(conversation, asked(), owner="dead")
    assert question_id is not None
    assert await store.claim_question(question_id, from_owner="dead", owner="b")
    assert not await store.claim_question(question_id, from_owner="dead", owner="c")
    assert [q.owner for q in await store.unfinished_questions(not_owner="c")] == ["b"]
    assert await store.unfinished_questions(not_owner="b") == []


async def test_forgetting_nothing_and_resetting_keep_questions_consistent(store: ConversationStore) -> None:
    conversation = await store.conversation_for(scope(11))
    question_id = await store.accept_question(conversation, asked(), owner="a")
    assert question_id is not None
    await store.forget(conversation)  # a /reset keeps the pending question: it is still to be answered
    assert [q.id for q in await store.unfinished_questions(not_owner="b")] == [question_id]


async def test_the_downloaded_files_come_back_while_all_are_on_disk(
    store: ConversationStore, media_dir: Path
) -> None:
    conversation = await store.conversation_for(scope(11))
    question_id = await store.accept_question(conversation, asked(), owner="a")
    assert question_id is not None
    first, second = write_media(media_dir, 1), write_media(media_dir, 2)
    await store.note_media(question_id, [first.path, second.path])
    (unfinished,) = await store.unfinished_questions(not_owner="b")
    assert unfinished.media_files == (first.path, second.path)
    second.path.unlink()  # swept meanwhile: the attachments are fetched again instead
    (unfinished,) = await store.unfinished_questions(not_owner="b")
    assert unfinished.media_files == ()
