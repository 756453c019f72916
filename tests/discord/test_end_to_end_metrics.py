"""Metrics and health, scraped over HTTP while the real bot answers on the loopback Discord.

The real discord.py client, answering service and tiny model (in-process engine, one request per batch so the
queue is easy to read); the health endpoints on an ephemeral port of 127.0.0.1. Each test reads /metrics
before and after acting and checks that its counters moved by exactly what it did.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from bot.errors import UnsupportedMediaType
from tests.discord.harness import TOKEN, GuildWorld, RunningBot, bot_settings, png_bytes
from tests.fakediscord.server import FakeDiscord, FakeUser

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHANNELS = ["main", "refused", "limited", "left", "right"]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class World(GuildWorld):
    alice: FakeUser
    readyz_before_connect: tuple[int, str]

    async def scrape(self) -> Samples:
        status, text = await self.bot.get("/metrics")
        assert status == 200
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    async def ask(self, channel: str, text: str, **options: object) -> int:
        """Alice mentions the bot in `channel`; returns the Discord id of the reply linked to the answer."""
        known = len(self.bot.replies)
        await self.fake.send_message(
            self.channels[channel], self.alice, f"{self.fake.bot.mention} {text}", **options
        )
        return await self.bot.wait_reply(self.channels[channel], after=known)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name` with exactly `labels`, 0 when absent (a labelled counter not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    fake = FakeDiscord(token=TOKEN)
    guild_id, channel_ids, _roles = fake.add_guild("Guild", CHANNELS)
    await fake.start()
    settings = bot_settings(
        tiny_model_dir,
        tmp_path_factory.mktemp("bot-data"),
        fake,
        {},
        engine={"max_batch_size": 1},
        health=True,
    )
    bot = RunningBot(settings, fake)
    seen: list[tuple[int, str]] = []

    async def read_readiness() -> None:
        seen.append(await bot.get("/readyz"))

    await bot.start(before_connect=read_readiness)
    try:
        channels = dict(zip(CHANNELS, channel_ids, strict=True))
        yield World(fake, bot, guild_id, channels, fake.add_user("alice"), seen[0])
    finally:
        await bot.stop()
        await fake.close()


async def test_ready_only_once_the_gateway_is_connected(world: World) -> None:
    status, body = world.readyz_before_connect
    assert status == 503
    assert body.splitlines() == ["not ready", "gateway: not connected to the Discord gateway yet"]
    assert await world.bot.get("/readyz") == (200, "ready\n")
    assert await world.bot.get("/healthz") == (200, "ok\n")


async def test_an_answered_question_moves_its_counters(world: World) -> None:
    before = await world.scrape()
    image = png_bytes()
    attachment = world.fake.attachment(
        world.fake.add_file("m.png", image, "image/png"), "m.png", len(image), "image/png"
    )
    await world.ask("main", "what is this?", attachments=[attachment])
    after = await world.scrape()
    result = world.bot.results[-1]
    assert result.completion_tokens > 0
    assert moved(before, after, "qwenbot_questions_total", outcome="answered", error="") == 1
    assert moved(before, after, "qwenbot_generated_tokens_total") == result.completion_tokens
    assert moved(before, after, "qwenbot_answer_seconds_count") == 1
    assert moved(before, after, "qwenbot_first_text_seconds_count") == 1
    assert value(after, "qwenbot_first_text_seconds_sum") <= value(after, "qwenbot_answer_seconds_sum")
    assert moved(before, after, "qwenbot_media_bytes_count") == 1
    assert moved(before, after, "qwenbot_media_bytes_sum") == len(image)
    assert moved(before, after, "qwenbot_batch_size_count") == 1
    assert moved(before, after, "qwenbot_batch_size_bucket", le="1.0") == 1
    assert value(after, "qwenbot_model_load_seconds") > 0


async def test_a_refused_attachment_is_counted_by_its_class(world: World) -> None:
    fake, channel = world.fake, world.channels["refused"]
    data = b"just some text, not an image at all\n" * 4
    url = fake.add_file("notes.txt", data, "text/plain")
    before = await world.scrape()
    question = await fake.send_message(
        channel,
        world.alice,
        f"{fake.bot.mention} look",
        attachments=[fake.attachment(url, "notes.txt", len(data), "text/plain")],
    )
    await fake.wait_for_message(
        channel,
        lambda m: (
            int(m.get("message_reference", {}).get("message_id", 0)) == int(question["id"])
            and m["content"] == UnsupportedMediaType.user_message
        ),
    )
    after = await world.scrape()
    assert moved(before, after, "qwenbot_media_failures_total", error="UnsupportedMediaType") == 1
    failed = moved(before, after, "qwenbot_questions_total", outcome="failed", error="UnsupportedMediaType")
    assert failed == 1
    assert moved(before, after, "qwenbot_questions_total", outcome="answered", error="") == 0


async def test_a_429_from_discord_is_counted_and_the_answer_still_arrives(world: World) -> None:
    channel = world.channels["limited"]
    world.fake.rate_limit_next("POST", f"/channels/{channel}/messages")
    before = await world.scrape()
    reply_id = await world.ask("limited", "hello")
    after = await world.scrape()
    assert moved(before, after, "qwenbot_discord_http_errors_total", status="429") == 1
    assert len(world.fake.requests_to("POST", f"/channels/{channel}/messages")) == 2, (
        "the 429, then the retry"
    )
    assert world.fake.messages[reply_id]["content"]


async def test_queue_depth_and_running_requests_while_the_engine_is_busy(world: World) -> None:
    fake, bot = world.fake, world.bot
    known = len(bot.replies)
    with bot.hold_engine() as gate:
        await fake.send_message(world.channels["left"], world.alice, f"{fake.bot.mention} first")
        await fake.send_message(world.channels["right"], world.alice, f"{fake.bot.mention} second")
        await bot.wait_engine(lambda stats: stats.running == 1 and stats.queued == 1)
        busy = await world.scrape()
        gate.set()
        for channel in ("left", "right"):
            await bot.wait_reply(world.channels[channel], after=known)
    assert value(busy, "qwenbot_queue_depth") == 1
    assert value(busy, "qwenbot_running_requests") == 1
    idle = await world.scrape()
    assert value(idle, "qwenbot_queue_depth") == 0
    assert value(idle, "qwenbot_running_requests") == 0


async def test_not_ready_once_the_database_is_closed(world: World) -> None:  # last: it breaks the bot
    assert world.bot.service is not None
    await world.bot.service._store.close()
    status, body = await world.bot.get("/readyz")
    assert status == 503
    assert body.splitlines() == ["not ready", "database: the database is closed"]
    assert (await world.bot.get("/healthz"))[0] == 200
