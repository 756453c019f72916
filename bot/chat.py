"""`python -m bot chat`: the same engine, store and media checks as the bot, in a terminal.

Lets a user check the model and GPU set-up before creating a Discord application. Answers stream to the
terminal. A one-shot question starts fresh and leaves nothing stored, unless `--conversation NAME` names a
history to continue; an interactive session continues its named history (`default` unless told) and says so.
Histories are stored like a channel's, so follow-ups see earlier turns and images.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from bot.answering import UNSAVED_NOTE, AnswerService, Question
from bot.app import running_service
from bot.content import ConversationScope
from bot.errors import BotError
from bot.settings import Settings

HELP = """Type a question and press Enter. Commands:
  /image PATH   attach an image (or video) to your next question
  /reset        forget this conversation
  /history      show how many turns and images are stored
  /quit         leave (Ctrl-D works too)"""
INTERACTIVE_CONVERSATION = "default"  # the history an interactive session continues when none is named


def conversation_scope(name: str) -> ConversationScope:
    """The stored scope of a named terminal conversation."""
    return ConversationScope(platform="cli", channel_id=zlib.crc32(name.encode()))


async def run_chat(
    settings: Settings,
    *,
    question: str | None,
    images: list[Path],
    conversation: str | None,
    reset: bool,
    out: TextIO | None = None,
) -> int:
    """Answer one question (when given) or run an interactive session; return the exit status.

    `conversation` names the stored history to continue; None means a fresh one-shot question (forgotten
    once answered) or, interactively, the `default` history.
    """
    out = out or sys.stdout
    missing = [str(path) for path in images if not path.is_file()]
    if missing:  # said before the model loads, which can take minutes
        print(f"No such file: {', '.join(missing)}", file=out)
        return 1
    one_shot = question is not None or bool(images)
    if conversation is None and one_shot:
        scope = conversation_scope(f"one-shot-{uuid.uuid4()}")
        async with running_service(settings) as service:
            try:
                return await _ask(service, scope, question or "", images, out)
            finally:
                await service.reset(scope)
    name = conversation or INTERACTIVE_CONVERSATION
    scope = conversation_scope(name)
    async with running_service(settings) as service:
        if reset:
            forgotten = await service.reset(scope)
            print(f"Forgot {forgotten.messages_deleted // 2} turns.", file=out)
        if one_shot:
            return await _ask(service, scope, question or "", images, out)
        stats = await service.stats(scope)
        print(
            f"Conversation {name!r}: {stats.turns} earlier turns remembered "
            "(/reset forgets them; --conversation NAME picks another).",
            file=out,
        )
        print(HELP, file=out)
        return await _interactive(service, scope, out)


async def _ask(
    service: AnswerService, scope: ConversationScope, text: str, images: list[Path], out: TextIO
) -> int:
    streamed: list[str] = []
    try:
        answer = await service.answer(
            Question(scope=scope, text=text, local_files=tuple(images)),
            on_text=_printer(out, streamed),
            on_queue_position=_position_printer(out),
        )
    except BotError as exc:
        print(f"\n{exc.user_message}", file=out)
        return 1
    if not "".join(streamed).strip():
        print(answer.text, end="", file=out)
    print(file=out, flush=True)
    if answer.recording is not None and await answer.stored_id() is None:
        print(UNSAVED_NOTE.strip(), file=out, flush=True)
    return 0


def _position_printer(out: TextIO) -> Callable[[int], None]:
    def print_position(ahead: int) -> None:
        if ahead > 0:
            print(f"[{ahead} question(s) ahead of yours]", file=out, flush=True)

    return print_position


def _printer(out: TextIO, streamed: list[str]) -> Callable[[str], None]:
    def print_delta(delta: str) -> None:
        streamed.append(delta)
        print(delta, end="", file=out, flush=True)

    return print_delta


async def _interactive(service: AnswerService, scope: ConversationScope, out: TextIO) -> int:
    pending_images: list[Path] = []
    while True:
        try:
            line = (await asyncio.to_thread(input, "you> ")).strip()
        except EOFError:
            print(file=out)
            return 0
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command == "/quit":
            return 0
        if command == "/reset":
            forgotten = await service.reset(scope)
            print(f"Forgot {forgotten.messages_deleted // 2} turns.", file=out)
        elif command == "/history":
            stats = await service.stats(scope)
            print(f"{stats.turns} turns, {stats.images} images stored.", file=out)
        elif command.startswith("/") and command != "/image":  # a typo is not a question for the model
            print(f"Unknown command {command}.\n{HELP}", file=out)
        elif command == "/image":
            paths = [Path(item).expanduser() for item in shlex.split(argument)]
            missing = [str(path) for path in paths if not path.is_file()]
            if missing or not paths:
                print(f"No such file: {', '.join(missing) or '(none given)'}", file=out)
            else:
                pending_images.extend(paths)
                print(f"Attached {len(pending_images)} file(s) to your next question.", file=out)
        else:
            print("bot> ", end="", file=out, flush=True)
            await _ask(service, scope, line, pending_images, out)
            pending_images = []
