"""Through Discord, what only the server backend can meet: the inference server failing under the bot.

The real discord.py client and answering service, a real `transformers serve` on the tiny model, and the
loopback proxy in front of it for the faults (down, 503s, a stream cut in the middle).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from bot.errors import AnswerIncomplete, BotError, ServerUnavailable, VideoNotSupported
from tests.discord.harness import TOKEN, GuildWorld, RunningBot, backend_proxy, bot_settings
from tests.fakediscord.server import FakeDiscord, FakeUser
from tests.inference.proxy import Fault, InferenceProxy
from tests.media.factories import video

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHANNELS = ["down", "busy", "cut", "video"]


@dataclass
class World(GuildWorld):
    alice: FakeUser
    proxy: InferenceProxy

    async def ask(self, channel: str, text: str, until: Callable[[str], bool], **options: object) -> str:
        """Alice mentions the bot in `channel`; returns the reply's content once `until(content)` holds."""
        fake, channel_id = self.fake, self.channels[channel]
        question = await fake.send_message(channel_id, self.alice, f"{fake.bot.mention} {text}", **options)

        def answers(message: dict) -> bool:
            reference = message.get("message_reference") or {}
            return int(reference.get("message_id", 0)) == int(question["id"]) and until(message["content"])

        return (await fake.wait_for_message(channel_id, answers))["content"]


def is_sentence(error: type[BotError]) -> Callable[[str], bool]:
    return lambda content: content == error.user_message


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    async with backend_proxy(request, "server") as proxy:
        fake = FakeDiscord(token=TOKEN)
        guild_id, channel_ids, _roles = fake.add_guild("Guild", CHANNELS)
        await fake.start()
        settings = bot_settings(
            tiny_model_dir,
            tmp_path_factory.mktemp("bot-data"),
            fake,
            {},
            server=proxy,
            server_options={"retry_deadline_seconds": 1.0},
        )
        bot = RunningBot(settings, fake, proxy)
        await bot.start()
        channels = dict(zip(CHANNELS, channel_ids, strict=True))
        assert proxy is not None
        try:
            yield World(fake, bot, guild_id, channels, fake.add_user("alice"), proxy)
        finally:
            await bot.stop()
            await fake.close()


async def test_a_server_down_mid_run_is_one_sentence_and_nothing_is_stored(world: World) -> None:
    await world.proxy.go_down()
    try:
        await world.ask(
            "down", "are you there?", is_sentence(ServerUnavailable), attachments=[world.image("down.png")]
        )
    finally:
        await world.proxy.come_back()
    assert await world.stats(world.scope("down")) == (0, 0)

    known = len(world.bot.replies)
    await world.ask("down", "and now?", lambda content: True)
    answer_id = await world.bot.wait_reply(world.channels["down"], after=known)
    assert world.fake.messages[answer_id]["content"].strip()
    assert await world.stats(world.scope("down")) == (1, 0)


async def test_a_server_failing_past_the_retry_deadline_is_one_sentence(world: World) -> None:
    world.proxy.faults.extend([Fault(status=503)] * 50)
    try:
        await world.ask("busy", "hello?", is_sentence(ServerUnavailable))
    finally:
        world.proxy.faults.clear()
    assert await world.stats(world.scope("busy")) == (0, 0)


async def test_a_stream_cut_midway_shows_the_text_marked_incomplete_and_stores_nothing(world: World) -> None:
    world.proxy.faults.append(Fault(cut_after_text=True))
    content = await world.ask(
        "cut", "tell me a story", lambda content: content.endswith(AnswerIncomplete.note)
    )
    assert content.removesuffix(AnswerIncomplete.note).strip(), "the text shown so far stays"
    assert await world.stats(world.scope("cut")) == (0, 0)


async def test_a_video_is_refused_in_one_sentence_when_the_server_takes_none(world: World) -> None:
    data = video("mp4", "mpeg4")
    url = world.fake.add_file("clip.mp4", data, "video/mp4")
    attachment = world.fake.attachment(url, "clip.mp4", len(data), "video/mp4")
    await world.ask("video", "what happens here?", is_sentence(VideoNotSupported), attachments=[attachment])
    assert await world.stats(world.scope("video")) == (0, 0)
