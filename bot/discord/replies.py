"""An answer's messages on Discord: a queue placeholder, throttled streaming edits, the final split text.

`StreamingReply` receives the service's callbacks (text deltas, queue position) on the event loop and renders
them through a `ReplyTarget`: a channel (the reply to a user's message) or an interaction's follow-ups. One
pump task does all the HTTP work, at most one round of intermediate edits per `interval` seconds: deltas that
arrive in between are merged into the next round, so a long answer costs a handful of edits, never one per
token. The final round goes out as soon as the answer ends (discord.py's rate limiter still waits when
Discord's bucket is empty), so nobody waits out an interval for the last words.
A refusal that a retry cannot fix (401, 403, 404), or a connection that is gone (discord.py's session
closed at shutdown), ends the reply's updates: Discord bans an IP that sends too many invalid requests, and
each round would repeat the refused one.

A reply can continue messages an earlier process created (`existing`), and each message it sends carries a
nonce derived from its question (`nonce`): Discord returns the message already sent with that nonce instead
of a second one, so a reply sent just before a crash, whose id was not noted, is found again.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import aiohttp
import discord

from bot.discord.chunking import ANSWER_FILE_NAME, AnswerLayout, layout_answer

_T = TypeVar("_T")
log = logging.getLogger("bot.discord.replies")

# An interaction token lives 15 minutes; stop using it a little early so a slow request does not straddle it.
TOKEN_SAFETY_MARGIN = timedelta(seconds=30)
# Bad token, missing permission, message or channel gone: retrying the same request cannot succeed.
_FINAL_REFUSALS = frozenset({401, 403, 404})
# No connection to send on: aiohttp's errors, and the RuntimeError("Session is closed") a request meets once
# discord.py has closed its session (shutdown). Later rounds would fail the same way.
CONNECTION_GONE = (aiohttp.ClientError, ConnectionError, RuntimeError)
ANSWERING_NOW = "✍️ Answering now…"
_HasPartialMessages = (
    discord.TextChannel
    | discord.Thread
    | discord.DMChannel
    | discord.VoiceChannel
    | discord.PartialMessageable
)


def token_usable(interaction: discord.Interaction) -> bool:
    """Whether the interaction's token still works for follow-ups and edits, with a safety margin."""
    return discord.utils.utcnow() < interaction.expires_at - TOKEN_SAFETY_MARGIN


def queue_text(ahead: int) -> str:
    """The placeholder shown while a question waits behind `ahead` others."""
    noun = "question" if ahead == 1 else "questions"
    return f"⏳ {ahead} {noun} ahead of yours…"


# An edit's `view` that leaves the message's components as they are (None removes them).
KEEP_VIEW: Any = discord.utils.MISSING


class ReplyTarget(Protocol):
    """Where an answer's messages go; `file` is attached to a message (replacing its attachments) and `view`
    gives it components (the first message's Stop button); a `nonce` makes a repeated send return the
    message sent first (where the target supports it)."""

    async def send(
        self,
        content: str,
        *,
        first: bool,
        file: discord.File | None = None,
        view: discord.ui.View | None = None,
        nonce: str | None = None,
    ) -> discord.Message: ...

    async def fetch(self, message_id: int) -> discord.Message | None:
        """A message sent earlier (by an earlier process), or None when it is gone or unreachable."""
        ...

    async def edit(
        self,
        message: discord.Message,
        content: str,
        *,
        file: discord.File | None = None,
        view: discord.ui.View | None = KEEP_VIEW,
    ) -> None: ...

    async def delete(self, message: discord.Message) -> None: ...


class ChannelTarget:
    """Messages in a channel; the first one replies to `reference` (the user's message) when given."""

    def __init__(
        self, channel: discord.abc.Messageable, reference: discord.PartialMessage | None = None
    ) -> None:
        self._channel = channel
        self._reference = reference

    async def send(
        self,
        content: str,
        *,
        first: bool,
        file: discord.File | None = None,
        view: discord.ui.View | None = None,
        nonce: str | None = None,
    ) -> discord.Message:
        files = _attachments(file)
        if first and self._reference is not None:
            reference = self._reference.to_reference(fail_if_not_exists=False)
            return await self._channel.send(
                content, reference=reference, files=files, view=_sent(view), nonce=_sent(nonce)
            )
        return await self._channel.send(content, files=files, view=_sent(view), nonce=_sent(nonce))

    async def fetch(self, message_id: int) -> discord.Message | None:
        return await fetch_message(self._channel, message_id)

    async def edit(
        self,
        message: discord.Message,
        content: str,
        *,
        file: discord.File | None = None,
        view: discord.ui.View | None = KEEP_VIEW,
    ) -> None:
        await message.edit(content=content, attachments=_attachments(file), view=view)

    async def delete(self, message: discord.Message) -> None:
        await message.delete()


