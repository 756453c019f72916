"""Plain builders for the store tests: scopes, questions and media files."""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image

from bot.content import ChatMessage, ConversationScope, MediaKind, MediaPart, StoredMedia, TextPart


def scope(channel_id: int, thread_id: int | None = None) -> ConversationScope:
    """A Discord channel (or thread) scope in guild 7."""
    return ConversationScope(platform="discord", channel_id=channel_id, guild_id=7, thread_id=thread_id)


def question(text: str, *media: StoredMedia) -> ChatMessage:
    """A user message: the media first, then the text."""
    return ChatMessage("user", (*(MediaPart(item) for item in media), TextPart(text)))


def write_media(media_dir: Path, seed: int, *, kind: MediaKind = "image") -> StoredMedia:
    """A small PNG (distinct per seed) saved content-addressed under media_dir, as the media fetcher would."""
    staging = media_dir / "staging.png"
    Image.new("RGB", (8 + seed, 6), color=(seed % 256, 40, 200)).save(staging, format="PNG")
    data = staging.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    final = media_dir / sha256[:2] / f"{sha256}.png"
    final.parent.mkdir(exist_ok=True)
    staging.rename(final)
    mime_type = "image/png" if kind == "image" else "video/mp4"
    return StoredMedia(sha256, final, mime_type, 8 + seed, 6, len(data), kind)
