"""Videos: sniffed, probed with PyAV, stored as their original bytes."""

from __future__ import annotations

import hashlib

import pytest

from bot.errors import CorruptMedia, TooLarge, UnsupportedMediaType
from bot.media import MediaFetcher
from bot.settings import MediaSettings
from tests.media.conftest import MediaServer
from tests.media.factories import video


@pytest.mark.parametrize(
    ("container", "codec", "mime_type", "extension"),
    [
        ("mp4", "mpeg4", "video/mp4", ".mp4"),
        ("mp4", "libx264", "video/mp4", ".mp4"),
        ("webm", "libvpx", "video/webm", ".webm"),
        ("mov", "mpeg4", "video/quicktime", ".mov"),
    ],
)
async def test_videos_are_stored_as_is(
    media_server: MediaServer,
    fetcher: MediaFetcher,
    container: str,
    codec: str,
    mime_type: str,
    extension: str,
) -> None:
    data = video(container, codec)
    stored = await fetcher.fetch(media_server.serve_bytes(f"/clip{extension}", data))
    assert (stored.kind, stored.mime_type, stored.width, stored.height) == ("video", mime_type, 64, 48)
    assert stored.path.suffix == extension
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.path.read_bytes() == data and stored.byte_size == len(data)


async def test_video_uses_the_video_byte_cap(fetcher: MediaFetcher, media_settings: MediaSettings) -> None:
    data = video("webm", "libvpx")
    padded = data + b"\0" * (media_settings.max_bytes + 1 - len(data))  # over the image cap only
    stored = await fetcher.store_bytes(padded)
    assert stored.kind == "video"
    with pytest.raises(TooLarge) as caught:
        await fetcher.store_bytes(data + b"\0" * media_settings.max_video_bytes)
    assert caught.value.limit_bytes == media_settings.max_video_bytes


async def test_broken_video_is_corrupt(fetcher: MediaFetcher) -> None:
    data = video("mp4", "mpeg4")
    with pytest.raises(CorruptMedia) as caught:
        await fetcher.store_bytes(data[:40])
    assert caught.value.user_message == CorruptMedia.video_message, "a damaged video is not called an image"


async def test_heic_brand_is_not_a_video(fetcher: MediaFetcher) -> None:
    with pytest.raises(UnsupportedMediaType):
        await fetcher.store_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\0" * 64)
