"""Messages → questions: decide whether a message is for the bot, then answer it as a reply.

A message is for the bot when it mentions the bot, replies to one of the bot's messages, arrives in a thread
the bot started or whose conversation it is part of (if configured), or is a DM (if allowed). Bots and
everything outside the allow-lists (see `AccessPolicy`) are ignored silently.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import asdict, replace

import discord

from bot.answering import Question
from bot.discord.access import role_ids_of
from bot.discord.delivery import Serving, deliver, thread_origin
from bot.discord.replies import ChannelTarget
from bot.discord.triggers import (
    attachment_refs,
    bot_role_id,
    guild_id_of,
    scope_of,
    strip_mention,
    trigger_of,
)
from bot.errors import InputError, UserLimited
from bot.store import NewQuestion

log = logging.getLogger("bot.discord.messages")

THREAD_NAME_LENGTH = 80
THREAD_ALREADY_EXISTS = 160004  # Discord: "A thread has already been created for this message"
LIMIT_NOTICE_SECONDS = 30  # a limit notice that could not go by DM is deleted from the channel after this
STARTER_VERDICTS_KEPT = 4096  # threads whose starter message was looked up, remembered (oldest dropped)
_ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)


class MessageHandler:
    """Turns the client's `on_message` events into answered questions."""

    def __init__(self, client: discord.Client, bot: Serving) -> None:
        self._client = client
        self._bot = bot
        self._service = bot.service
        self._settings = bot.discord_settings
        self._warned_empty_content = False
        self._starter_by_bot: OrderedDict[int, bool] = OrderedDict()  # thread id -> started from our message

    async def handle(self, message: discord.Message) -> None:
        """Answer `message` if it is for the bot; never raises."""
        try:
            await self._handle(message)
        except Exception:
            log.exception("failed to handle message %s in channel %s", message.id, message.channel.id)

    async def _handle(self, message: discord.Message) -> None:
        me = self._client.user
        if me is None or message.author.bot or message.type not in _ANSWERED_TYPES:
            return
        guild_id = guild_id_of(message)
        channel = await self._resolve_channel(message, guild_id)
        if not await self._bot.access.allows(
            user=message.author,
            guild_id=guild_id,
            channel=channel,
            channel_id=message.channel.id,
        ):
            return
        self._warn_if_content_missing(message)
        referenced = await self._referenced_message(message)
        scope = scope_of(channel, guild_id, message.channel.id)
        trigger = await trigger_of(
            message,
            bot_id=me.id,
            scope=scope,
            channel=channel,
            referenced=referenced,
            threads_without_mention=self._settings.answer_in_bot_threads_without_mention,
            has_conversation=self._service.has_conversation,
            started_from_bot_message=self._started_from_bot_message,
        )
        if trigger is None:
            return

        attachments = message.attachments or (referenced.attachments if referenced is not None else [])
        question = Question(
            scope=scope,
            text=strip_mention(message.content, me.id, bot_role_id(message)),
            attachments=attachment_refs(attachments),
            discord_message_id=message.id,
            thread_origin=None if trigger.in_bot_thread else await thread_origin(self._service, scope),
        )
        with contextlib.ExitStack() as admitted:
            try:
                admitted.enter_context(self._bot.limits.admit(message.author.id, role_ids_of(message.author)))
            except UserLimited as refusal:
                await self._tell_limited(message, refusal)
                return
            source = message if message.attachments or referenced is None else referenced
            await self._answer(message, question, channel, attachments_message_id=source.id)

    async def _answer(
        self,
        message: discord.Message,
        question: Question,
        channel: discord.abc.Messageable,
        *,
        attachments_message_id: int,
    ) -> None:
        """Answer `question` as a reply to `message` (or in a new thread, if configured)."""
        scope = question.scope
        reply_channel: discord.abc.Messageable = channel
        reference: discord.Message | None = message
        if self._wants_new_thread(question):
            thread = await self._open_thread(message)
            if thread is not None:
                # A fresh thread for a fresh question: it starts its own conversation, with no parent history.
                reply_channel, reference = thread, None
                question = replace(
                    question, scope=scope_of(thread, scope.guild_id, thread.id), thread_origin=None
                )
                scope = question.scope
        log.info("question %s from user %s in %s", message.id, message.author.id, scope.key)
        keep = NewQuestion(
            discord_message_id=message.id,
            kind="message",
            channel_id=message.channel.id,
            reply_channel_id=scope.thread_id if scope.thread_id is not None else scope.channel_id,
            asker_id=message.author.id,
            text=question.text,
            attachments=tuple(asdict(ref) for ref in question.attachments),
            attachments_message_id=attachments_message_id if question.attachments else None,
        )
        await deliver(
            self._bot,
            question,
            ChannelTarget(reply_channel, reference),
            asker_id=message.author.id,
            typing_in=reply_channel,
            keep=keep,
        )

    async def _tell_limited(self, message: discord.Message, refusal: UserLimited) -> None:
        """Tell the author why their question is refused: by DM, else in a reply that soon disappears."""
        log.info("question %s from user %s refused: %s", message.id, message.author.id, refusal)
        if not refusal.notify:
            return
        try:
            if message.guild is None:
                await message.reply(refusal.user_message)
                return
            try:
                await message.author.send(f"About {message.jump_url}: {refusal.user_message}")
            except discord.HTTPException:  # DMs closed (403): the channel, briefly
                await message.reply(refusal.user_message, delete_after=LIMIT_NOTICE_SECONDS)
        except discord.HTTPException as exc:
            log.warning("could not tell user %s about a limit (HTTP %s)", message.author.id, exc.status)

    def _wants_new_thread(self, question: Question) -> bool:
        """Whether to answer in a new thread: configured, in a guild channel, and not a question that fails
        its input checks (its error is answered inline rather than in an otherwise empty thread)."""
        scope = question.scope
        if not self._settings.answer_in_new_thread or scope.thread_id is not None or scope.guild_id is None:
            return False
        try:
            self._service.check(question)
        except InputError:
            return False
        return True

    async def _resolve_channel(
        self, message: discord.Message, guild_id: int | None
    ) -> discord.abc.Messageable:
        """The message's channel as a full object; a channel missing from the cache is fetched once."""
        channel = message.channel
        if guild_id is not None and isinstance(channel, discord.PartialMessageable):
            try:
                fetched = await self._client.fetch_channel(channel.id)
            except discord.HTTPException as exc:
                log.warning("could not fetch channel %s (HTTP %s)", channel.id, exc.status)
                return channel
            if isinstance(fetched, discord.abc.Messageable):
                return fetched
        return channel

    async def _referenced_message(self, message: discord.Message) -> discord.Message | None:
        """The message this one replies to, from the event, the cache or the API (a forward is no reply)."""
        reference = message.reference
        if reference is None or reference.message_id is None:
            return None
        if reference.type is not discord.MessageReferenceType.reply:
            return None
        if isinstance(reference.resolved, discord.Message):
            return reference.resolved
        if reference.cached_message is not None:
            return reference.cached_message
        channel = self._client.get_channel(reference.channel_id) or message.channel
        if not isinstance(channel, discord.abc.Messageable):
            return None
        try:
            return await channel.fetch_message(reference.message_id)
        except discord.HTTPException as exc:
            log.info("could not fetch replied-to message %s (HTTP %s)", reference.message_id, exc.status)
            return None

    async def _started_from_bot_message(self, channel: discord.abc.Messageable) -> bool:
        """Whether `channel` is a thread started from one of the bot's messages (an answer).

        A thread started from a message has that message's id; the message comes from the cache or, once per
        thread, from the API. A thread with no starter message (or one deleted since) is not the bot's.
        """
        me = self._client.user
        if me is None or not isinstance(channel, discord.Thread):
            return False
        verdict = self._starter_by_bot.get(channel.id)
        if verdict is None:
            starter = channel.starter_message
            if starter is None:
                parent = self._client.get_partial_messageable(channel.parent_id, guild_id=channel.guild.id)
                try:
                    starter = await parent.fetch_message(channel.id)
                except discord.NotFound:
                    starter = None
                except discord.HTTPException as exc:
                    log.info("could not fetch the starter of thread %s (HTTP %s)", channel.id, exc.status)
                    return False  # not remembered: the next message asks again
            verdict = starter is not None and starter.author.id == me.id
            self._starter_by_bot[channel.id] = verdict
            if len(self._starter_by_bot) > STARTER_VERDICTS_KEPT:
                self._starter_by_bot.popitem(last=False)
        return verdict

    async def _open_thread(self, message: discord.Message) -> discord.Thread | None:
        """The thread started from `message`: a new one, or the one an earlier delivery of it opened."""
        if message.thread is not None:
            return message.thread
        me = self._client.user.id if self._client.user else 0
        name = strip_mention(message.content, me, bot_role_id(message))
        try:
            return await message.create_thread(name=(name or "Question")[:THREAD_NAME_LENGTH])
        except discord.HTTPException as exc:
            if exc.code == THREAD_ALREADY_EXISTS:  # another delivery of this message opened it meanwhile
                return await self._fetch_thread(message.id)
            log.warning(
                "could not open a thread for message %s (HTTP %s); answering inline", message.id, exc.status
            )
            return None

    async def _fetch_thread(self, thread_id: int) -> discord.Thread | None:
        """A thread that exists but may not be cached yet (a thread started from a message has its id)."""
        try:
            thread = await self._client.fetch_channel(thread_id)
        except discord.HTTPException as exc:
            log.warning("could not fetch thread %s (HTTP %s); answering inline", thread_id, exc.status)
            return None
        return thread if isinstance(thread, discord.Thread) else None

    def _warn_if_content_missing(self, message: discord.Message) -> None:
        if self._warned_empty_content or message.guild is None:
            return
        if message.content or message.attachments or message.embeds or message.stickers:
            return
        self._warned_empty_content = True
        log.warning(
            "a message for the bot arrived with no text and no attachments: if this repeats, switch on the "
            "MESSAGE CONTENT intent for this bot in the Discord Developer Portal"
        )
