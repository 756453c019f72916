"""Recognise an attachment's real type from its first bytes; names and Content-Type headers are ignored."""

from __future__ import annotations

from dataclasses import dataclass

from bot.content import MediaKind

SNIFF_BYTES = 64
"""How many leading bytes `sniff` needs to decide (fewer is fine when the whole file is shorter)."""

# ISO-BMFF brands that are still images, not videos (HEIF/HEIC/AVIF share the `ftyp` box with MP4).
_STILL_IMAGE_BRANDS = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis"}
)


@dataclass(frozen=True, slots=True)
class MediaType:
    """A type the bot accepts: what kind it is, its MIME type and the file extension it is stored under."""

    name: str
    kind: MediaKind
    mime_type: str
    extension: str


PNG = MediaType("png", "image", "image/png", ".png")
JPEG = MediaType("jpeg", "image", "image/jpeg", ".jpg")
GIF = MediaType("gif", "image", "image/gif", ".gif")
WEBP = MediaType("webp", "image", "image/webp", ".webp")
MP4 = MediaType("mp4", "video", "video/mp4", ".mp4")
MOV = MediaType("mov", "video", "video/quicktime", ".mov")
WEBM = MediaType("webm", "video", "video/webm", ".webm")


def sniff(head: bytes) -> MediaType | None:
    """The type of a file starting with `head` (its first `SNIFF_BYTES` bytes), or None if not accepted."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith((b"GIF87a", b"GIF89a")):
        return GIF
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return WEBP
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _STILL_IMAGE_BRANDS:
            return None
        return MOV if brand == b"qt  " else MP4
    # Matroska and WebM share the EBML header; its DocType element names which one it is.
    if head.startswith(b"\x1a\x45\xdf\xa3") and b"webm" in head[:SNIFF_BYTES]:
        return WEBM
    return None
