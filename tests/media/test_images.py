"""Image validation and normalisation: sniffing, pixel cap, corrupt files, orientation, content addressing."""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import pytest
from PIL import Image

from bot.content import StoredMedia
from bot.errors import CorruptMedia, TooLarge, TooManyPixels, Unreachable, UnsupportedMediaType
from bot.media import MediaFetcher
from bot.settings import MediaSettings
from tests.media.conftest import MediaServer
from tests.media.factories import (
    BLUE,
    RED,
    animated_gif,
    animated_webp,
    encode,
    exif_rotated_jpeg,
    png_bomb,
    two_colour_image,
)


def assert_close(actual: tuple[int, ...], expected: tuple[int, int, int], tolerance: int = 30) -> None:
    assert all(abs(a - e) <= tolerance for a, e in zip(actual[:3], expected, strict=True)), (actual, expected)


def open_stored(stored: StoredMedia) -> Image.Image:
    with Image.open(stored.path) as image:
        assert image.format == "PNG"
        return image.convert("RGB") if image.mode != "RGB" else image.copy()


def assert_content_addressed(stored: StoredMedia, media_dir: Path) -> None:
    data = stored.path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == stored.sha256
    assert stored.byte_size == len(data)
    assert stored.path == media_dir.resolve() / stored.sha256[:2] / f"{stored.sha256}{stored.path.suffix}"


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("PNG", {}),
        ("JPEG", {"quality": 95}),
        ("WEBP", {"lossless": True}),
        ("GIF", {}),
        ("PNG", {"mode": "RGBA"}),
    ],
)
async def test_good_images_are_normalised_to_rgb_png(
    media_server: MediaServer, fetcher: MediaFetcher, tmp_path: Path, fmt: str, options: dict[str, object]
) -> None:
    mode = options.pop("mode", "RGB")
    image = two_colour_image().convert(str(mode))
    url = media_server.serve_bytes(f"/picture.{fmt.lower()}", encode(image, fmt, **options))
    stored = await fetcher.fetch(url)
    assert (stored.kind, stored.mime_type, stored.width, stored.height) == ("image", "image/png", 40, 20)
    assert stored.path.suffix == ".png"
    assert_content_addressed(stored, tmp_path / "media")
    saved = open_stored(stored)
    assert saved.mode == "RGB"
    assert_close(saved.getpixel((2, 10)), RED)
    assert_close(saved.getpixel((37, 10)), BLUE)


async def test_transparent_pixels_become_white(fetcher: MediaFetcher) -> None:
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    stored = await fetcher.store_bytes(encode(image, "PNG"))
    assert open_stored(stored).getpixel((4, 4)) == (255, 255, 255)


@pytest.mark.parametrize("make", [animated_gif, animated_webp], ids=["gif", "webp"])
async def test_animations_keep_their_first_frame(fetcher: MediaFetcher, make: object) -> None:
    assert callable(make)
    stored = await fetcher.store_bytes(make())
    assert (stored.width, stored.height) == (16, 12)
    assert_close(open_stored(stored).getpixel((8, 6)), RED)


async def test_exif_orientation_is_applied(fetcher: MediaFetcher) -> None:
    stored = await fetcher.store_bytes(exif_rotated_jpeg())
    assert (stored.width, stored.height) == (20, 40)  # 40x20 turned a quarter
    saved = open_stored(stored)
    # Turned clockwise, the red left half ends up on top.
    assert_close(saved.getpixel((10, 3)), RED)
    assert_close(saved.getpixel((10, 36)), BLUE)


async def test_same_picture_twice_is_stored_once(
    media_server: MediaServer, fetcher: MediaFetcher, tmp_path: Path
) -> None:
    png = encode(two_colour_image(), "PNG")
    first = await fetcher.fetch(media_server.serve_bytes("/one.png", png))
    second = await fetcher.store_bytes(png)
    # Same pixels in another container (lossless WebP) normalise to the same stored file too.
    third = await fetcher.store_bytes(encode(two_colour_image(), "WEBP", lossless=True))
    assert first == second == third
    assert [path for path in (tmp_path / "media").rglob("*") if path.is_file()] == [first.path]


