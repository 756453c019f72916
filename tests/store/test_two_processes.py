"""Two bot processes recording the same questions at once (a shard hand-over) still store one turn each.

Each process has its own ConversationStore on the same PostgreSQL database; one walks the questions forward
and the other backward, so they race on creating the conversations, on the same question, on the next
position of a conversation and on the same new media row.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from sqlalchemy import func, select

from bot.store import upgrade
from bot.store.database import create_engine_for
from bot.store.models import Conversation, Media, Message
from tests.store.backend import postgresql_only
from tests.store.writer_process import CONVERSATIONS, QUESTIONS, TURNS

ROOT = Path(__file__).resolve().parents[2]


async def _writer(database_url: str, media_dir: Path, order: str) -> asyncio.subprocess.Process:
    media_dir.mkdir()
    writer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.store.writer_process",
        database_url,
        str(media_dir),
        order,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert writer.stdout is not None and writer.stderr is not None
    if await asyncio.wait_for(writer.stdout.readline(), timeout=60) != b"ready\n":
        raise AssertionError((await writer.stderr.read()).decode()[-3000:])
    return writer


@postgresql_only("two processes share one database server")
async def test_two_processes_store_each_question_once(database_url: str, tmp_path: Path) -> None:
    upgrade(database_url)
    writers = [await _writer(database_url, tmp_path / order, order) for order in ("forward", "backward")]
    results = await asyncio.gather(
        *(asyncio.wait_for(writer.communicate(b"go\n"), timeout=120) for writer in writers)
    )

    for writer, (_, errors) in zip(writers, results, strict=True):
        assert writer.returncode == 0, errors.decode()[-3000:]
    assert sum(int(output) for output, _ in results) == len(
        QUESTIONS
    )  # each question once new, once repeated
    engine = create_engine_for(database_url)
    try:
        with engine.connect() as connection:
            assert connection.scalar(select(func.count(Conversation.id))) == CONVERSATIONS
            assert connection.scalar(select(func.count(Media.id))) == 1
            rows = connection.execute(
                select(
                    Message.conversation_id, Message.position, Message.role, Message.discord_message_id
                ).order_by(Message.conversation_id, Message.position)
            ).all()
    finally:
        engine.dispose()
    by_conversation: dict[int, list[tuple[int, str, int | None]]] = {}
    for conversation_id, position, role, discord_id in rows:
        by_conversation.setdefault(conversation_id, []).append((position, role, discord_id))
    assert len(by_conversation) == CONVERSATIONS
    for messages in by_conversation.values():
        assert [position for position, _, _ in messages] == list(range(2 * TURNS))
        assert [role for _, role, _ in messages] == ["user", "assistant"] * TURNS
        questions = [discord_id for _, role, discord_id in messages if role == "user"]
        assert len(set(questions)) == TURNS
