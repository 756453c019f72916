"""The real discord.py client over a real websocket, the real answering service on the tiny model.

One fake Discord server and one bot serve the whole module (each test uses its own channels). Tests play
users on the fake server and assert what the bot sent over REST and what the store holds. The module runs
twice: with the in-process engine, and through a real inference server (`transformers serve`).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from bot.answering import UNSAVED_NOTE
from bot.content import ConversationScope
from bot.discord.commands import NOT_ALLOWED_HERE
from bot.errors import CorruptMedia, Unreachable, UnsupportedMediaType
from tests.discord.harness import TOKEN, GuildWorld, RunningBot, backend_proxy, bot_settings, image_parts
from tests.fakediscord.payloads import snowflake
from tests.fakediscord.server import FakeDiscord, FakeUser, RecordedRequest
from tests.inference.proxy import sent_image_count

pytestmark = pytest.mark.asyncio(loop_scope="module")

SAFE_MENTIONS = {"parse": [], "replied_user": True}
CHANNELS = [
    "main",
    "errors",
    "left",
    "right",
    "dupes",
    "commands",
    "menu",
    "restricted",
    "forwards",
    "roles",
    "threads",
    "locked",
]


@dataclass
class World(GuildWorld):
    alice: FakeUser
    bob: FakeUser
    outsider: FakeUser  # a member of the guild without the allowed role
    stranger: FakeUser  # no member of the guild
    other_bot: FakeUser
    dm_channel: int
    outsider_dm: int
    stranger_dm: int


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=["local", "server"])
async def world(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    async with backend_proxy(request, request.param) as proxy:
        fake = FakeDiscord(token=TOKEN)
        guild_id, channel_ids, (member_role,) = fake.add_guild("Guild", CHANNELS, ("members",))
        channels = dict(zip(CHANNELS, channel_ids, strict=True))
        alice = fake.add_user("alice", role_ids=[member_role], guild_ids=[guild_id])
        outsider, stranger = fake.add_user("outsider", guild_ids=[guild_id]), fake.add_user("stranger")
        await fake.start()
        settings = bot_settings(
            tiny_model_dir,
            tmp_path_factory.mktemp("bot-data"),
            fake,
            {
                "allowed_channel_ids": [
                    channel for name, channel in channels.items() if name != "restricted"
                ],
                "allowed_role_ids": [member_role],
            },
            server=proxy,
            # A database locked by another process fails a try within 0.2 s; turns are retried for 2 s.
            storage={"sqlite_busy_timeout_ms": 200, "write_retry_seconds": 2.0},
        )
        bot = RunningBot(settings, fake, proxy)
        await bot.start()
        try:
            yield World(
                fake=fake,
                bot=bot,
                guild_id=guild_id,
                channels=channels,
                alice=alice,
                bob=fake.add_user("bob", role_ids=[member_role], guild_ids=[guild_id]),
                outsider=outsider,
                stranger=stranger,
                other_bot=fake.add_user("otherbot", bot=True, role_ids=[member_role], guild_ids=[guild_id]),
                dm_channel=fake.add_dm_channel(alice),
                outsider_dm=fake.add_dm_channel(outsider),
                stranger_dm=fake.add_dm_channel(stranger),
            )
        finally:
            await bot.stop()
            await fake.close()


def _posts(world: World, channel_id: int) -> list[dict]:
    return [request.body for request in world.fake.requests_to("POST", f"/channels/{channel_id}/messages")]


async def test_connects_through_the_advertised_gateway_and_syncs_commands(world: World) -> None:
    fake = world.fake
    assert fake.requests_to("GET", "/gateway/bot"), "gateway_url unset: the bot asks GET /gateway/bot"
    assert fake.identify_payloads[0]["shard"] == [0, fake.shard_count], "all the recommended shards, here"
    assert fake.identify_payloads[0]["intents"] & (1 << 15), "MESSAGE_CONTENT intent requested"
    names = sorted((command["name"], command["type"]) for command in fake.commands)
    assert names == [("Ask about this image", 3), ("ask", 1), ("history", 1), ("reset", 1)]


async def test_image_mention_is_downloaded_and_answered_as_a_safe_reply(world: World) -> None:
    fake, channel = world.fake, world.channels["main"]
    known = len(world.bot.replies)
    question = await fake.send_message(
        channel,
        world.alice,
        f"{fake.bot.mention} what is in this picture?",
        attachments=[world.image("red.png")],
    )
    reply_id = await world.bot.wait_reply(channel, after=known)
    reply = fake.messages[reply_id]
    first_post = _posts(world, channel)[0]
    assert int(first_post["message_reference"]["message_id"]) == int(question["id"])
    assert first_post["allowed_mentions"] == SAFE_MENTIONS
    assert reply["content"].strip()
    assert reply["content"] == world.bot.replies[-1][0].text
    assert fake.requests_to("GET", "/cdn/red.png"), "the image came from the loopback CDN"
    if world.bot.proxy is not None:
        assert sent_image_count(world.bot.proxy.bodies[-1]) == 1, "answered by the inference server"
    assert fake.requests_to("POST", f"/channels/{channel}/typing")
    assert await world.stats(world.scope("main")) == (1, 1)
    prompt = world.bot.prompts[-1]
    assert len(image_parts(prompt)) == 1
    assert "what is in this picture?" in str(prompt[-1]["content"]) and fake.bot.mention not in str(prompt)


async def test_a_turn_the_locked_database_never_takes_is_shown_then_noted_as_unsaved(world: World) -> None:
    fake, channel = world.fake, world.channels["locked"]
    known = len(world.bot.replies)
    await fake.send_message(channel, world.alice, f"{fake.bot.mention} remember this")
    await world.bot.wait_reply(channel, after=known)  # the conversation exists, with its first turn
    other_process = sqlite3.connect(world.bot.settings.storage.data_dir / "bot.sqlite3", isolation_level=None)
    try:
        other_process.execute("BEGIN IMMEDIATE")  # holds the write lock past the 2 s of retries
        await fake.send_message(channel, world.alice, f"{fake.bot.mention} and this?")
        noted = await fake.wait_for_message(channel, lambda posted: posted["content"].endswith(UNSAVED_NOTE))
    finally:
        if other_process.in_transaction:
            other_process.execute("ROLLBACK")
        other_process.close()
    answer = noted["content"].removesuffix(UNSAVED_NOTE)
    edits = fake.requests_to("PATCH", f"/channels/{channel}/messages/{noted['id']}")
    shown = [_posts(world, channel)[-1]["content"], *(edit.body["content"] for edit in edits)]
    assert answer.strip() and shown[-2:] == [answer, noted["content"]], "the answer, then the note"
    assert await world.stats(world.scope("locked")) == (1, 0)


async def test_a_reply_without_mention_continues_the_conversation_with_the_image(world: World) -> None:
    fake, channel = world.fake, world.channels["main"]
    known = len(world.bot.replies)
    first_answer_id = world.bot.replies[-1][1]
    await fake.send_message(channel, world.alice, "and what colour is it?", reply_to=first_answer_id)
    second_reply = await world.bot.wait_reply(channel, after=known)
    assert second_reply != first_answer_id
    assert fake.messages[second_reply]["content"]
    assert await world.stats(world.scope("main")) == (2, 1)
    assert len(image_parts(world.bot.prompts[-1])) == 1, "the first turn's image is in the second prompt"


async def test_a_thread_started_from_an_answer_carries_the_context(world: World) -> None:
    fake, channel = world.fake, world.channels["main"]
    answer_id = world.bot.replies[-1][1]
    thread_id = await fake.create_thread(channel, answer_id, world.alice, "about the picture")
    known = len(world.bot.replies)
    await fake.send_message(thread_id, world.alice, f"{fake.bot.mention} tell me more")
    await world.bot.wait_reply(thread_id, after=known)
    thread_scope = world.scope("main", thread_id)
    assert await world.stats(thread_scope) == (3, 1), "two forked turns and the new one"
    assert len(image_parts(world.bot.prompts[-1])) == 1
    # In a thread the bot is part of, no mention is needed.
    await fake.send_message(thread_id, world.alice, "and one more thing")
    await world.bot.wait_reply(thread_id, after=known + 1)
    assert await world.stats(thread_scope) == (4, 1)
    assert await world.stats(world.scope("main")) == (2, 1), "the channel's conversation is untouched"


async def test_a_thread_started_from_an_answer_needs_no_mention(world: World) -> None:
    fake, channel = world.fake, world.channels["threads"]
    known = len(world.bot.replies)
    question = await fake.send_message(
        channel, world.alice, f"{fake.bot.mention} look at this", attachments=[world.image("thread.png")]
    )
    answer_id = await world.bot.wait_reply(channel, after=known)
    # A thread started from a user's message is not the bot's: no mention, no answer.
    user_thread = await fake.create_thread(channel, int(question["id"]), world.bob, "chatter")
    await fake.send_message(user_thread, world.bob, "what do you all think?")
    thread_id = await fake.create_thread(channel, answer_id, world.bob, "about the answer")
    await fake.send_message(thread_id, world.bob, "what colour was it?")
    await world.bot.wait_reply(thread_id, after=known + 1)
    assert await world.stats(world.scope("threads", thread_id)) == (2, 1), "the forked turn and the new one"
    assert len(image_parts(world.bot.prompts[-1])) == 1, "the first question sees the answer's image"
    assert _posts(world, user_thread) == []
    assert await world.stats(world.scope("threads", user_thread)) == (0, 0)


async def test_history_survives_a_restart(world: World) -> None:
    await world.bot.restart()
    assert await world.stats(world.scope("main")) == (2, 1)
    fake, channel = world.fake, world.channels["main"]
    known = len(world.bot.replies)
    await fake.send_message(channel, world.alice, f"{fake.bot.mention} still remember the picture?")
    await world.bot.wait_reply(channel, after=known)
    assert await world.stats(world.scope("main")) == (3, 1)
    assert len(image_parts(world.bot.prompts[-1])) == 1


async def test_history_and_reset_commands(world: World) -> None:
    fake, channel = world.fake, world.channels["main"]
    token = await fake.slash_command(channel, world.alice, "history")
    callback = await fake.wait_for_request(lambda r: r.method == "POST" and f"/{token}/callback" in r.path)
    assert callback.body["type"] == 5 and callback.body["data"]["flags"] == 64, "ephemeral deferral"
    shown = await fake.wait_for_request(
        lambda r: r.method == "PATCH" and f"/{token}/messages/@original" in r.path
    )
    assert shown.body["content"] == "In this channel I remember 3 turns and 1 image."

    token = await fake.slash_command(channel, world.alice, "reset")
    callback = await fake.wait_for_request(lambda r: r.method == "POST" and f"/{token}/callback" in r.path)
    assert callback.body["type"] == 5 and not callback.body.get("data", {}).get("flags")
    shown = await fake.wait_for_request(
        lambda r: r.method == "PATCH" and f"/{token}/messages/@original" in r.path
    )
    # The image stays on disk: the thread forked from this channel still uses it.
    assert shown.body["content"] == "🧹 I forgot this channel's conversation: 6 messages and 0 images."
    assert await world.stats(world.scope("main")) == (0, 0)


@pytest.mark.parametrize(
    ("name", "data", "content_type", "error"),
    [
        ("notes.txt", b"just some text, not an image at all\n" * 4, "text/plain", UnsupportedMediaType),
        ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50, "image/png", CorruptMedia),
        ("gone.png", None, "image/png", Unreachable),
    ],
)
async def test_unusable_attachments_get_their_clear_message(
    world: World, name: str, data: bytes | None, content_type: str, error: type
) -> None:
    fake, channel = world.fake, world.channels["errors"]
    url = fake.add_file(name, data, content_type) if data is not None else fake.missing_file_url(name)
    attachment = fake.attachment(url, name, len(data or b"x" * 100), content_type)
    question = await fake.send_message(
        channel, world.alice, f"{fake.bot.mention} look", attachments=[attachment]
    )
    reply = await fake.wait_for_message(
        channel, lambda m: int(m.get("message_reference", {}).get("message_id", 0)) == int(question["id"])
    )
    assert reply["content"] == error.user_message
    assert await world.stats(world.scope("errors")) == (0, 0)


async def test_two_users_in_two_channels_are_answered_at_once(world: World) -> None:
    fake = world.fake
    left, right = world.channels["left"], world.channels["right"]
    known = len(world.bot.replies)
    with world.bot.hold_engine() as gate:
        await asyncio.gather(
            fake.send_message(
                left, world.alice, f"{fake.bot.mention} hi from the left", attachments=[world.image("l.png")]
            ),
            fake.send_message(right, world.bob, f"{fake.bot.mention} hi from the right"),
        )
        # Both questions reach the engine before either is answered: neither waits for the other.
        await world.bot.wait_engine(lambda stats: stats.running + stats.queued == 2)
        gate.set()
        for channel in (left, right):
            await world.bot.wait_reply(channel, after=known)
    assert await world.stats(world.scope("left")) == (1, 1)
    assert await world.stats(world.scope("right")) == (1, 0)


async def test_bots_outsiders_and_other_channels_are_ignored(world: World) -> None:
    fake = world.fake
    mention = f"{fake.bot.mention} answer me"
    await fake.send_message(world.channels["dupes"], world.other_bot, mention)
    await fake.send_message(world.channels["dupes"], fake.bot, mention)
    await fake.send_message(world.channels["dupes"], world.outsider, mention)
    await fake.send_message(world.channels["dupes"], world.alice, "chatting without mentioning anyone")
    await fake.send_message(world.channels["restricted"], world.alice, mention)
    await asyncio.sleep(1.0)
    for channel in ("dupes", "restricted"):
        assert _posts(world, world.channels[channel]) == []
        assert await world.stats(world.scope(channel)) == (0, 0)


async def test_a_forwarded_answer_is_not_a_reply_to_the_bot(world: World) -> None:
    fake, channel = world.fake, world.channels["forwards"]
    answer_id = world.bot.replies[0][1]  # an answer of the bot in another channel, in the client's cache
    await fake.forward_message(channel, world.alice, answer_id)
    await asyncio.sleep(1.0)
    assert _posts(world, channel) == []
    assert await world.stats(world.scope("forwards")) == (0, 0)


async def test_a_duplicate_delivery_gets_one_answer(world: World) -> None:
    fake, channel = world.fake, world.channels["dupes"]
    known = len(world.bot.replies)
    question = await fake.send_message(channel, world.alice, f"{fake.bot.mention} once please")
    await fake.redeliver(question)
    await world.bot.wait_reply(channel, after=known)
    await fake.redeliver(question)
    await asyncio.sleep(1.0)
    assert len(_posts(world, channel)) == 1
    assert await world.stats(world.scope("dupes")) == (1, 0)


async def test_ask_command_with_an_image_answers_in_the_deferred_response(world: World) -> None:
    fake, channel = world.fake, world.channels["commands"]
    attachment = world.image("cmd.png")
    known = len(world.bot.replies)
    token = await fake.slash_command(
        channel,
        world.bob,
        "ask",
        [
            {"name": "question", "type": 3, "value": "what is this?"},
            {"name": "image", "type": 11, "value": attachment["id"]},
        ],
        resolved={"attachments": {attachment["id"]: attachment}},
    )
    callback = await fake.wait_for_request(lambda r: r.method == "POST" and f"/{token}/callback" in r.path)
    assert callback.body["type"] == 5
    reply_id = await world.bot.wait_reply(channel, after=known)
    assert fake.messages[reply_id]["content"] == world.bot.replies[-1][0].text
    assert fake.requests_to("PATCH", f"/{token}/messages/@original")
    assert await world.stats(world.scope("commands")) == (1, 1)


async def test_ask_after_the_token_expired_falls_back_to_a_channel_message(world: World) -> None:
    fake, channel = world.fake, world.channels["commands"]
    old_id = snowflake(at=time.time() - 16 * 60)
    known = len(world.bot.replies)
    token = await fake.slash_command(
        channel, world.bob, "ask", [{"name": "question", "type": 3, "value": "late?"}], interaction_id=old_id
    )
    known = len(world.bot.replies)
    reply_id = await world.bot.wait_reply(channel, after=known)
    posted_first = _posts(world, channel)[-1]
    assert "message_reference" not in posted_first, "a normal channel message, not an interaction response"
    assert fake.messages[reply_id]["content"] == world.bot.replies[-1][0].text
    assert not fake.requests_to("PATCH", f"/{token}/messages/@original")
    assert await world.stats(world.scope("commands")) == (2, 1)


async def test_context_menu_describes_the_target_messages_image(world: World) -> None:
    fake, channel = world.fake, world.channels["menu"]
    target = await fake.send_message(
        channel, world.bob, "look at my cat", attachments=[world.image("cat.png")]
    )
    known = len(world.bot.replies)
    token = await fake.context_menu(channel, world.alice, "Ask about this image", int(target["id"]))
    await world.bot.wait_reply(channel, after=known)
    assert fake.requests_to("PATCH", f"/{token}/messages/@original")
    assert await world.stats(world.scope("menu")) == (1, 1)
    assert "Describe this image." in str(world.bot.prompts[-1][-1]["content"])


def _member_lookups(world: World, user: FakeUser) -> list[RecordedRequest]:
    return world.fake.requests_to("GET", f"/guilds/{world.guild_id}/members/{user.id}")


async def test_a_dm_is_answered_without_a_mention(world: World) -> None:
    fake = world.fake
    known = len(world.bot.replies)
    await fake.send_message(world.dm_channel, world.alice, "hello in private")
    await world.bot.wait_reply(world.dm_channel, after=known)
    await fake.send_message(world.dm_channel, world.alice, "and again")
    await world.bot.wait_reply(world.dm_channel, after=known + 1)
    scope = ConversationScope("discord", world.dm_channel)
    assert await world.stats(scope) == (2, 0)
    assert len(_member_lookups(world, world.alice)) == 1, "the role was checked once, then remembered"


@pytest.mark.parametrize("who", ["outsider", "stranger"])
async def test_a_dm_from_someone_without_an_allowed_role_in_the_guild_is_ignored(
    world: World, who: str
) -> None:
    fake, user = world.fake, getattr(world, who)
    channel = getattr(world, f"{who}_dm")
    await fake.send_message(channel, user, "hello in private")
    await fake.wait_for_request(lambda r: r.method == "GET" and f"/members/{user.id}" in r.path)
    await fake.send_message(channel, user, "anyone there?")
    await asyncio.sleep(1.0)
    assert _posts(world, channel) == []
    assert not fake.requests_to("POST", f"/channels/{channel}/typing")
    assert await world.stats(ConversationScope("discord", channel)) == (0, 0)
    assert len(_member_lookups(world, user)) == 1, "the refusal was remembered"


@pytest.mark.parametrize("case", ["a DM without the role", "a channel not allowed"])
async def test_a_slash_command_where_the_user_is_not_allowed_is_refused(world: World, case: str) -> None:
    fake = world.fake
    user, channel = {
        "a DM without the role": (world.outsider, world.outsider_dm),
        "a channel not allowed": (world.alice, world.channels["restricted"]),
    }[case]
    token = await fake.slash_command(channel, user, "history")
    callback = await fake.wait_for_request(lambda r: r.method == "POST" and f"/{token}/callback" in r.path)
    assert callback.body["type"] == 4
    assert callback.body["data"]["content"] == NOT_ALLOWED_HERE
    assert callback.body["data"]["flags"] == 64


async def test_the_token_never_appears_in_logs(world: World) -> None:
    assert world.bot.log.lines, "the bot logged while running"
    assert not [line for line in world.bot.log.lines if TOKEN in line]


async def test_mentioning_the_bots_managed_role_counts_as_a_mention(world: World) -> None:
    fake, channel = world.fake, world.channels["roles"]
    known = len(world.bot.replies)
    role_id = fake.bot_role_ids[world.guild_id]
    await fake.send_message(
        channel, world.alice, f"<@&{role_id}> what is this?", attachments=[world.image("r.png")]
    )
    await world.bot.wait_reply(channel, after=known)
    assert await world.stats(world.scope("roles")) == (1, 1)
    question = world.bot.prompts[-1][-1]["content"][-1]
    assert question == {"type": "text", "text": "what is this?"}