class InteractionTarget:
    """A deferred interaction's answer: the deferred response is the first message, follow-ups the rest.

    Once the interaction token is (nearly) expired, new messages go to `channel` as normal messages and edits
    go through the channel's message endpoint, which needs no token.
    """

    def __init__(self, interaction: discord.Interaction, channel: discord.abc.Messageable | None) -> None:
        self._interaction = interaction
        self._channel = channel
        self._original_id: int | None = None

    def _token_usable(self) -> bool:
        return self._channel is None or token_usable(self._interaction)

    async def send(
        self,
        content: str,
        *,
        first: bool,
        file: discord.File | None = None,
        view: discord.ui.View | None = None,
        nonce: str | None = None,
    ) -> discord.Message:
        if self._token_usable():
            if first:
                message = await self._interaction.edit_original_response(
                    content=content, attachments=_attachments(file), view=view
                )
                self._original_id = message.id
                return message
            return await self._interaction.followup.send(
                content, files=_attachments(file), view=_sent(view), wait=True
            )
        assert self._channel is not None
        log.info("interaction %s expired; answering with a normal message", self._interaction.id)
        return await self._channel.send(
            content, files=_attachments(file), view=_sent(view), nonce=_sent(nonce)
        )

    async def fetch(self, message_id: int) -> discord.Message | None:
        return await fetch_message(self._channel, message_id) if self._channel is not None else None

    async def edit(
        self,
        message: discord.Message,
        content: str,
        *,
        file: discord.File | None = None,
        view: discord.ui.View | None = KEEP_VIEW,
    ) -> None:
        if self._token_usable():
            await message.edit(content=content, attachments=_attachments(file), view=view)
        else:
            await self._partial(message).edit(content=content, attachments=_attachments(file), view=view)

    async def delete(self, message: discord.Message) -> None:
        if message.id == self._original_id and self._token_usable():
            await self._interaction.delete_original_response()
        elif self._token_usable():
            await message.delete()
        else:
            await self._partial(message).delete()

    def _partial(self, message: discord.Message) -> discord.PartialMessage:
        channel = self._channel
        assert isinstance(channel, _HasPartialMessages)
        return channel.get_partial_message(message.id)


async def fetch_message(channel: discord.abc.Messageable, message_id: int) -> discord.Message | None:
    """`channel`'s message `message_id`, or None (logged) when it is gone or cannot be fetched."""
    try:
        return await channel.fetch_message(message_id)
    except discord.NotFound:
        return None
    except discord.HTTPException as exc:
        log.warning("could not fetch message %s (HTTP %s)", message_id, exc.status)
    except CONNECTION_GONE as exc:
        log.warning("could not fetch message %s: %r", message_id, exc)
    return None


def _sent(value: _T | None) -> _T:
    """A send's optional argument (`view`, `nonce`): `value`, or nothing (discord.py's sends take no None)."""
    return value if value is not None else discord.utils.MISSING


def _attachments(file: discord.File | None) -> list[discord.File]:
    """`attachments`/`files` for an edit or send: `[file]`, or nothing (an edit keeps the attachments)."""
    return [file] if file is not None else discord.utils.MISSING


