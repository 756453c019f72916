"""End to end: the Stop button, per-user limits and long answers as `answer.md`.

One fake Discord server and one bot serve the module; answers are long (1,024 new tokens, so there is time to
press Stop while one streams), an answer longer than one message comes as a file, and users are limited to
2 questions in flight and a bucket of 3 questions refilled at 1 a minute. Alice holds the exempt role. The
module runs twice: in process, and through a real inference server (`transformers serve`).
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from bot.answering import STOPPED_NOTE
from bot.discord.stopping import ALREADY_ENDED, NOT_YOURS
from bot.errors import UserLimited
from tests.discord.harness import TOKEN, GuildWorld, RunningBot, backend_proxy, bot_settings
from tests.fakediscord.server import DEFERRED_UPDATE, EPHEMERAL_FLAG, FakeDiscord, FakeUser

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHANNELS = ["stop", "batch-a", "batch-b", "limits-a", "limits-b", "limits-c", "rate", "long"]
LONG_ANSWER_SECONDS = 300  # 1,024 tokens: seconds on an idle CPU, much longer on a busy shared one
LIMITS = {"max_in_flight_per_user": 2, "burst": 3, "questions_per_minute": 1.0}


@dataclass
class World(GuildWorld):
    alice: FakeUser  # holds the exempt role
    bob: FakeUser
    carol: FakeUser
    dave: FakeUser  # does not accept DMs
    moderator: FakeUser

    async def ask(self, channel: str, user: FakeUser, text: str) -> dict:
        return await self.fake.send_message(self.channels[channel], user, f"{self.fake.bot.mention} {text}")

    async def stop_button(self, channel: str) -> tuple[int, str]:
        """The bot's message in `channel` that shows a Stop button, and the button's custom id."""
        message = await self.fake.wait_for_message(self.channels[channel], lambda m: bool(m["components"]))
        (row,) = message["components"]
        (button,) = row["components"]
        assert button["label"] == "Stop"
        return int(message["id"]), button["custom_id"]

    async def private_reply(self, channel: str, sentence: str) -> dict:
        """The ephemeral message the bot showed in `channel` saying `sentence`."""
        return await self.fake.wait_for_message(
            self.channels[channel], lambda m: m["content"] == sentence and m["flags"] & EPHEMERAL_FLAG
        )


def _replies_to(message: dict, question: dict) -> bool:
    return int((message.get("message_reference") or {}).get("message_id", 0)) == int(question["id"])


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=["local", "server"])
async def world(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    async with backend_proxy(request, request.param) as proxy:
        fake = FakeDiscord(token=TOKEN)
        guild_id, channel_ids, (exempt_role,) = fake.add_guild("Guild", CHANNELS, ("helpers",))
        await fake.start()
        settings = bot_settings(
            tiny_model_dir,
            tmp_path_factory.mktemp("bot-data"),
            fake,
            {"answer_file_after_messages": 1},
            limits={**LIMITS, "exempt_role_ids": [exempt_role]},
            server=proxy,
        )
        settings = settings.model_copy(
            update={"generation": settings.generation.model_copy(update={"max_new_tokens": 1024})}
        )
        bot = RunningBot(settings, fake, proxy)
        await bot.start()
        try:
            yield World(
                fake=fake,
                bot=bot,
                guild_id=guild_id,
                channels=dict(zip(CHANNELS, channel_ids, strict=True)),
                alice=fake.add_user("alice", role_ids=[exempt_role], guild_ids=[guild_id]),
                bob=fake.add_user("bob", guild_ids=[guild_id]),
                carol=fake.add_user("carol", guild_ids=[guild_id]),
                dave=fake.add_user("dave", guild_ids=[guild_id], accepts_dms=False),
                moderator=fake.add_user("mod", guild_ids=[guild_id]),
            )
        finally:
            await bot.stop()
            await fake.close()


async def test_the_asker_stops_an_answer_its_text_so_far_is_kept_and_remembered(world: World) -> None:
    fake, channel = world.fake, world.channels["stop"]
    known = len(world.bot.replies)
    await world.ask("stop", world.alice, "tell me a very long story")
    message_id, button = await world.stop_button("stop")
    with_button = copy.deepcopy(fake.messages[message_id])

    token = await fake.press_button(message_id, world.bob, button)  # not the asker, no moderator
    await world.private_reply("stop", NOT_YOURS)
    assert fake.messages[message_id]["components"], "bob's press changed nothing"

    token = await fake.press_button(message_id, world.alice, button)
    callback = await fake.wait_for_request(lambda r: r.method == "POST" and f"/{token}/callback" in r.path)
    assert callback.body["type"] == DEFERRED_UPDATE
    reply_id = await world.bot.wait_reply(channel, after=known)
    answer = world.bot.replies[-1][0]
    assert answer.stopped and answer.text.endswith(STOPPED_NOTE)
    shown = fake.messages[reply_id]
    assert shown["components"] == [], "the button is gone with the final edit"
    assert shown["content"] == answer.text and not shown["attachments"], "stopped early: one short message"
    assert await world.stats(world.scope("stop")) == (1, 0)

    # A button still shown after its answer ended (a reply frozen by a crash, say) is told so.
    await fake.press_button(message_id, world.alice, button, shown=with_button)
    await world.private_reply("stop", ALREADY_ENDED)

    await fake.send_message(channel, world.alice, "and then?", reply_to=reply_id)
    follow_up_id, follow_up_button = await world.stop_button("stop")
    stored_answer = world.bot.prompts[-1][-2]["content"][0]["text"]
    assert stored_answer.strip() == answer.text.removesuffix(STOPPED_NOTE), (
        "the follow-up sees the text so far"
    )
    await fake.press_button(follow_up_id, world.alice, follow_up_button)  # no need for 1,024 more tokens
    await world.bot.wait_reply(channel, after=known + 1)


async def test_a_moderator_stops_one_answer_and_the_other_goes_on(world: World) -> None:
    fake = world.fake
    known = len(world.bot.replies)
    with world.bot.hold_engine() as release:  # both questions start together (one batch in process)
        await world.ask("batch-a", world.alice, "describe everything")
        await world.ask("batch-b", world.alice, "describe everything")
        await world.bot.wait_engine(lambda stats: stats.running + stats.queued == 2)
        release.set()
        message_id, button = await world.stop_button("batch-a")
        await fake.press_button(message_id, world.moderator, button, manage_messages=True)
        for channel in ("batch-a", "batch-b"):
            await world.bot.wait_reply(world.channels[channel], after=known, timeout=LONG_ANSWER_SECONDS)
    answers = {
        fake.messages[message_id]["channel_id"]: answer for answer, message_id in world.bot.replies[known:]
    }
    stopped, finished = answers[str(world.channels["batch-a"])], answers[str(world.channels["batch-b"])]
    assert stopped.stopped and not finished.stopped
    assert len(finished.text) > len(stopped.text)


async def test_a_user_over_the_in_flight_limit_is_told_privately_by_dm(world: World) -> None:
    fake = world.fake
    known = len(world.bot.replies)
    with world.bot.hold_engine() as release:
        await world.ask("limits-a", world.carol, "one")
        await world.ask("limits-b", world.carol, "two")
        await world.bot.wait_engine(lambda stats: stats.running + stats.queued == 2)
        await world.ask("limits-c", world.carol, "three")
        sentence = UserLimited.busy(2).user_message
        dm = await fake.wait_for_request(
            lambda r: r.method == "POST" and r.path.endswith("/users/@me/channels")
        )
        assert int(dm.body["recipient_id"]) == world.carol.id
        told = await fake.wait_for_message(
            fake.dm_channel_of(world.carol) or 0, lambda m: sentence in m["content"]
        )
        assert str(world.channels["limits-c"]) in told["content"], "the DM links the refused question"
        token = await fake.slash_command(
            world.channels["limits-c"], world.carol, "ask", [{"name": "question", "type": 3, "value": "four"}]
        )
        callback = await fake.wait_for_request(
            lambda r: r.method == "POST" and f"/{token}/callback" in r.path
        )
        assert callback.body["type"] == 4 and callback.body["data"]["flags"] == EPHEMERAL_FLAG
        assert callback.body["data"]["content"] == sentence
        release.set()
        for channel in ("limits-a", "limits-b"):
            await world.bot.wait_reply(world.channels[channel], after=known, timeout=LONG_ANSWER_SECONDS)
    shown = fake.bot_messages(world.channels["limits-c"])
    assert shown and all(message["flags"] & EPHEMERAL_FLAG for message in shown), "refused privately only"
    assert await world.stats(world.scope("limits-c")) == (0, 0)


async def test_a_user_asking_too_fast_is_told_when_to_try_again(world: World) -> None:
    fake, channel = world.fake, world.channels["rate"]
    notes = b"not a picture\n" * 8
    for number in range(3):  # the burst: every admitted question counts, also one that fails (quickly)
        name = f"notes-{number}.txt"
        attachment = fake.attachment(fake.add_file(name, notes, "text/plain"), name, len(notes), "text/plain")
        question = await fake.send_message(
            channel, world.dave, f"{fake.bot.mention} read this", attachments=[attachment]
        )
        await fake.wait_for_message(channel, lambda m, q=question: _replies_to(m, q))
    refused = await world.ask("rate", world.dave, "one more")
    # dave takes no DMs: a short reply in the channel instead, which deletes itself later.
    notice = await fake.wait_for_message(channel, lambda m: _replies_to(m, refused))
    assert notice["content"].startswith("You're asking faster than I can keep up. Please try again in ")
    assert await world.stats(world.scope("rate")) == (0, 0)


async def test_an_answer_longer_than_the_message_limit_arrives_as_answer_md(world: World) -> None:
    fake, channel = world.fake, world.channels["long"]
    known = len(world.bot.replies)
    await world.ask("long", world.alice, "tell me a very long story")  # ~5,000 characters from the tiny model
    reply_id = await world.bot.wait_reply(channel, after=known, timeout=LONG_ANSWER_SECONDS)
    answer = world.bot.replies[-1][0]
    assert len(answer.text) > 2000, "more than one message's worth"
    shown = fake.messages[reply_id]
    (attachment,) = shown["attachments"]
    assert attachment["filename"] == "answer.md"
    assert fake.file_data(attachment["url"]).decode() == answer.text
    assert len(shown["content"]) <= 2000 and shown["content"].endswith("attached as answer.md.")
    assert answer.text.startswith(shown["content"].split("\n\n-# ")[0][:200])
    assert [m["id"] for m in fake.bot_messages(channel)] == [shown["id"]], "one message, no wall of text"


async def test_an_ask_command_answer_has_the_stop_button_too(world: World) -> None:
    fake, channel = world.fake, world.channels["stop"]
    known = len(world.bot.replies)
    token = await fake.slash_command(
        channel, world.bob, "ask", [{"name": "question", "type": 3, "value": "tell me a very long story"}]
    )
    message_id, button = await world.stop_button("stop")
    await fake.press_button(message_id, world.bob, button)
    reply_id = await world.bot.wait_reply(channel, after=known)
    assert reply_id == message_id, "the deferred response is the answer"
    assert world.bot.replies[-1][0].stopped
    edits = fake.requests_to("PATCH", f"/{token}/messages/@original")
    assert edits[-1].body["components"] == [], "the final edit removes the button"
