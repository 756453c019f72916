"""End to end with other settings: answers in new threads, a configured gateway, a small busy queue, and the
failure sentences of commands and messages.

One fake Discord server and one bot serve the module; the bot has `answer_in_new_thread`, a configured
`gateway_url`, `max_batch_size = 1` and `max_queue_size = 1`. A busy engine is made by holding every batch
at the device boundary (`RunningBot.hold_engine`) until the test lets it run on the real tiny model. The
module runs twice: in process, and through a real inference server with `max_in_flight = 1`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from bot.discord.commands import NO_ATTACHMENTS
from bot.errors import EmptyQuestion, QueueFull, TooManyImages, Unreachable, UnsupportedMediaType
from tests.discord.harness import TOKEN, GuildWorld, RunningBot, backend_proxy, bot_settings, image_parts
from tests.fakediscord.payloads import snowflake
from tests.fakediscord.server import EPHEMERAL_FLAG, FakeDiscord, FakeUser

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHANNELS = [
    "threads",
    "busy",
    "waiting",
    "asking",
    "full-a",
    "full-b",
    "full-c",
    "inputs",
    "ask",
    "menu",
    "late",
    "fresh",
]
MAX_IMAGES = 2  # vision.max_images_per_message in the harness settings


@dataclass
class World(GuildWorld):
    alice: FakeUser

    async def ask(self, channel: str, text: str, **options: object) -> int:
        """Alice mentions the bot in `channel`; returns the question's id (the id of the thread it opens)."""
        message = await self.fake.send_message(
            self.channels[channel], self.alice, f"{self.fake.bot.mention} {text}".rstrip(), **options
        )
        return int(message["id"])


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=["local", "server"])
async def world(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    async with backend_proxy(request, request.param) as proxy:
        fake = FakeDiscord(token=TOKEN)
        guild_id, channel_ids, _roles = fake.add_guild("Guild", CHANNELS)
        await fake.start()
        settings = bot_settings(
            tiny_model_dir,
            tmp_path_factory.mktemp("bot-data"),
            fake,
            {"answer_in_new_thread": True, "gateway_url": fake.gateway_url, "shard_count": 1},
            engine={"max_batch_size": 1, "max_queue_size": 1},
            server=proxy,
            server_options={"max_in_flight": 1},
        )
        bot = RunningBot(settings, fake, proxy)
        await bot.start()
        try:
            channels = dict(zip(CHANNELS, channel_ids, strict=True))
            yield World(fake, bot, guild_id, channels, fake.add_user("alice"))
        finally:
            await bot.stop()
            await fake.close()


def _posts(world: World, channel_id: int) -> list[dict]:
    """The messages the bot posted in a channel (not the threads it started there)."""
    path = f"/channels/{channel_id}/messages"
    return [request.body for request in world.fake.requests_to("POST", path) if request.path.endswith(path)]


async def test_a_configured_gateway_and_shard_count_are_used_without_asking_discord(world: World) -> None:
    fake = world.fake
    assert world.bot.settings.discord.gateway_url == fake.gateway_url
    assert [payload["shard"] for payload in fake.identify_payloads] == [[0, 1]], "identified on that gateway"
    assert fake.requests_to("GET", "/users/@me"), "the bot logged in over REST"
    assert not fake.requests_to("GET", "/gateway/bot")


async def test_a_mention_is_answered_in_a_new_thread_that_remembers_it(world: World) -> None:
    fake, channel = world.fake, world.channels["threads"]
    known = len(world.bot.replies)
    question_id = await world.ask("threads", "what is in this picture?", attachments=[world.image("t.png")])
    thread_id = question_id  # a thread started from a message has the message's id
    reply_id = await world.bot.wait_reply(thread_id, after=known)

    (opened,) = fake.requests_to("POST", f"/channels/{channel}/messages/{question_id}/threads")
    assert opened.body["name"] == "what is in this picture?"
    assert _posts(world, channel) == [], "nothing is posted in the channel itself"
    first_post = _posts(world, thread_id)[0]
    assert "message_reference" not in first_post, "the thread's starter is the question; no reply needed"
    assert fake.messages[reply_id]["content"] == world.bot.replies[-1][0].text
    assert await world.stats(world.scope("threads", thread_id)) == (1, 1)
    assert await world.stats(world.scope("threads")) == (0, 0)

    # In the bot's thread a follow-up needs no mention, and it sees the first turn.
    await fake.send_message(thread_id, world.alice, "and what colour is it?")
    await world.bot.wait_reply(thread_id, after=known + 1)
    assert await world.stats(world.scope("threads", thread_id)) == (2, 1)
    prompt = world.bot.prompts[-1]
    assert len(image_parts(prompt)) == 1
    assert "what is in this picture?" in str(prompt) and "and what colour is it?" in str(prompt)
    assert len(fake.requests_to("POST", "/threads")) == 1, "no thread is opened from inside a thread"


async def test_a_new_thread_starts_without_the_channels_earlier_turns(world: World) -> None:
    fake, channel = world.fake, world.channels["fresh"]
    known = len(world.bot.replies)
    earlier = [{"name": "question", "type": 3, "value": "earlier"}]
    await fake.slash_command(channel, world.alice, "ask", earlier)
    await world.bot.wait_reply(channel, after=known)
    assert await world.stats(world.scope("fresh")) == (1, 0)
    thread_id = await world.ask("fresh", "a new topic")
    await world.bot.wait_reply(thread_id, after=known + 1)
    assert await world.stats(world.scope("fresh", thread_id)) == (1, 0)
    assert "earlier" not in str(world.bot.prompts[-1])


async def test_a_redelivered_question_is_answered_once_in_its_thread(world: World) -> None:
    fake, channel = world.fake, world.channels["threads"]
    known = len(world.bot.replies)
    question = await fake.send_message(channel, world.alice, f"{fake.bot.mention} just once please")
    await fake.redeliver(question)  # at once: both deliveries race to open the thread
    thread_id = int(question["id"])
    await world.bot.wait_reply(thread_id, after=known)
    opened = len(fake.requests_to("POST", f"/messages/{thread_id}/threads"))  # 1, or 2 if both raced
    await fake.redeliver(question)  # later: the thread is in the cache
    await asyncio.sleep(1.0)
    assert _posts(world, channel) == [], "never answered inline in the channel"
    assert len(_posts(world, thread_id)) == 1
    assert len(fake.requests_to("POST", f"/messages/{thread_id}/threads")) == opened, "the thread is reused"
    assert await world.stats(world.scope("threads", thread_id)) == (1, 0)


async def test_a_waiting_question_shows_its_place_then_becomes_the_answer(world: World) -> None:
    fake = world.fake
    known = len(world.bot.replies)
    with world.bot.hold_engine() as gate:
        busy = await world.ask("busy", "first question")
        await world.bot.wait_engine(lambda stats: stats.running == 1)
        waiting = await world.ask("waiting", "second question")
        placeholder = await fake.wait_for_message(waiting)
        placeholder_id, shown = int(placeholder["id"]), placeholder["content"]
        assert await world.stats(world.scope("waiting", waiting)) == (0, 0), "still waiting"
        gate.set()
        reply_id = await world.bot.wait_reply(waiting, after=known)
        await world.bot.wait_reply(busy, after=known)

    assert shown == "⏳ 1 question ahead of yours…"
    assert reply_id == placeholder_id, "the placeholder is edited into the answer"
    (answer,) = [entry[0] for entry in world.bot.replies[known:] if entry[1] == reply_id]
    assert fake.messages[reply_id]["content"] == answer.text
    edits = fake.requests_to("PATCH", f"/channels/{waiting}/messages/{reply_id}")
    assert edits[-1].body["content"] == answer.text
    assert [post["content"] for post in _posts(world, waiting)] == [shown], "one message, edited"
    assert "ahead of yours" not in "".join(post["content"] for post in _posts(world, busy))
    assert await world.stats(world.scope("waiting", waiting)) == (1, 0)


async def test_a_waiting_ask_command_shows_its_place_in_the_deferred_response(world: World) -> None:
    fake = world.fake
    known = len(world.bot.replies)
    with world.bot.hold_engine() as gate:
        busy = await world.ask("busy", "keeps the engine busy")
        await world.bot.wait_engine(lambda stats: stats.running == 1)
        token = await fake.slash_command(
            world.channels["asking"], world.alice, "ask", [{"name": "question", "type": 3, "value": "hi?"}]
        )
        shown = await fake.wait_for_request(
            lambda r: r.method == "PATCH" and r.path.endswith(f"/{token}/messages/@original")
        )
        assert shown.body["content"] == "⏳ 1 question ahead of yours…"
        gate.set()
        reply_id = await world.bot.wait_reply(world.channels["asking"], after=known)
        await world.bot.wait_reply(busy, after=known)
    (answer,) = [entry[0] for entry in world.bot.replies[known:] if entry[1] == reply_id]
    assert fake.requests_to("PATCH", f"/{token}/messages/@original")[-1].body["content"] == answer.text
    assert fake.messages[reply_id]["content"] == answer.text
    assert not fake.requests_to("POST", f"/webhooks/{fake.application_id}/{token}"), "no follow-up needed"
    assert await world.stats(world.scope("asking")) == (1, 0)


async def test_a_question_over_the_queue_limit_is_told_to_come_back(world: World) -> None:
    fake = world.fake
    known = len(world.bot.replies)
    with world.bot.hold_engine() as gate:
        running = await world.ask("full-a", "first")
        await world.bot.wait_engine(lambda stats: stats.running == 1)
        queued = await world.ask("full-b", "second")
        await world.bot.wait_engine(lambda stats: stats.queued == 1)
        overflow = await world.ask("full-c", "third")
        refused = await fake.wait_for_message(overflow)
        assert refused["content"] == QueueFull.user_message
        gate.set()
        for thread_id in (running, queued):
            await world.bot.wait_reply(thread_id, after=known)

    assert await world.stats(world.scope("full-a", running)) == (1, 0)
    assert await world.stats(world.scope("full-b", queued)) == (1, 0)
    assert await world.stats(world.scope("full-c", overflow)) == (0, 0)
    assert [post["content"] for post in _posts(world, overflow)] == [QueueFull.user_message]


async def _assert_refused_inline(world: World, question_id: int, sentence: str) -> None:
    """`sentence` replies to the question in its channel; no thread was opened for it, nothing stored."""
    fake, channel = world.fake, world.channels["inputs"]
    reply = await fake.wait_for_message(channel, lambda m: m["content"] == sentence)
    assert int(reply["message_reference"]["message_id"]) == question_id
    assert not fake.requests_to("POST", f"/messages/{question_id}/threads"), "no empty thread opened"
    assert await world.stats(world.scope("inputs")) == (0, 0)
    assert await world.stats(world.scope("inputs", question_id)) == (0, 0)


async def test_a_bare_mention_is_asked_for_a_question_without_opening_a_thread(world: World) -> None:
    question_id = await world.ask("inputs", "")
    await _assert_refused_inline(world, question_id, EmptyQuestion.user_message)


async def test_too_many_images_are_refused_before_downloading(world: World) -> None:
    names = [f"many-{index}.png" for index in range(MAX_IMAGES + 1)]
    images = [world.image(name) for name in names]
    question_id = await world.ask("inputs", "compare these", attachments=images)
    sentence = TooManyImages(limit=MAX_IMAGES).user_message
    assert "up to 2 per message" in sentence
    await _assert_refused_inline(world, question_id, sentence)
    assert not [name for name in names if world.fake.requests_to("GET", f"/cdn/{name}")]


async def _assert_failure_shown_privately(world: World, channel: str, token: str, sentence: str) -> None:
    """The public "thinking" response is gone and `sentence` is an ephemeral follow-up; nothing stored."""
    fake = world.fake
    callback = await fake.wait_for_request(lambda r: r.method == "POST" and f"/{token}/callback" in r.path)
    assert callback.body["type"] == 5 and not callback.body.get("data", {}).get("flags"), "public deferral"
    followup = await fake.wait_for_request(lambda r: r.method == "POST" and r.path.endswith(f"/{token}"))
    assert followup.body["content"] == sentence
    assert followup.body["flags"] == EPHEMERAL_FLAG
    assert fake.requests_to("DELETE", f"/{token}/messages/@original")
    assert not fake.requests_to("PATCH", f"/{token}/messages/@original"), "the error was never public"
    shown = fake.bot_messages(world.channels[channel])
    assert shown and all(message["flags"] & EPHEMERAL_FLAG for message in shown)
    assert await world.stats(world.scope(channel)) == (0, 0)


async def test_ask_with_a_file_that_is_not_an_image_fails_privately(world: World) -> None:
    fake = world.fake
    data = b"just some notes, not a picture\n" * 4
    attachment = fake.attachment(fake.add_file("notes.txt", data, "text/plain"), "notes.txt", len(data), None)
    token = await fake.slash_command(
        world.channels["ask"],
        world.alice,
        "ask",
        [
            {"name": "question", "type": 3, "value": "what is this?"},
            {"name": "image", "type": 11, "value": attachment["id"]},
        ],
        resolved={"attachments": {attachment["id"]: attachment}},
    )
    await _assert_failure_shown_privately(world, "ask", token, UnsupportedMediaType.user_message)
    assert fake.requests_to("GET", "/cdn/notes.txt"), "the file was downloaded and sniffed"


async def test_the_image_menu_on_a_dead_link_fails_privately(world: World) -> None:
    fake, channel = world.fake, world.channels["menu"]
    dead = fake.attachment(fake.missing_file_url("gone.png"), "gone.png", 1234, "image/png")
    target = await fake.send_message(channel, world.alice, "my old picture", attachments=[dead])
    token = await fake.context_menu(channel, world.alice, "Ask about this image", int(target["id"]))
    await _assert_failure_shown_privately(world, "menu", token, Unreachable.user_message)
    assert fake.requests_to("GET", "/cdn/gone.png")


async def test_the_image_menu_on_a_message_without_attachments_says_so_privately(world: World) -> None:
    fake, channel = world.fake, world.channels["menu"]
    target = await fake.send_message(channel, world.alice, "no picture here")
    token = await fake.context_menu(channel, world.alice, "Ask about this image", int(target["id"]))
    # Known before any work: said at once, privately, with no public "thinking…" first.
    callback = await fake.wait_for_request(lambda r: r.method == "POST" and f"/{token}/callback" in r.path)
    assert callback.body["type"] == 4
    assert callback.body["data"]["content"] == NO_ATTACHMENTS
    assert callback.body["data"]["flags"] == EPHEMERAL_FLAG
    followups = [r for r in fake.requests if r.method == "POST" and r.path.endswith(f"/{token}")]
    assert not followups, "no follow-up"
    assert await world.stats(world.scope("menu")) == (0, 0)


async def test_a_failure_after_the_interaction_token_expired_is_said_in_the_channel(world: World) -> None:
    fake, channel = world.fake, world.channels["late"]
    dead = fake.attachment(fake.missing_file_url("late.png"), "late.png", 1234, "image/png")
    token = await fake.slash_command(
        channel,
        world.alice,
        "ask",
        [
            {"name": "question", "type": 3, "value": "what was this?"},
            {"name": "image", "type": 11, "value": dead["id"]},
        ],
        resolved={"attachments": {dead["id"]: dead}},
        interaction_id=snowflake(at=time.time() - 16 * 60),
    )
    said = await fake.wait_for_message(channel, lambda m: Unreachable.user_message in m["content"])
    assert said["content"] == f"{world.alice.mention} {Unreachable.user_message}"
    assert said["allowed_mentions"]["parse"] == [], "the mention names the user without pinging anyone"
    assert not [r for r in fake.requests if f"/webhooks/{fake.application_id}/{token}" in r.path], (
        "an expired token is not used"
    )
    assert await world.stats(world.scope("late")) == (0, 0)


async def test_the_token_never_appears_in_logs(world: World) -> None:
    assert world.bot.log.lines
    assert not [line for line in world.bot.log.lines if TOKEN in line]
