"""One question through the answering service onto Discord, shared by messages and slash commands.

Every outcome reaches the user: the streamed answer, a `BotError`'s own sentence, or a generic sentence for
an unexpected failure (logged with its traceback). An answer whose turn the store is still retrying is shown
at once; should the retries give up, the reply is edited to say the turn won't be remembered. Discord HTTP
errors while replying are logged here and never propagate into discord.py's gateway loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Protocol

import discord

from bot.answering import AnswerService, Question, ThreadOrigin, with_unsaved_note
from bot.content import ConversationScope
from bot.discord.access import AccessPolicy
from bot.discord.limits import UserLimits
from bot.discord.replies import ReplyTarget, StreamingReply
from bot.discord.stopping import RunningAnswers, stop_controls
from bot.discord.triggers import parent_scope
from bot.errors import BotError, EngineStopped
from bot.settings import DiscordSettings

log = logging.getLogger("bot.discord.delivery")

GENERIC_FAILURE = BotError.user_message

# Shows an error sentence in place of the reply; the default replaces whatever the reply showed.
ErrorPresenter = Callable[[StreamingReply, str], Awaitable[None]]


class Serving(Protocol):
    """What answering on Discord needs from the client: messages and commands alike."""

    @property
    def service(self) -> AnswerService: ...

    @property
    def discord_settings(self) -> DiscordSettings: ...

    @property
    def access(self) -> AccessPolicy: ...

    @property
    def deliveries(self) -> DeliveryTracker: ...

    @property
    def limits(self) -> UserLimits: ...

    @property
    def running_answers(self) -> RunningAnswers: ...


class DeliveryTracker:
    """Counts the answers being delivered, so a shutdown can let them finish before disconnecting."""

    def __init__(self) -> None:
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    @property
    def active(self) -> int:
        """Answers being delivered now."""
        return self._active

    @asynccontextmanager
    async def track(self) -> AsyncIterator[None]:
        """Count one delivery for the duration of the block."""
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new deliveries, wait up to `timeout` seconds for the running ones; True if all ended."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


async def _replace_reply(reply: StreamingReply, text: str) -> None:
    await reply.finish(text)


async def thread_origin(service: AnswerService, scope: ConversationScope) -> ThreadOrigin | None:
    """For a thread the bot has no conversation in yet: where to fork the parent's history from.

    A thread started from a message has that message's id as its own id, so the thread id is the starter id.
    """
    if scope.thread_id is None or await service.has_conversation(scope):
        return None
    return ThreadOrigin(parent_scope(scope), starter_message_id=scope.thread_id)


async def deliver(
    bot: Serving,
    question: Question,
    target: ReplyTarget,
    *,
    asker_id: int,
    typing_in: discord.abc.Messageable | None = None,
    present_error: ErrorPresenter = _replace_reply,
) -> None:
    """Answer `question`, streaming into `target`; then link the first reply message to the stored answer,
    once its turn is stored (a retried write is awaited here; giving up adds the unsaved note to the reply).

    While it streams, the reply shows a Stop button for `asker_id` (and moderators). While the bot shuts down
    (`deliveries.draining`), a new question is told to come back instead.
    """
    service, settings = bot.service, bot.discord_settings
    key = question.discord_message_id
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(bot.deliveries.track())
        if typing_in is not None:
            await _start_typing(stack, typing_in)
        running = (
            stack.enter_context(bot.running_answers.register(key, asker_id)) if key is not None else None
        )
        reply = await stack.enter_async_context(
            StreamingReply(
                target,
                interval=settings.stream_edit_interval_seconds,
                max_messages=settings.answer_file_after_messages,
                controls=stop_controls(key) if key is not None else None,
            )
        )
        if bot.deliveries.draining:
            await present_error(reply, EngineStopped.user_message)
            return
        try:
            answer = await service.answer(
                question,
                on_text=reply.on_text,
                on_queue_position=reply.on_queue_position,
                stop=running.stop if running is not None else None,
            )
        except BotError as exc:
            log.info("could not answer in %s: %r", question.scope.key, exc)
            await present_error(reply, exc.user_message)
            return
        except Exception:
            log.exception("unexpected failure while answering in %s", question.scope.key)
            await present_error(reply, GENERIC_FAILURE)
            return
        if answer.duplicate:
            log.info("message %s in %s was already answered", question.discord_message_id, question.scope.key)
            await reply.finish("")
            return
        messages = await reply.finish(answer.text)
        if not messages:
            log.warning("the answer in %s could not be posted", question.scope.key)
            return
        if answer.recording is not None and await answer.stored_id() is None:
            await reply.amend(with_unsaved_note(answer.text))
            return
        try:
            await service.attach_reply(answer, messages[0].id)
        except BotError as exc:  # the answer is visible; only the thread-fork link is lost
            log.warning("could not link reply %s to its stored answer: %r", messages[0].id, exc)


async def _start_typing(stack: AsyncExitStack, channel: discord.abc.Messageable) -> None:
    try:
        await stack.enter_async_context(channel.typing())
    except discord.HTTPException as exc:
        log.warning("could not show the typing indicator (HTTP %s)", exc.status)
