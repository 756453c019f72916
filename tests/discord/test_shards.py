"""Two `python -m bot run` processes, one shard each, on one PostgreSQL database and one inference server: the
top of the deployment ladder.

The loopback Discord routes each guild's events to its shard, so each guild's questions are answered once, by
the process running its shard. Restarted with the shard ids swapped, the other process continues a thread's
conversation where the first left it: the history lives in the shared database, not in a process.
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
    """`python -m bot run` once per config, all connected; stopped with SIGTERM (each must exit 0)."""
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


async def ask(fake: FakeDiscord, channel: int, user: FakeUser, text: str) -> Json:
    """Post a question mentioning the bot; return the bot's one finished reply to it."""
    question = await fake.send_message(channel, user, f"{fake.bot.mention} {text}")

    def replies_to_question(message: Json) -> bool:
        return int((message.get("message_reference") or {}).get("message_id", 0)) == int(question["id"])

    reply = await fake.wait_for_message(
        channel, lambda m: replies_to_question(m) and m["content"], timeout=60
    )
    await asyncio.sleep(0.5)  # a second answer (a duplicate delivery) would have been posted by now
    assert [m["id"] for m in fake.bot_messages(channel) if replies_to_question(m)] == [reply["id"]]
    return reply


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


async def test_two_shard_processes_share_one_database(
    tiny_model_dir: Path, inference_server: InferenceServer, postgresql_url: str, tmp_path: Path
) -> None:
    fake = FakeDiscord(token=TOKEN, shard_count=SHARDS)
    guild_a, (channel_a,), _ = fake.add_guild("A", ["general"], shard=0)
    guild_b, (channel_b,), _ = fake.add_guild("B", ["general"], shard=1)
    alice = fake.add_user("alice")
    await fake.start()

    def config(name: str, shard_id: int) -> Path:
        return write_tiny_config(
            tmp_path / f"{name}.toml",
            tiny_model_dir,
            tmp_path / "data",  # one box: the processes share the media folder too
            discord={"api_base_url": fake.api_base_url, "shard_count": SHARDS, "shard_ids": [shard_id]},
            storage={"database_url": postgresql_url},
            engine={"backend": "server"},
            server={"base_url": inference_server.base_url, "model": inference_server.model},
            generation={"max_new_tokens": 2},
        )

    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    try:
        async with shard_processes(fake, [config("first", 0), config("second", 1)], logs):
            answer = await ask(fake, channel_a, alice, "question in A")
            await ask(fake, channel_b, alice, "question in B")
            thread = await fake.create_thread(channel_a, int(answer["id"]), alice, "about A")
            await ask(fake, thread, alice, "first thread question")
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
