"""After a restart: the questions an earlier process kept but did not finish, answered again or told.

It runs once, when the gateway is first ready. Only questions of this process's shards are taken (a guild's
shard is `(guild_id >> 22) % shard_count`, DMs are shard 0), each claimed in the store first, so one process
answers it. A question whose answer was recorded but not yet shown in full gets the recorded answer. A
message asked less than `discord.resume_window_seconds` ago is answered again into the reply messages the
earlier process made (fetched, then edited), from its attachments as downloaded before the restart or, when
they were not yet (or are gone), fetched again from their message for fresh CDN URLs. An older one, and
every slash command (its interaction token died with the process), gets its reply edited to
`ASK_AGAIN_AFTER_RESTART`, or a new reply when it had none. The questions of one conversation go in the
order they were asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Sequence

import discord

from bot.answering import AttachmentRef, Question, display_text
from bot.discord.delivery import Serving, deliver
from bot.discord.replies import CONNECTION_GONE, ChannelTarget, StreamingReply, fetch_message
from bot.discord.triggers import attachment_refs
from bot.errors import BotError
from bot.store import UnfinishedQuestion

log = logging.getLogger("bot.discord.resuming")

ASK_AGAIN_AFTER_RESTART = "I restarted before I could finish — please ask again."


def shard_of(guild_id: int | None, shard_count: int) -> int:
    """The shard Discord sends a guild's events to (DMs: shard 0)."""
    return 0 if guild_id is None else (guild_id >> 22) % shard_count


async def resume_unfinished(client: discord.AutoShardedClient, bot: Serving) -> None:
    """Answer or tell every unfinished question of this process's shards; never raises."""
    try:
        unfinished = await bot.service.unfinished()
    except BotError as exc:
        log.error("could not read the unfinished questions: %r", exc)
        return
    shards = set(client.shard_ids or range(client.shard_count or 1))
    by_conversation: defaultdict[str, list[UnfinishedQuestion]] = defaultdict(list)
    for item in unfinished:
        if shard_of(item.scope.guild_id, client.shard_count or 1) in shards:
            by_conversation[item.scope.key].append(item)
    if by_conversation:
        count = sum(map(len, by_conversation.values()))
        log.info("resuming %d unfinished questions from before the restart", count)
    await asyncio.gather(
        *(_resume_conversation(client, bot, items) for items in by_conversation.values()),
        return_exceptions=True,  # a shutdown cancels them; each question stays kept
    )


async def _resume_conversation(
    client: discord.AutoShardedClient, bot: Serving, items: Sequence[UnfinishedQuestion]
) -> None:
    for item in items:
        try:
            if await bot.service.claim(item):
                await _resume(client, bot, item)
        except BotError as exc:
            log.error("could not resume question %s: %r", item.question.discord_message_id, exc)


async def _resume(client: discord.AutoShardedClient, bot: Serving, item: UnfinishedQuestion) -> None:
    asked = item.question
    channel = _messageable(client, asked.reply_channel_id, item.scope.guild_id)
    same_channel = asked.channel_id == asked.reply_channel_id
    if item.answer_text is not None:
        await _show_recorded(bot, channel, item, same_channel=same_channel)
        return
    age = (discord.utils.utcnow() - item.created_at).total_seconds()
    if asked.kind == "command" or age > bot.discord_settings.resume_window_seconds:
        await _tell_ask_again(channel, item, reference=same_channel)
        await bot.service.finish_kept(item.id, "expired")
        return
    attachments: tuple[AttachmentRef, ...] = ()
    downloaded = item.media_files if len(item.media_files) == len(asked.attachments) else ()
    if asked.attachments and not downloaded and asked.attachments_message_id is not None:
        source_channel = _messageable(client, asked.channel_id, item.scope.guild_id)
        source = await fetch_message(source_channel, asked.attachments_message_id)
        if source is None:  # deleted meanwhile, or unreachable: its pictures are gone with it
            await _tell_ask_again(channel, item, reference=same_channel)
            await bot.service.finish_kept(item.id, "expired")
            return
        attachments = attachment_refs(source.attachments)
    question = Question(
        scope=item.scope,
        text=asked.text,
        attachments=attachments,
        local_files=downloaded,
        discord_message_id=asked.discord_message_id,
        durable_id=item.id,
    )
    reference = channel.get_partial_message(asked.discord_message_id) if same_channel else None
    log.info("answering question %s in %s again after a restart", asked.discord_message_id, item.scope.key)
    await deliver(
        bot,
        question,
        ChannelTarget(channel, reference),
        asker_id=asked.asker_id,
        typing_in=channel,
        reply_ids=item.reply_ids,
    )


async def _show_recorded(
    bot: Serving, channel: discord.PartialMessageable, item: UnfinishedQuestion, *, same_channel: bool
) -> None:
    """Show a recorded answer in the question's reply (its earlier messages edited), then mark it shown."""
    asked = item.question
    reference = channel.get_partial_message(asked.discord_message_id) if same_channel else None
    target = ChannelTarget(channel, reference)
    existing = [message for message_id in item.reply_ids if (message := await target.fetch(message_id))]
    settings = bot.discord_settings
    async with StreamingReply(
        target,
        interval=settings.stream_edit_interval_seconds,
        max_messages=settings.answer_file_after_messages,
        existing=existing,
        nonce=str(asked.discord_message_id),
    ) as reply:
        await reply.finish(display_text(item.answer_text) if item.answer_text else ASK_AGAIN_AFTER_RESTART)
    await bot.service.finish_kept(item.id, "shown")


def _messageable(
    client: discord.AutoShardedClient, channel_id: int, guild_id: int | None
) -> discord.PartialMessageable:
    """A channel to send in, fetch from and edit in, without needing it in the cache."""
    return client.get_partial_messageable(channel_id, guild_id=guild_id)


async def _tell_ask_again(
    channel: discord.PartialMessageable, item: UnfinishedQuestion, *, reference: bool
) -> None:
    """Edit the question's first reply to `ASK_AGAIN_AFTER_RESTART` (removing the rest), or send it as a new
    reply: to the question's message, or mentioning the asker of a slash command."""
    asked = item.question
    try:
        first, *rest = item.reply_ids or (None,)
        for message_id in rest:
            with contextlib.suppress(discord.NotFound):
                await channel.get_partial_message(message_id).delete()
        if first is not None:
            try:
                await channel.get_partial_message(first).edit(
                    content=ASK_AGAIN_AFTER_RESTART, attachments=[], view=None
                )
                return
            except discord.NotFound:
                pass
        if asked.kind == "command":
            await channel.send(
                f"<@{asked.asker_id}> {ASK_AGAIN_AFTER_RESTART}",
                allowed_mentions=discord.AllowedMentions(users=[discord.Object(asked.asker_id)]),
                nonce=f"{asked.discord_message_id}.0",
            )
            return
        question = channel.get_partial_message(asked.discord_message_id)
        await channel.send(
            ASK_AGAIN_AFTER_RESTART,
            reference=question.to_reference(fail_if_not_exists=False) if reference else discord.utils.MISSING,
            nonce=f"{asked.discord_message_id}.0",
        )
    except discord.HTTPException as exc:
        log.warning("could not tell about question %s (HTTP %s)", asked.discord_message_id, exc.status)
    except CONNECTION_GONE as exc:
        log.warning("could not tell about question %s: %r", asked.discord_message_id, exc)
