"""Plain data shared by every layer: stored media, message parts, chat messages, conversation scopes.

Nothing here knows Discord, SQL or torch. The store returns these, the media fetcher produces `StoredMedia`,
`bot.conversation` turns them into the Qwen `messages` list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Role = Literal["system", "user", "assistant"]
MediaKind = Literal["image", "video"]
Platform = Literal["discord", "cli"]


@dataclass(frozen=True, slots=True)
class StoredMedia:
    """A validated image (RGB, EXIF-oriented) or video, saved content-addressed on local disk."""

    sha256: str
    path: Path
    mime_type: str
    width: int
    height: int
    byte_size: int
    kind: MediaKind = "image"


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class MediaPart:
    media: StoredMedia


Part = TextPart | MediaPart


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a conversation, in order."""

    role: Role
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        """The message's text parts joined."""
        return "".join(part.text for part in self.parts if isinstance(part, TextPart))

    @property
    def media(self) -> tuple[StoredMedia, ...]:
        """The message's images and videos, in order."""
        return tuple(part.media for part in self.parts if isinstance(part, MediaPart))


@dataclass(frozen=True, slots=True)
class ConversationScope:
    """Where a conversation lives: a Discord channel, a thread, a DM, or a local `chat` session."""

    platform: Platform
    channel_id: int
    guild_id: int | None = None
    thread_id: int | None = None

    @property
    def key(self) -> str:
        """A unique, stable string for this scope (one conversation per key)."""
        where = self.thread_id if self.thread_id is not None else self.channel_id
        return f"{self.platform}:{self.guild_id or 0}:{self.channel_id}:{where}"
