"""The JSON form of message parts: `{"type": "text", "text": ...}` and `{"type": "media", "sha256": ...}`.

Media parts keep only the file's hash; the `media` table holds the rest, so a file is described once however
many messages use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bot.content import MediaPart, Part, StoredMedia, TextPart
from bot.errors import StoreError

JsonPart = dict[str, str]


def encode_parts(parts: Sequence[Part]) -> list[JsonPart]:
    """The JSON list stored in `messages.content`, in the parts' order."""
    encoded: list[JsonPart] = []
    for part in parts:
        if isinstance(part, TextPart):
            encoded.append({"type": "text", "text": part.text})
        else:
            encoded.append({"type": "media", "sha256": part.media.sha256})
    return encoded


def media_hashes(content: Sequence[JsonPart]) -> set[str]:
    """The sha256 of every media part in a stored content list."""
    return {part["sha256"] for part in content if part["type"] == "media"}


def decode_parts(content: Sequence[JsonPart], media: Mapping[str, StoredMedia | None]) -> tuple[Part, ...]:
    """Parts back from their JSON form; `media` maps each referenced sha256 to its stored file, or to None
    when the file is gone from disk (that part is left out, the rest of the message stays)."""
    parts: list[Part] = []
    for part in content:
        if part["type"] == "text":
            parts.append(TextPart(part["text"]))
        elif part["type"] == "media" and part["sha256"] in media:
            stored = media[part["sha256"]]
            if stored is not None:
                parts.append(MediaPart(stored))
        else:
            raise StoreError(f"stored message part cannot be read: {part!r}")
    return tuple(parts)
