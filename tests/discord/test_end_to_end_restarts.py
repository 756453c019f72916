"""Restarts: a shutdown with more answers in progress than the grace period covers, then the next start.

The real discord.py client against the loopback Discord, on the in-process tiny model. Every reply the
shutdown cuts short is left saying it will be answered after the restart; the next start answers each
question into that same reply message, once, also when Discord delivers the question again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from bot.content import ConversationScope
from bot.discord.delivery import ANSWER_AFTER_RESTART, ASK_AGAIN_AFTER_SHUTDOWN
from bot.discord.replies import ANSWERING_NOW
from bot.discord.resuming import ASK_AGAIN_AFTER_RESTART
from tests.discord.harness import TOKEN, RunningBot, bot_settings, png_bytes
from tests.fakediscord.server import FakeDiscord

GRACE = 2.0


async def until(condition: Callable[[], bool], timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def replies_to(fake: FakeDiscord, channel: int, question: dict) -> list[dict]:
    return [
        message
        for message in fake.bot_messages(channel)
        if int((message.get("message_reference") or {}).get("message_id", 0)) == int(question["id"])
    ]


async def test_a_shutdown_leaves_no_one_waiting_and_the_next_start_answers_into_the_same_replies(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    fake = FakeDiscord(token=TOKEN)
    guild_id, (left, right), _ = fake.add_guild("Guild", ["left", "right"], ())
    alice = fake.add_user("alice", guild_ids=[guild_id])
    await fake.start()
    settings = bot_settings(
        tiny_model_dir,
        tmp_path / "data",
        fake,
        {},
        engine={"shutdown_grace_seconds": GRACE, "max_batch_size": 1},
    )
    bot = RunningBot(settings, fake)
    await bot.start()
    try:
        mention = fake.bot.mention
        data = png_bytes()
        image = fake.attachment(
            fake.add_file("cat.png", data, "image/png"), "cat.png", len(data), "image/png"
        )
        with bot.hold_engine():
            questions = [
                (left, await fake.send_message(left, alice, f"{mention} first")),
                (
                    right,
                    await fake.send_message(right, alice, f"{mention} what is this?", attachments=[image]),
                ),
                (left, await fake.send_message(left, alice, f"{mention} second")),
                (left, await fake.send_message(left, alice, f"{mention} third")),
            ]
            # The last two wait behind the first in their channel and show their place in the queue.
            await until(lambda: len(fake.bot_messages(left)) == 2)
            assert bot.client is not None
            await bot.client.shut_down(GRACE)  # as on SIGTERM
            for channel, question in questions:
                (reply,) = replies_to(fake, channel, question)
                assert reply["content"] == ANSWER_AFTER_RESTART and not reply["components"]
        await bot.stop()
        frozen = {
            question["id"]: replies_to(fake, channel, question)[0]["id"] for channel, question in questions
        }

        await bot.start()
        await until(lambda: len(bot.replies) == len(questions))  # each answer stored and linked to its reply
        for channel, question in questions:
            (reply,) = replies_to(fake, channel, question)
            assert reply["id"] == frozen[question["id"]]
            assert reply["content"].strip() and reply["content"] not in (
                ANSWERING_NOW,
                ASK_AGAIN_AFTER_RESTART,
            )
        assert bot.service is not None
        assert (await bot.service.stats(ConversationScope("discord", left, guild_id))).turns == 3
        # The picture was downloaded before the shutdown: answered from the stored file, not fetched again.
        assert (await bot.service.stats(ConversationScope("discord", right, guild_id))).images == 1
        assert not fake.requests_to("GET", f"/channels/{right}/messages/{questions[1][1]['id']}")
        assert await bot.service.unfinished() == []

        # Discord delivers a question again after the restart: it is not answered twice.
        await fake.redeliver(questions[0][1])
        after = await fake.send_message(left, alice, f"{mention} fourth")
        await until(lambda: len(bot.replies) == len(questions) + 1)
        assert bot.replies[-1][1] == int(replies_to(fake, left, after)[0]["id"])
        assert len(fake.bot_messages(left)) == 4
        assert (await bot.service.stats(ConversationScope("discord", left, guild_id))).turns == 4
    finally:
        await bot.stop()
        await fake.close()


async def test_past_the_window_and_for_slash_commands_the_asker_is_told_to_ask_again(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    fake = FakeDiscord(token=TOKEN)
    guild_id, (channel,), _ = fake.add_guild("Guild", ["general"], ())
    alice = fake.add_user("alice", guild_ids=[guild_id])
    await fake.start()
    settings = bot_settings(
        tiny_model_dir,
        tmp_path / "data",
        fake,
        {"resume_window_seconds": 0},
        engine={"shutdown_grace_seconds": GRACE},
    )
    bot = RunningBot(settings, fake)
    await bot.start()
    try:
        with bot.hold_engine():
            question = await fake.send_message(channel, alice, f"{fake.bot.mention} first")
            token = await fake.slash_command(
                channel, alice, "ask", [{"name": "question", "type": 3, "value": "and this?"}]
            )
            await fake.wait_for_request(lambda request: f"/{token}/callback" in request.path)
            assert bot.client is not None
            await until(lambda: bot.client is not None and bot.client.deliveries.active == 2)
            await bot.client.shut_down(GRACE)
            (reply,) = replies_to(fake, channel, question)
            assert reply["content"] == ANSWER_AFTER_RESTART
            (command_reply,) = [m for m in fake.bot_messages(channel) if m["id"] != reply["id"]]
            assert command_reply["content"] == ASK_AGAIN_AFTER_SHUTDOWN
        await bot.stop()

        await bot.start()  # both are older than the window (0 s); the command could not be answered anyway
        await until(lambda: all(m["content"] == ASK_AGAIN_AFTER_RESTART for m in fake.bot_messages(channel)))
        assert sorted(m["id"] for m in fake.bot_messages(channel)) == sorted(
            [reply["id"], command_reply["id"]]
        )
        assert bot.service is not None
        service = bot.service
        async with asyncio.timeout(30):  # marked expired once told
            while await service.unfinished():
                await asyncio.sleep(0.05)
        assert (await bot.service.stats(ConversationScope("discord", channel, guild_id))).turns == 0
    finally:
        await bot.stop()
        await fake.close()
