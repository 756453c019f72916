"""Slash commands and the message context menu: parse → call the answering service → reply.

Every command defers first (Discord allows 3 seconds for the first response, then 15 minutes for follow-ups)
and reports failures ephemerally. Commands find the service through `interaction.client`, so the same
definitions serve the running bot and the `sync-commands` CLI, which never connects to the gateway.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict
from typing import cast

import discord
from discord import app_commands

from bot.answering import DEFAULT_IMAGE_QUESTION, Question
from bot.content import ConversationScope
from bot.discord.access import role_ids_of
from bot.discord.delivery import GENERIC_FAILURE, Serving, deliver, thread_origin
from bot.discord.replies import InteractionTarget, StreamingReply, token_usable
from bot.discord.triggers import attachment_refs, scope_of
from bot.errors import BotError, UserLimited
from bot.store import NewQuestion

log = logging.getLogger("bot.discord.commands")

NOT_ALLOWED_HERE = "I'm not set up to answer here."
NO_ATTACHMENTS = "That message has no attachments I could look at."
ASK_ABOUT_IMAGE = "Ask about this image"


class GuardedCommandTree(app_commands.CommandTree):
    """A command tree that applies the allow-lists and answers every failure ephemerally."""

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        # A False return would leave the interaction unanswered ("The application did not respond"); a
        # CheckFailure reaches `on_error`, which tells the user.
        allowed = await _serving(interaction).access.allows(
            user=interaction.user,
            guild_id=interaction.guild_id,
            channel=_messageable(interaction),
            channel_id=interaction.channel_id or 0,
        )
        if not allowed:
            raise app_commands.CheckFailure(f"user {interaction.user.id} is not allowed here")
        return True

    async def on_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError, /
    ) -> None:
        if isinstance(error, app_commands.CheckFailure):
            await _report(interaction, NOT_ALLOWED_HERE)
            return
        log.error("command %s failed", interaction.command and interaction.command.name, exc_info=error)
        await _report(interaction, GENERIC_FAILURE)


def build_commands() -> list[app_commands.Command | app_commands.ContextMenu]:
    """Fresh command objects for one command tree."""

    @app_commands.command(name="ask", description="Ask me about an image (or anything) in this conversation.")
    @app_commands.describe(question="What you want to know", image="An image to look at")
    async def ask(
        interaction: discord.Interaction, question: str, image: discord.Attachment | None = None
    ) -> None:
        await _answer(interaction, question, [image] if image is not None else [])

    @app_commands.command(name="reset", description="Forget this channel's (or thread's) conversation.")
    async def reset(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        async with _reporting_failures(interaction):
            result = await _serving(interaction).service.reset(_scope(interaction))
            if result.messages_deleted == 0:
                text = "There was nothing to forget here."
            else:
                messages = _count(result.messages_deleted, "message")
                images = _count(result.media_deleted, "image")
                text = f"🧹 I forgot this {_place(interaction)}'s conversation: {messages} and {images}."
            await interaction.edit_original_response(content=text)

    @app_commands.command(name="history", description="How much of this conversation I remember.")
    async def history(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True, ephemeral=True)
        async with _reporting_failures(interaction, ephemeral_deferral=True):
            stats = await _serving(interaction).service.stats(_scope(interaction))
            if stats.turns == 0:
                text = f"I have no conversation in this {_place(interaction)} yet."
            else:
                text = (
                    f"In this {_place(interaction)} I remember {_count(stats.turns, 'turn')} "
                    f"and {_count(stats.images, 'image')}."
                )
            await interaction.edit_original_response(content=text)

    @app_commands.context_menu(name=ASK_ABOUT_IMAGE)
    async def ask_about_image(interaction: discord.Interaction, message: discord.Message) -> None:
        if not message.attachments:
            await _report(interaction, NO_ATTACHMENTS)
            return
        await _answer(interaction, DEFAULT_IMAGE_QUESTION, message.attachments)

    return [ask, reset, history, ask_about_image]


async def _answer(interaction: discord.Interaction, text: str, attachments: list[discord.Attachment]) -> None:
    """Admit the question under the user's limits (a refusal is private), defer, then deliver the answer."""
    bot = _serving(interaction)
    with contextlib.ExitStack() as admitted:
        try:
            admitted.enter_context(bot.limits.admit(interaction.user.id, role_ids_of(interaction.user)))
        except UserLimited as refusal:
            log.info("interaction %s from user %s refused: %s", interaction.id, interaction.user.id, refusal)
            await _report(interaction, refusal.user_message)
            return
        await interaction.response.defer(thinking=True)
        await _deliver_answer(interaction, text, attachments)


