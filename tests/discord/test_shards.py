"""Two `python -m bot run` processes, one shard each, on one PostgreSQL database and one inference server: the
top of the deployment ladder.

The loopback Discord routes each guild's events to its shard, so each guild's questions are answered once, by
the process running its shard. Restarted with the shard ids swapped, the other process continues a thread's
conversation where the first left it: the history lives in the shared database, not in a process. During a
hand-over both processes may run the same shard and get the same message: it is answered and stored once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import select

from bot.store.database import create_engine_for
from bot.store.models import Conversation, Message
from tests.discord.harness import TOKEN
from tests.fakediscord.payloads import Json
from tests.fakediscord.server import FakeDiscord, FakeUser
from tests.inference.server import InferenceServer
from tests.tiny_settings import write_tiny_config

ROOT = Path(__file__).resolve().parents[2]
SHARDS = 2


@asynccontextmanager
async def shard_processes(
    fake: FakeDiscord, configs: Sequence[Path], logs: Sequence[Path]
) -> AsyncIterator[None]:
    """`python -m bot run` per config, all connected; then SIGTERM: each exits 0 and its session closes."""
    processes = []
    for config, log in zip(configs, logs, strict=True):
        with log.open("ab") as output:
            processes.append(
                await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "bot", "--config", str(config), "run"),
                    cwd=ROOT,
                    env={**os.environ, "DISCORD_TOKEN": TOKEN},
                    stdout=output,
                    stderr=output,
                )
            )
    try:
        await fake.wait_connected(len(processes), timeout=120)
        yield
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process, log in zip(processes, logs, strict=True):
            assert await asyncio.wait_for(process.wait(), timeout=60) == 0, log.read_text()[-3000:]
        await fake.wait_connected(0)  # their sessions are gone before the next processes connect


def replies_to(message: Json, question: Json) -> bool:
    return int((message.get("message_reference") or {}).get("message_id", 0)) == int(question["id"])


async def ask(fake: FakeDiscord, channel: int, user: FakeUser, text: str) -> tuple[Json, Json]:
    """Post a question mentioning the bot; return it and the bot's first reply to it with text."""
    question = await fake.send_message(channel, user, f"{fake.bot.mention} {text}")
    reply = await fake.wait_for_message(
        channel, lambda m: replies_to(m, question) and m["content"], timeout=60
    )
    return question, reply


def reply_count(fake: FakeDiscord, question: Json) -> int:
    """How many messages of the bot reply to the question (once its processes have stopped: all it posted)."""
    return sum(replies_to(message, question) for message in fake.bot_messages(int(question["channel_id"])))


def questions_in(database_url: str, scope_key: str) -> list[str]:
    """The question texts of one conversation, oldest first."""
    engine = create_engine_for(database_url)
    try:
        with engine.connect() as connection:
            contents = connection.scalars(
                select(Message.content)
                .join(Conversation, Conversation.id == Message.conversation_id)
                .where(Conversation.scope_key == scope_key, Message.role == "user")
                .order_by(Message.position)
            ).all()
    finally:
        engine.dispose()
    return [part["text"] for content in contents for part in content if part["type"] == "text"]


def shard_config(
    folder: Path,
    name: str,
    model_dir: Path,
    server: InferenceServer,
    database_url: str,
    fake: FakeDiscord,
    shard_id: int,
) -> Path:
    """`folder/NAME.toml`: a process running shard `shard_id` of the fake's shards, on the shared database."""
    return write_tiny_config(
        folder / f"{name}.toml",
        model_dir,
        folder / "data",  # one box: the processes share the media folder too
        discord={"api_base_url": fake.api_base_url, "shard_count": fake.shard_count, "shard_ids": [shard_id]},
        storage={"database_url": database_url},
        engine={"backend": "server"},
        server={"base_url": server.base_url, "model": server.model},
        generation={"max_new_tokens": 2},
    )


async def test_two_shard_processes_share_one_database(
    postgresql_url: str, tiny_model_dir: Path, inference_server: InferenceServer, tmp_path: Path
) -> None:
    fake = FakeDiscord(token=TOKEN, shard_count=SHARDS)
    guild_a, (channel_a,), _ = fake.add_guild("A", ["general"], shard=0)
    guild_b, (channel_b,), _ = fake.add_guild("B", ["general"], shard=1)
    alice = fake.add_user("alice")
    await fake.start()

    def config(name: str, shard_id: int) -> Path:
        return shard_config(tmp_path, name, tiny_model_dir, inference_server, postgresql_url, fake, shard_id)

    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    try:
        async with shard_processes(fake, [config("first", 0), config("second", 1)], logs):
            question_a, answer = await ask(fake, channel_a, alice, "question in A")
            question_b, _ = await ask(fake, channel_b, alice, "question in B")
            thread = await fake.create_thread(channel_a, int(answer["id"]), alice, "about A")
            await ask(fake, thread, alice, "first thread question")
        assert reply_count(fake, question_a) == reply_count(fake, question_b) == 1
        first_log, second_log = (log.read_text() for log in logs)
        assert f"answered in discord:{guild_a}:" in first_log and f"discord:{guild_b}:" not in first_log
        assert f"answered in discord:{guild_b}:" in second_log and f"discord:{guild_a}:" not in second_log

        # Swapped: guild A's shard now runs in the second process.
        async with shard_processes(fake, [config("first", 1), config("second", 0)], logs):
            await ask(fake, thread, alice, "second thread question")
        thread_key = f"discord:{guild_a}:{channel_a}:{thread}"
        assert f"answered in {thread_key}" in logs[1].read_text().removeprefix(second_log)
        assert questions_in(postgresql_url, thread_key) == [
            "question in A",  # forked from the channel when the thread started
            "first thread question",
            "second thread question",
        ]
    finally:
        await fake.close()


async def test_a_message_both_processes_get_during_a_hand_over_is_answered_once(
    postgresql_url: str, tiny_model_dir: Path, inference_server: InferenceServer, tmp_path: Path
) -> None:
    fake = FakeDiscord(token=TOKEN, shard_count=1)
    guild, (channel,), _ = fake.add_guild("G", ["general"])
    alice = fake.add_user("alice")
    await fake.start()
    configs = [
        shard_config(tmp_path, name, tiny_model_dir, inference_server, postgresql_url, fake, 0)
        for name in ("old", "new")
    ]
    logs = [tmp_path / "old.log", tmp_path / "new.log"]
    try:
        async with shard_processes(fake, configs, logs):  # both run shard 0: both get every message
            question, _ = await ask(fake, channel, alice, "who answers?")
            async with asyncio.timeout(60):  # the other process found the question kept, or its turn stored
                while not all("answered" in log.read_text() for log in logs):
                    await asyncio.sleep(0.1)
    finally:
        await fake.close()
    assert reply_count(fake, question) == 1, "one reply"
    outputs = [log.read_text() for log in logs]
    assert sum(output.count("answered in discord:") for output in outputs) == 1, outputs
    assert sum(output.count("already answered") for output in outputs) == 1, outputs
    assert questions_in(postgresql_url, f"discord:{guild}:{channel}:{channel}") == ["who answers?"]