class StreamingReply:
    """Renders one answer as it streams; use as `async with`, feed the callbacks, then `finish(text)`.

    An answer longer than `max_messages` messages (or with a code block too long for one) shows as a
    preview, and its final round attaches the whole text as `answer.md` (see `layout_answer`). `controls`
    (the Stop button) show on the first message until the final round. `existing` messages (an earlier
    process's reply to the same question) are edited rather than sent again; `on_sent` hears of each new
    message; the n-th message is sent with the nonce `f"{nonce}.{n}"` when `nonce` is given.
    """

    def __init__(
        self,
        target: ReplyTarget,
        *,
        interval: float,
        max_messages: int,
        controls: discord.ui.View | None = None,
        existing: Sequence[discord.Message] = (),
        on_sent: Callable[[discord.Message], Awaitable[None]] | None = None,
        nonce: str | None = None,
    ) -> None:
        self._target = target
        self._interval = interval
        self._max_messages = max_messages
        self._controls = controls
        self._controls_shown = bool(existing)  # an earlier process's Stop button may still show
        self._on_sent = on_sent
        self._nonce = nonce
        self._text = ""
        self._status: str | None = None
        self._final = False
        self._refused = False
        self._messages: list[discord.Message] = list(existing)
        self._shown: list[str] = [message.content for message in existing]
        self._wake = asyncio.Event()
        self._finished = asyncio.Event()  # set by finish(): the pending round is the final one
        self._next_round = 0.0
        self._pump_task: asyncio.Task[None] | None = None

    @property
    def messages(self) -> list[discord.Message]:
        """The messages currently showing this answer, in order."""
        return list(self._messages)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pump_task is not None and not self._pump_task.done():
            self._pump_task.cancel()

    def on_text(self, delta: str) -> None:
        """A new piece of the answer; shown at the next edit round."""
        if delta and not self._final:
            self._text += delta
            self._poke()

    def on_queue_position(self, ahead: int) -> None:
        """The number of questions ahead; a placeholder shows it until the first text arrives."""
        if self._text or self._final:
            return
        status = queue_text(ahead) if ahead > 0 else (ANSWERING_NOW if self._status else None)
        if status != self._status:
            self._status = status
            self._poke()

    async def finish(self, text: str) -> list[discord.Message]:
        """Show `text` as the whole reply (split as needed; "" removes the reply) and return its messages."""
        self._text = text
        self._final = True
        self._finished.set()
        self._poke()
        assert self._pump_task is not None
        await self._pump_task
        return self.messages

    async def amend(self, text: str) -> list[discord.Message]:
        """After `finish`: show `text` as the whole reply instead, in one more round (e.g. with a note)."""
        if self._pump_task is not None:
            await self._pump_task
        self._text = text
        self._final = True
        if not self._refused:
            await self._render(final=True)
        return self.messages

    async def interrupt(self, text: str) -> None:
        """End the reply at once with `text` as its final state (at shutdown, its answer cancelled)."""
        if self._pump_task is not None and not self._pump_task.done():
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
        self._text, self._final = text, True
        if not self._refused:
            await self._render(final=True)

    def _poke(self) -> None:
        if self._pump_task is None:
            self._pump_task = asyncio.get_running_loop().create_task(self._pump())
        self._wake.set()

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            delay = self._next_round - loop.time()
            if delay > 0:  # updates arriving meanwhile are merged into this round; finishing cuts it short
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._finished.wait(), delay)
            self._wake.clear()
            final = self._final
            await self._render(final=final)
            self._next_round = loop.time() + self._interval
            if final or self._refused:
                return

    async def _render(self, *, final: bool) -> None:
        if final or self._text.strip():
            layout = layout_answer(self._text, max_messages=self._max_messages, final=final)
        else:
            layout = AnswerLayout([self._status] if self._status else [])
        wanted = layout.messages
        try:
            for index, content in enumerate(wanted):
                file = _answer_file(layout.file_text) if index == 0 else None
                if index < len(self._messages):
                    remove_controls = index == 0 and final and self._controls_shown
                    if self._shown[index] != content or file is not None or remove_controls:
                        view = None if remove_controls else KEEP_VIEW
                        await self._target.edit(self._messages[index], content, file=file, view=view)
                        self._shown[index] = content
                        self._controls_shown = self._controls_shown and not remove_controls
                else:
                    view = self._controls if index == 0 and not final else None
                    nonce = f"{self._nonce}.{index}" if self._nonce is not None else None
                    message = await self._target.send(
                        content, first=index == 0, file=file, view=view, nonce=nonce
                    )
                    self._messages.append(message)
                    self._shown.append(content)
                    self._controls_shown = self._controls_shown or view is not None
                    if self._on_sent is not None:
                        await self._on_sent(message)
            if final:
                while len(self._messages) > len(wanted):
                    await self._target.delete(self._messages[-1])
                    del self._messages[-1], self._shown[-1]
        except discord.HTTPException as exc:
            if exc.status in _FINAL_REFUSALS:
                self._refused = True
                log.warning("Discord refused a reply (HTTP %s): %s; no further updates", exc.status, exc.text)
                return
            # Anything else must not kill the stream: the next round (or the final one) tries again.
            log.warning("could not update a reply (HTTP %s): %s", exc.status, exc.text)
        except CONNECTION_GONE as exc:
            self._refused = True
            log.warning("could not update a reply, the connection to Discord is gone: %r", exc)


def _answer_file(text: str | None) -> discord.File | None:
    """The whole answer as a Markdown attachment, or None when it shows as messages."""
    if text is None:
        return None
    return discord.File(io.BytesIO(text.encode()), filename=ANSWER_FILE_NAME, description="The whole answer")