async def _deliver_answer(
    interaction: discord.Interaction, text: str, attachments: list[discord.Attachment]
) -> None:
    bot = _serving(interaction)
    async with _reporting_failures(interaction):
        scope = _scope(interaction)
        question = Question(
            scope=scope,
            text=text,
            attachments=attachment_refs(attachments),
            discord_message_id=interaction.id,  # a snowflake too: a re-delivered interaction is answered once
            thread_origin=await thread_origin(bot.service, scope),
        )

        async def present_error(reply: StreamingReply, message: str) -> None:
            await reply.finish("")
            await _fail(interaction, message, ephemeral_deferral=False)

        # Kept so that a restart can tell the asker to ask again: its interaction token dies with the process.
        keep = NewQuestion(
            discord_message_id=interaction.id,
            kind="command",
            channel_id=scope.thread_id if scope.thread_id is not None else scope.channel_id,
            reply_channel_id=scope.thread_id if scope.thread_id is not None else scope.channel_id,
            asker_id=interaction.user.id,
            text=text,
            attachments=tuple(asdict(ref) for ref in question.attachments),
        )
        await deliver(
            bot,
            question,
            InteractionTarget(interaction, _messageable(interaction)),
            asker_id=interaction.user.id,
            present_error=present_error,
            keep=keep,
        )


@asynccontextmanager
async def _reporting_failures(
    interaction: discord.Interaction, *, ephemeral_deferral: bool = False
) -> AsyncIterator[None]:
    try:
        yield
    except BotError as exc:
        log.info("command %s failed: %r", interaction.command and interaction.command.name, exc)
        await _fail(interaction, exc.user_message, ephemeral_deferral=ephemeral_deferral)
    except discord.HTTPException as exc:
        log.warning("Discord refused a command reply (HTTP %s): %s", exc.status, exc.text)
    except Exception:
        log.exception("command %s failed", interaction.command and interaction.command.name)
        await _fail(interaction, GENERIC_FAILURE, ephemeral_deferral=ephemeral_deferral)


async def _fail(interaction: discord.Interaction, text: str, *, ephemeral_deferral: bool) -> None:
    """Show `text` only to the user: in the ephemeral deferred response, or instead of a public one.

    Once the token has expired, `text` goes to the channel instead (naming the user, pinging nobody).
    """
    try:
        channel = _messageable(interaction)
        if channel is not None and not token_usable(interaction):
            await channel.send(f"{interaction.user.mention} {text}")
            return
        if ephemeral_deferral:
            await interaction.edit_original_response(content=text)
            return
        with suppress(discord.NotFound):
            await interaction.delete_original_response()
        await interaction.followup.send(text, ephemeral=True)
    except discord.HTTPException as exc:
        log.warning("could not report a failure to the user (HTTP %s): %s", exc.status, exc.text)


async def _report(interaction: discord.Interaction, text: str) -> None:
    if interaction.response.is_done():
        await _fail(interaction, text, ephemeral_deferral=False)
        return
    try:
        await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as exc:
        log.warning("could not report a failure to the user (HTTP %s): %s", exc.status, exc.text)


def _serving(interaction: discord.Interaction) -> Serving:
    return cast(Serving, interaction.client)


def _messageable(interaction: discord.Interaction) -> discord.abc.Messageable | None:
    channel = interaction.channel
    return channel if isinstance(channel, discord.abc.Messageable) else None


def _scope(interaction: discord.Interaction) -> ConversationScope:
    return scope_of(_messageable(interaction), interaction.guild_id, interaction.channel_id or 0)


def _place(interaction: discord.Interaction) -> str:
    return "thread" if isinstance(interaction.channel, discord.Thread) else "channel"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
