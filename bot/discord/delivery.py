"""One question through the answering service onto Discord, shared by messages and slash commands.

Every outcome reaches the user: the streamed answer, a `BotError`'s own sentence, or a generic sentence for
an unexpected failure (logged with its traceback). An answer whose turn the store is still retrying is shown
at once; should the retries give up, the reply is edited to say the turn won't be remembered. Discord HTTP
errors while replying are logged here and never propagate into discord.py's gateway loop.

A question is kept in the store when it is accepted (`AnswerService.keep`) and finished with its answer or
its sentence; the ids of its reply messages are noted as they are created. At shutdown, answers the grace
period does not cover are cancelled and their replies edited to a last sentence (`DeliveryTracker.interrupt`);
their questions stay kept, and the next start answers them into the same messages (`bot.discord.resuming`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import discord

from bot.answering import AnswerService, Question, ThreadOrigin, with_unsaved_note
from bot.content import ConversationScope
from bot.discord.access import AccessPolicy
from bot.discord.limits import UserLimits
from bot.discord.replies import CONNECTION_GONE, ReplyTarget, StreamingReply
from bot.discord.stopping import RunningAnswers, stop_controls
from bot.discord.triggers import parent_scope
from bot.errors import BotError, EngineStopped
from bot.settings import DiscordSettings
from bot.store import FinalStatus, NewQuestion

log = logging.getLogger("bot.discord.delivery")

GENERIC_FAILURE = BotError.user_message
# The last state of a reply the shutdown cut short: its question is answered after the restart ...
ANSWER_AFTER_RESTART = "🔄 I'm restarting: I'll answer this as soon as I'm back."
# ... or, for a slash command (its interaction dies with the process), not.
ASK_AGAIN_AFTER_SHUTDOWN = "🔄 I'm restarting and can't finish this answer. Please ask again in a minute."

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


@dataclass(slots=True, eq=False)  # tracked by identity
class _Delivery:
    """One answer being delivered: its task, its reply once created, and its last sentence at shutdown."""

    task: asyncio.Task[object]
    last_words: str
    reply: StreamingReply | None = None


class DeliveryTracker:
    """The answers being delivered, so a shutdown can let them finish, then end the rest with a sentence."""

    def __init__(self) -> None:
        self._deliveries: set[_Delivery] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    @property
    def active(self) -> int:
        """Answers being delivered now."""
        return len(self._deliveries)

    @asynccontextmanager
    async def track(self, last_words: str) -> AsyncIterator[_Delivery]:
        """Track the current task's delivery for the duration of the block; `last_words` is what its reply
        shows if the shutdown interrupts it."""
        task = asyncio.current_task()
        assert task is not None
        delivery = _Delivery(task, last_words)
        self._deliveries.add(delivery)
        self._idle.clear()
        try:
            yield delivery
        finally:
            self._deliveries.discard(delivery)
            if not self._deliveries:
                self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new deliveries, wait up to `timeout` seconds for the running ones; True if all ended."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def interrupt(self, timeout: float) -> int:
        """Cancel the deliveries still running and edit their replies to their last sentence, within
        `timeout` seconds; return how many there were."""
        deliveries = list(self._deliveries)
        for delivery in deliveries:
            delivery.task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                if deliveries:
                    await asyncio.wait([delivery.task for delivery in deliveries])
                await asyncio.gather(
                    *(
                        delivery.reply.interrupt(delivery.last_words)
                        for delivery in deliveries
                        if delivery.reply
                    )
                )
        return len(deliveries)


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
    keep: NewQuestion | None = None,
    reply_ids: Sequence[int] = (),
) -> None:
    """Answer `question`, streaming into `target`; then link the first reply message to the stored answer,
    once its turn is stored (a retried write is awaited here; giving up adds the unsaved note to the reply).

    `keep` is the question as kept for a restart (a question with a `durable_id` is kept already, and
    `reply_ids` are the messages an earlier process showed its answer in: they are edited, not repeated).
    A message kept or answered before (a re-delivery) gets nothing. While it streams, the reply shows a
    Stop button for `asker_id` (and moderators). While the bot shuts down (`deliveries.draining`), a new
    question is told to come back instead.
    """
    service, settings = bot.service, bot.discord_settings
    key = question.discord_message_id
    async with AsyncExitStack() as stack:
        delivery = await stack.enter_async_context(bot.deliveries.track(ASK_AGAIN_AFTER_SHUTDOWN))
        if keep is not None and question.durable_id is None and not bot.deliveries.draining:
            kept = await _keep(service, question, keep)
            if kept is None:
                log.info("message %s in %s is already answered or being answered", key, question.scope.key)
                return
            question = kept
        durable_id = question.durable_id
        if durable_id is not None and (keep is None or keep.kind == "message"):
            delivery.last_words = ANSWER_AFTER_RESTART
        if typing_in is not None:
            await _start_typing(stack, typing_in)
        running = (
            stack.enter_context(bot.running_answers.register(key, asker_id)) if key is not None else None
        )
        existing = [message for message_id in reply_ids if (message := await target.fetch(message_id))]
        reply = await stack.enter_async_context(
            StreamingReply(
                target,
                interval=settings.stream_edit_interval_seconds,
                max_messages=settings.answer_file_after_messages,
                controls=stop_controls(key) if key is not None else None,
                existing=existing,
                on_sent=_noting(service, durable_id) if durable_id is not None else None,
                nonce=str(key) if durable_id is not None else None,
            )
        )
        delivery.reply = reply
        if bot.deliveries.draining:  # a kept question (resumed just now) stays kept for the next start
            await present_error(
                reply, EngineStopped.user_message if durable_id is None else delivery.last_words
            )
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
            await _finish_kept(service, durable_id, "failed")
            return
        except Exception:
            log.exception("unexpected failure while answering in %s", question.scope.key)
            await present_error(reply, GENERIC_FAILURE)
            await _finish_kept(service, durable_id, "failed")
            return
        if answer.duplicate:
            log.info("message %s in %s was already answered", question.discord_message_id, question.scope.key)
            await reply.finish("")
            await _finish_kept(service, durable_id, "shown")
            return
        messages = await reply.finish(answer.text)
        delivery.reply = None  # final now: a shutdown leaves it as it is
        if not messages:
            log.warning("the answer in %s could not be posted", question.scope.key)
            return
        if answer.recording is not None and await answer.stored_id() is None:
            await reply.amend(with_unsaved_note(answer.text))
            await _finish_kept(service, durable_id, "failed")  # shown, with the note: not answered again
            return
        await _finish_kept(service, durable_id, "shown")
        try:
            await service.attach_reply(answer, messages[0].id)
        except BotError as exc:  # the answer is visible; only the thread-fork link is lost
            log.warning("could not link reply %s to its stored answer: %r", messages[0].id, exc)


async def _keep(service: AnswerService, question: Question, keep: NewQuestion) -> Question | None:
    """`question` with its durable id, or None for a re-delivery. When the store fails, the question is
    answered all the same, only not again after a restart."""
    try:
        durable_id = await service.keep(question, keep)
    except BotError as exc:
        log.warning("could not keep question %s for a restart: %r", question.discord_message_id, exc)
        return question
    return replace(question, durable_id=durable_id) if durable_id is not None else None


def _noting(service: AnswerService, durable_id: int) -> Callable[[discord.Message], Awaitable[None]]:
    """An `on_sent` that notes each new reply message of the kept question `durable_id`."""

    async def note(message: discord.Message) -> None:
        try:
            await service.note_reply(durable_id, message.id)
        except BotError as exc:  # a restart would then send a new reply (its nonce finds this one, if recent)
            log.warning("could not note reply %s: %r", message.id, exc)

    return note


async def _finish_kept(service: AnswerService, durable_id: int | None, status: FinalStatus) -> None:
    """Mark a kept question as finished (its answer or sentence is shown): a restart leaves it alone."""
    if durable_id is None:
        return
    try:
        await service.finish_kept(durable_id, status)
    except BotError as exc:
        log.warning("could not mark question %s as finished: %r", durable_id, exc)


async def _start_typing(stack: AsyncExitStack, channel: discord.abc.Messageable) -> None:
    try:
        await stack.enter_async_context(channel.typing())
    except discord.HTTPException as exc:
        log.warning("could not show the typing indicator (HTTP %s)", exc.status)
    except CONNECTION_GONE as exc:
        log.warning("could not show the typing indicator: %r", exc)
