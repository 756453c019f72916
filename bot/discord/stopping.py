"""The Stop button on an answer while it streams: who may press it, and what a press does.

Each answer in progress is registered under its question's Discord id (a snowflake: unique, also across
restarts) with the asker's id. The button's custom id carries that key and is routed by discord.py's dynamic
items, so every press gets a response: the asker, or a member who may manage messages there, stops the
answer; anyone else is told privately that they can't; a press on an answer that has ended (or was begun
before a restart) is told so privately.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, cast

import discord

STOP_TEMPLATE = r"qvl:stop:(?P<key>[0-9]+)"
ALREADY_ENDED = "That answer has already ended."
NOT_YOURS = "Only the person who asked, or someone who can manage messages here, can stop this answer."


@dataclass(frozen=True, slots=True)
class RunningAnswer:
    """An answer that can still be stopped, and by whom."""

    asker_id: int
    stop: asyncio.Event = field(default_factory=asyncio.Event)


class RunningAnswers:
    """The answers in progress that show a Stop button, by their question's Discord id."""

    def __init__(self) -> None:
        self._running: dict[int, RunningAnswer] = {}

    @contextmanager
    def register(self, key: int, asker_id: int) -> Iterator[RunningAnswer]:
        """Make the answer to question `key` stoppable for the duration of the block."""
        running = self._running[key] = RunningAnswer(asker_id)
        try:
            yield running
        finally:
            if self._running.get(key) is running:
                del self._running[key]

    def get(self, key: int) -> RunningAnswer | None:
        """The answer in progress for question `key`, if any."""
        return self._running.get(key)


class HasRunningAnswers(Protocol):
    """The client a Stop press arrives at."""

    @property
    def running_answers(self) -> RunningAnswers: ...


class StopButton(discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]], template=STOP_TEMPLATE):
    """The ⏹️ Stop button of the answer to question `key`."""

    def __init__(self, key: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Stop", emoji="⏹️", style=discord.ButtonStyle.secondary, custom_id=f"qvl:stop:{key}"
            )
        )
        self.key = key

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction,
        item: discord.ui.Item[discord.ui.View],
        match: re.Match[str],
        /,
    ) -> StopButton:
        return cls(int(match["key"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        running = cast(HasRunningAnswers, interaction.client).running_answers.get(self.key)
        if running is None:
            await interaction.response.send_message(ALREADY_ENDED, ephemeral=True)
        elif interaction.user.id != running.asker_id and not interaction.permissions.manage_messages:
            await interaction.response.send_message(NOT_YOURS, ephemeral=True)
        else:
            running.stop.set()
            await interaction.response.defer()  # acknowledged; the answer's final edit removes the button


def stop_controls(key: int) -> discord.ui.View:
    """The components an answer in progress shows: its Stop button."""
    view = discord.ui.View(timeout=None)
    view.add_item(StopButton(key))
    return view
