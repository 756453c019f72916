"""Images: sniffing, pixel cap, corrupt files, kept as sent or re-encoded, content addressing, repeats."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from bot.content import StoredMedia
from bot.errors import (
    CorruptMedia,
    TooElongated,
    TooLarge,
    TooManyPixels,
    Unreachable,
    UnsupportedMediaType,
)
from bot.media import MediaFetcher
from bot.metrics import Metrics
from bot.settings import MediaSettings
from tests.media.conftest import MediaServer
from tests.media.factories import (
    BLUE,
    RED,
    animated_gif,
    animated_webp,
    encode,
    exif_rotated_jpeg,
    exif_with_orientation,
    png_bomb,
    rgb16_png,
    two_colour_image,
)

FORMATS = {"image/png": ("PNG", ".png"), "image/jpeg": ("JPEG", ".jpg"), "image/webp": ("WEBP", ".webp")}


def assert_close(actual: tuple[int, ...], expected: tuple[int, int, int], tolerance: int = 30) -> None:
    assert all(abs(a - e) <= tolerance for a, e in zip(actual[:3], expected, strict=True)), (actual, expected)


def open_stored(stored: StoredMedia) -> Image.Image:
    """The stored image, after checking that its format, suffix and size match what StoredMedia says."""
    fmt, suffix = FORMATS[stored.mime_type]
    assert stored.path.suffix == suffix
    with Image.open(stored.path) as image:
        assert image.format == fmt
        assert image.mode == "RGB" and image.size == (stored.width, stored.height)
        assert image.getexif().get(0x0112, 1) == 1
        return image.copy()


def assert_content_addressed(stored: StoredMedia, media_dir: Path) -> None:
    data = stored.path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == stored.sha256
    assert stored.byte_size == len(data)
    assert stored.path == media_dir.resolve() / stored.sha256[:2] / f"{stored.sha256}{stored.path.suffix}"


def stored_files(media_dir: Path) -> list[Path]:
    return sorted(path for path in media_dir.rglob("*") if path.is_file())


@pytest.mark.parametrize(
    ("fmt", "options", "mime_type"),
    [
        ("JPEG", {"quality": 95}, "image/jpeg"),
        ("JPEG", {"quality": 95, "progressive": True}, "image/jpeg"),
        ("JPEG", {"quality": 95, "exif": exif_with_orientation(1)}, "image/jpeg"),
        ("PNG", {}, "image/png"),
        ("WEBP", {"lossless": True}, "image/webp"),
        ("WEBP", {"quality": 90}, "image/webp"),
    ],
    ids=["jpeg", "progressive-jpeg", "jpeg-orientation-1", "png", "lossless-webp", "lossy-webp"],
)
async def test_upright_rgb_uploads_are_stored_byte_identical(
    media_server: MediaServer,
    fetcher: MediaFetcher,
    tmp_path: Path,
    fmt: str,
    options: dict[str, object],
    mime_type: str,
) -> None:
    upload = encode(two_colour_image(), fmt, **options)
    stored = await fetcher.fetch(media_server.serve_bytes(f"/picture.{fmt.lower()}", upload))
    assert (stored.kind, stored.mime_type, stored.width, stored.height) == ("image", mime_type, 40, 20)
    assert stored.path.read_bytes() == upload
    assert stored.sha256 == hashlib.sha256(upload).hexdigest()
    assert_content_addressed(stored, tmp_path / "media")
    saved = open_stored(stored)
    assert_close(saved.getpixel((2, 10)), RED)
    assert_close(saved.getpixel((37, 10)), BLUE)


async def test_tiny_jpeg_is_kept(fetcher: MediaFetcher) -> None:
    upload = encode(Image.new("RGB", (3, 2), RED), "JPEG")  # smaller than one 1/8-scale block
    stored = await fetcher.store_bytes(upload)
    assert (stored.mime_type, stored.width, stored.height) == ("image/jpeg", 3, 2)
    assert stored.path.read_bytes() == upload


async def test_exif_rotated_jpeg_is_reencoded_as_an_upright_jpeg(
    fetcher: MediaFetcher, tmp_path: Path
) -> None:
    upload = exif_rotated_jpeg()
    stored = await fetcher.store_bytes(upload)
    assert (stored.mime_type, stored.width, stored.height) == ("image/jpeg", 20, 40)  # 40x20 turned a quarter
    assert stored.path.read_bytes() != upload
    assert_content_addressed(stored, tmp_path / "media")
    saved = open_stored(stored)  # also checks that no orientation tag is left
    # Turned clockwise, the red left half ends up on top.
    assert_close(saved.getpixel((10, 3)), RED)
    assert_close(saved.getpixel((10, 36)), BLUE)


async def test_exif_rotated_png_is_reencoded_as_an_upright_png(fetcher: MediaFetcher) -> None:
    stored = await fetcher.store_bytes(encode(two_colour_image(), "PNG", exif=exif_with_orientation(6)))
    assert (stored.mime_type, stored.width, stored.height) == ("image/png", 20, 40)
    saved = open_stored(stored)
    assert saved.getpixel((10, 3)) == RED and saved.getpixel((10, 36)) == BLUE  # lossless


async def test_rgba_png_becomes_rgb_png_over_white(fetcher: MediaFetcher) -> None:
    image = two_colour_image().convert("RGBA")
    image.paste((0, 0, 0, 0), (0, 0, 8, 8))  # a fully transparent corner
    upload = encode(image, "PNG")
    stored = await fetcher.store_bytes(upload)
    assert (stored.mime_type, stored.width, stored.height) == ("image/png", 40, 20)
    assert stored.path.read_bytes() != upload
    saved = open_stored(stored)
    assert saved.getpixel((4, 4)) == (255, 255, 255)
    assert saved.getpixel((2, 15)) == RED and saved.getpixel((37, 10)) == BLUE


async def test_rgb_png_with_a_transparent_colour_is_reencoded(fetcher: MediaFetcher) -> None:
    stored = await fetcher.store_bytes(encode(two_colour_image(), "PNG", transparency=RED))
    assert stored.mime_type == "image/png"
    saved = open_stored(stored)
    assert saved.getpixel((2, 10)) == (255, 255, 255) and saved.getpixel((37, 10)) == BLUE


async def test_webp_with_alpha_is_reencoded_as_png(fetcher: MediaFetcher) -> None:
    image = two_colour_image().convert("RGBA")
    image.paste((0, 0, 0, 0), (0, 0, 8, 8))
    stored = await fetcher.store_bytes(encode(image, "WEBP", lossless=True))
    assert (stored.mime_type, stored.width, stored.height) == ("image/png", 40, 20)
    saved = open_stored(stored)
    assert saved.getpixel((4, 4)) == (255, 255, 255) and saved.getpixel((2, 15)) == RED


@pytest.mark.parametrize("make", [animated_gif, animated_webp], ids=["gif", "webp"])
async def test_animations_keep_their_first_frame_as_png(fetcher: MediaFetcher, make: object) -> None:
    assert callable(make)
    stored = await fetcher.store_bytes(make())
    assert (stored.mime_type, stored.width, stored.height) == ("image/png", 16, 12)
    with Image.open(stored.path) as saved:
        assert getattr(saved, "n_frames", 1) == 1
    assert_close(open_stored(stored).getpixel((8, 6)), RED)


async def test_still_gif_becomes_png(fetcher: MediaFetcher) -> None:
    stored = await fetcher.store_bytes(encode(two_colour_image(), "GIF"))
    assert (stored.mime_type, stored.width, stored.height) == ("image/png", 40, 20)
    assert_close(open_stored(stored).getpixel((2, 10)), RED)


@pytest.mark.parametrize(
    ("mode", "fmt", "mime_type"),
    [
        ("L", "PNG", "image/png"),
        ("P", "PNG", "image/png"),
        ("LA", "PNG", "image/png"),
        ("1", "PNG", "image/png"),
        ("I;16", "PNG", "image/png"),
        ("L", "JPEG", "image/jpeg"),
        ("CMYK", "JPEG", "image/jpeg"),
    ],
)
async def test_other_modes_are_reencoded_as_rgb(
    fetcher: MediaFetcher, mode: str, fmt: str, mime_type: str
) -> None:
    image = two_colour_image()
    converted = image.convert(mode) if mode != "I;16" else image.convert("L").convert("I;16")
    upload = encode(converted, fmt)
    stored = await fetcher.store_bytes(upload)
    assert (stored.mime_type, stored.width, stored.height) == (mime_type, 40, 20)
    assert stored.path.read_bytes() != upload
    open_stored(stored)  # RGB, the stated format and size


async def test_grayscale_png_keeps_its_grey_levels_in_rgb(fetcher: MediaFetcher) -> None:
    stored = await fetcher.store_bytes(encode(two_colour_image().convert("L"), "PNG"))
    grey = two_colour_image().convert("L").getpixel((2, 10))
    assert open_stored(stored).getpixel((2, 10)) == (grey, grey, grey)


async def test_16_bit_rgb_png_is_reencoded_at_8_bits(fetcher: MediaFetcher) -> None:
    upload = rgb16_png()
    stored = await fetcher.store_bytes(upload)
    assert (stored.mime_type, stored.width, stored.height) == ("image/png", 40, 20)
    assert stored.byte_size < len(upload) and stored.path.read_bytes()[24] == 8  # IHDR bit depth
    assert open_stored(stored).getpixel((2, 10)) == RED


async def test_same_upload_twice_is_stored_once(
    media_server: MediaServer, fetcher: MediaFetcher, tmp_path: Path
) -> None:
    png = encode(two_colour_image(), "PNG")
    first = await fetcher.fetch(media_server.serve_bytes("/one.png", png))
    second = await fetcher.store_bytes(png)
    assert first == second
    rotated_first = await fetcher.store_bytes(exif_rotated_jpeg())
    rotated_second = await fetcher.store_bytes(exif_rotated_jpeg())  # re-encoded the same way again
    assert rotated_first == rotated_second
    assert stored_files(tmp_path / "media") == sorted([first.path, rotated_first.path])


async def test_a_repeat_is_not_decoded_again(
    media_server: MediaServer, fetcher: MediaFetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload = encode(two_colour_image(), "JPEG", quality=90)
    first = await fetcher.store_bytes(upload)

    def must_not_decode(*_args: object) -> None:
        raise AssertionError("a repeat was decoded again")

    monkeypatch.setattr("bot.media.fetcher.validate_image", must_not_decode)
    assert await fetcher.store_bytes(upload) == first
    assert await fetcher.fetch(media_server.serve_bytes("/again.jpg", upload)) == first
    with pytest.raises(AssertionError, match="decoded again"):  # a new upload still is
        await fetcher.store_bytes(encode(two_colour_image(), "JPEG", quality=80))


async def test_a_repeat_refreshes_the_stored_files_mtime(fetcher: MediaFetcher) -> None:
    """The purge's orphan sweep spares files younger than its grace period, so a reused file must look new."""
    uploads = (encode(two_colour_image(), "PNG"), exif_rotated_jpeg())  # kept as sent, and re-encoded
    for upload in uploads:
        stored = await fetcher.store_bytes(upload)
        long_ago = time.time() - 3 * 3600
        os.utime(stored.path, (long_ago, long_ago))
        started = time.time()
        assert await fetcher.store_bytes(upload) == stored
        assert stored.path.stat().st_mtime >= started - 1