async def test_text_named_png_is_unsupported(fetcher: MediaFetcher, tmp_path: Path) -> None:
    for data in (b"hello, I am text\n", b"", b"\x89PN"):
        with pytest.raises(UnsupportedMediaType) as caught:
            await fetcher.store_bytes(data)
        assert caught.value.user_message.strip()
    path = tmp_path / "note.png"
    path.write_text("not a picture")
    with pytest.raises(UnsupportedMediaType):
        await fetcher.store_file(path)


async def test_truncated_jpeg_is_corrupt(media_server: MediaServer, fetcher: MediaFetcher) -> None:
    jpeg = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG", quality=90)
    for data in (jpeg[: len(jpeg) // 2], jpeg[:200] + b"\0" * 100):
        url = media_server.serve_bytes("/cut.jpg", data)
        with pytest.raises(CorruptMedia) as caught:
            await fetcher.fetch(url)
        assert caught.value.user_message.strip()


async def test_decompression_bomb_is_refused_from_its_header(
    media_server: MediaServer, fetcher: MediaFetcher, media_settings: MediaSettings
) -> None:
    bomb = png_bomb()
    assert len(bomb) < media_settings.max_bytes
    url = media_server.serve_bytes("/bomb.png", bomb)
    started = time.monotonic()
    with pytest.raises(TooManyPixels) as caught:
        await fetcher.fetch(url)
    assert time.monotonic() - started < 1.0
    assert "400,000,000" in caught.value.user_message
    assert f"{media_settings.max_pixels:,}" in caught.value.user_message


async def test_pillow_guard_applies_when_the_configured_cap_is_higher(
    tmp_path: Path, media_settings: MediaSettings
) -> None:
    settings = media_settings.model_copy(update={"max_pixels": 10**12})
    started = time.monotonic()
    async with MediaFetcher(settings, tmp_path) as fetcher:
        with pytest.raises(TooManyPixels) as caught:
            await fetcher.store_bytes(png_bomb())
    assert time.monotonic() - started < 1.0
    assert f"{Image.MAX_IMAGE_PIXELS:,}" in caught.value.user_message


async def test_just_over_the_pixel_cap(fetcher: MediaFetcher, media_settings: MediaSettings) -> None:
    side = int(media_settings.max_pixels**0.5) + 1
    data = encode(Image.new("1", (side, side)), "PNG")
    with pytest.raises(TooManyPixels):
        await fetcher.store_bytes(data)


async def test_store_bytes_enforces_the_byte_cap(
    fetcher: MediaFetcher, media_settings: MediaSettings
) -> None:
    data = encode(two_colour_image(), "PNG") + b"\0" * media_settings.max_bytes
    with pytest.raises(TooLarge) as caught:
        await fetcher.store_bytes(data)
    assert caught.value.limit_bytes == media_settings.max_bytes


async def test_store_file(fetcher: MediaFetcher, media_settings: MediaSettings, tmp_path: Path) -> None:
    path = tmp_path / "photo.jpeg"
    path.write_bytes(encode(two_colour_image(), "JPEG"))
    stored = await fetcher.store_file(path)
    assert (stored.width, stored.height, stored.mime_type) == (40, 20, "image/png")

    big = tmp_path / "big.bin"
    with big.open("wb") as handle:  # sparse: over every cap without writing the bytes
        handle.truncate(media_settings.max_video_bytes + 1)
    with pytest.raises(TooLarge):
        await fetcher.store_file(big)
    with pytest.raises(Unreachable) as caught:
        await fetcher.store_file(tmp_path / "missing.png")
    assert "missing.png" in caught.value.user_message


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "LA", "1"])
async def test_unusual_modes_become_rgb(fetcher: MediaFetcher, mode: str) -> None:
    image = two_colour_image().convert("RGB")
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    converted = image.convert(mode) if mode != "I;16" else image.convert("L").convert("I;16")
    stored = await fetcher.store_bytes(encode(converted, fmt))
    saved = open_stored(stored)
    assert saved.mode == "RGB" and saved.size == (40, 20)


def test_png_bomb_factory_is_what_it_claims() -> None:
    with Image.open(io.BytesIO(png_bomb(64, 32))) as small:
        small.load()
        assert small.size == (64, 32) and small.mode == "1"