async def test_a_repeat_over_a_lowered_pixel_cap_is_refused(
    fetcher: MediaFetcher, media_settings: MediaSettings, tmp_path: Path
) -> None:
    upload = encode(two_colour_image(), "PNG")
    await fetcher.store_bytes(upload)
    settings = media_settings.model_copy(update={"max_pixels": 40 * 20 - 1})
    async with MediaFetcher(settings, tmp_path / "media") as stricter:
        with pytest.raises(TooManyPixels):
            await stricter.store_bytes(upload)


async def test_text_named_png_is_unsupported(fetcher: MediaFetcher, tmp_path: Path) -> None:
    for data in (b"hello, I am text\n", b"", b"\x89PN"):
        with pytest.raises(UnsupportedMediaType) as caught:
            await fetcher.store_bytes(data)
        assert caught.value.user_message.strip()
    path = tmp_path / "note.png"
    path.write_text("not a picture")
    with pytest.raises(UnsupportedMediaType):
        await fetcher.store_file(path)


async def test_truncated_jpeg_on_the_kept_path_is_corrupt(
    media_server: MediaServer, fetcher: MediaFetcher, tmp_path: Path
) -> None:
    jpeg = encode(Image.effect_noise((256, 256), 50).convert("RGB"), "JPEG", quality=90)
    with Image.open(io.BytesIO(jpeg)) as image:  # the premise: an upright RGB JPEG, stored as sent when whole
        assert image.mode == "RGB" and not image.getexif()
    for data in (jpeg[: len(jpeg) // 2], jpeg[:-2], jpeg[:200] + b"\0" * 100):
        url = media_server.serve_bytes("/cut.jpg", data)
        with pytest.raises(CorruptMedia) as caught:
            await fetcher.fetch(url)
        assert caught.value.user_message.strip()
    assert stored_files(tmp_path / "media") == []
    assert (await fetcher.store_bytes(jpeg)).path.read_bytes() == jpeg


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("JPEG", {"exif": exif_with_orientation(6)}), ("PNG", {}), ("WEBP", {"quality": 90})],
    ids=["rotated-jpeg", "png", "webp"],
)
async def test_truncated_images_are_corrupt(
    fetcher: MediaFetcher, fmt: str, options: dict[str, object]
) -> None:
    data = encode(Image.effect_noise((128, 128), 50).convert("RGB"), fmt, **options)
    with pytest.raises(CorruptMedia):
        await fetcher.store_bytes(data[: len(data) * 2 // 3])


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
    for data in (encode(Image.new("1", (side, side)), "PNG"), encode(Image.new("RGB", (side, side)), "JPEG")):
        with pytest.raises(TooManyPixels):
            await fetcher.store_bytes(data)


async def test_an_image_too_long_and_thin_for_the_model_is_refused_clearly(fetcher: MediaFetcher) -> None:
    for size in ((6000, 20), (20, 6000)):
        with pytest.raises(TooElongated) as caught:
            await fetcher.store_bytes(encode(Image.new("RGB", size, "white"), "PNG"))
        assert "crop" in caught.value.user_message
    stored = await fetcher.store_bytes(encode(Image.new("RGB", (4000, 20), "white"), "PNG"))  # 200:1 is fine
    assert (stored.width, stored.height) == (4000, 20)


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
    assert (stored.width, stored.height, stored.mime_type) == (40, 20, "image/jpeg")
    assert stored.path.read_bytes() == path.read_bytes()

    big = tmp_path / "big.bin"
    with big.open("wb") as handle:  # sparse: over every cap without writing the bytes
        handle.truncate(media_settings.max_video_bytes + 1)
    with pytest.raises(TooLarge):
        await fetcher.store_file(big)
    with pytest.raises(Unreachable) as caught:
        await fetcher.store_file(tmp_path / "missing.png")
    assert "missing.png" in caught.value.user_message


def test_png_bomb_factory_is_what_it_claims() -> None:
    with Image.open(io.BytesIO(png_bomb(64, 32))) as small:
        small.load()
        assert small.size == (64, 32) and small.mode == "1"


async def test_big_images_posted_at_once_are_decoded_one_after_another(
    media_settings: MediaSettings, tmp_path: Path
) -> None:
    # Each 900x900 PNG holds 81% of the 1,000,000-pixel cap: two never decode at once.
    uploads = [encode(Image.new("RGB", (900, 900), (shade, 90, 160)), "PNG") for shade in (10, 20, 30)]
    small = encode(two_colour_image(), "PNG")
    metrics = Metrics()
    async with MediaFetcher(media_settings, tmp_path / "media", metrics=metrics) as fetcher:
        stored = await asyncio.gather(*(fetcher.store_bytes(data) for data in uploads))
        assert [item.path.read_bytes() for item in stored] == uploads
        await fetcher.store_bytes(small)  # alone: no wait
        await fetcher.store_bytes(uploads[0])  # stored already: only its header is read
    assert metrics.registry.get_sample_value("qwenbot_media_decode_waits_total") == 2
