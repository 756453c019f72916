"""Decoding, blocking and meant for a worker thread: images validated under a pixel cap, then kept as sent
or re-encoded; videos probed for their frame size.

Images are opened with the one Pillow plugin that matches the sniffed type, which reads only the header, so
the pixel count is checked before a single pixel is allocated. Pillow's own `Image.MAX_IMAGE_PIXELS` guard
(which `Image.open` would apply) is honoured too: the effective cap is the smaller of the two.

What is stored is always an RGB, upright, single-frame image whose every pixel decoded:

    kept as sent   a JPEG, PNG (8 bits per channel) or WebP that is one RGB frame without alpha, transparency
                   or an EXIF orientation other than 1. The whole stream is decoded once to prove it is intact
                   (a JPEG at 1/8 scale: every block is still entropy-decoded, so truncation still shows).
    re-encoded     anything else (rotation, alpha, palette, grayscale, CMYK, 16 bits, GIF, animation):
                   orientation applied, first frame, alpha laid over white, then saved as JPEG quality 95 when
                   the upload was a JPEG (it was lossy already), else as lossless PNG.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from PIL import GifImagePlugin, Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from bot.engine.budget import MAX_ASPECT_RATIO
from bot.errors import CorruptMedia, MediaError, TooElongated, TooManyPixels, UnsupportedMediaType
from bot.media.sniff import GIF, JPEG, PNG, WEBP, MediaType

_OPENERS: dict[MediaType, type[ImageFile.ImageFile]] = {
    PNG: PngImagePlugin.PngImageFile,
    JPEG: JpegImagePlugin.JpegImageFile,
    GIF: GifImagePlugin.GifImageFile,
    WEBP: WebPImagePlugin.WebPImageFile,
}
_KEEPABLE = frozenset({JPEG, PNG, WEBP})
_BACKGROUND = (255, 255, 255)
_ORIENTATION_TAG = 0x0112
_JPEG_QUALITY = 95


@dataclass(frozen=True, slots=True)
class ValidatedImage:
    """An image ready to store: RGB, upright, first frame only.

    `data` is the upload itself when `kept` is true, else the re-encoded image; `media_type` is its format.
    """

    data: bytes
    media_type: MediaType
    width: int
    height: int
    kept: bool


def validate_image(data: bytes, media_type: MediaType, max_pixels: int) -> ValidatedImage:
    """Decode `data` (sniffed as `media_type`) under the pixel cap; keep it as sent or re-encode it.

    Raises TooManyPixels before decoding when the header announces more than the cap, CorruptMedia when the
    pixels do not decode (truncated or damaged files).
    """
    limit = _pixel_limit(max_pixels)
    try:
        with _opener(media_type)(io.BytesIO(data)) as image:
            width, height = _checked_size(image, limit)
            if _decode_and_check_keepable(image, media_type):
                return ValidatedImage(data, media_type, width, height, kept=True)
            ImageOps.exif_transpose(image, in_place=True)  # in place: one full-size copy fewer at the peak
            upright = _to_rgb(image)
        stored_type = JPEG if media_type == JPEG else PNG
        out = io.BytesIO()
        if stored_type == JPEG:
            upright.save(out, format="JPEG", quality=_JPEG_QUALITY)
        else:
            upright.save(out, format="PNG")
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooManyPixels(str(exc), pixels=_pixels_in(str(exc), limit), limit=limit) from None
    except Exception as exc:  # Pillow signals malformed input with many exception types
        raise CorruptMedia(f"{media_type.name} does not decode: {exc!r}") from None
    return ValidatedImage(out.getvalue(), stored_type, upright.width, upright.height, kept=False)


def image_size(data: bytes, media_type: MediaType, max_pixels: int) -> tuple[int, int]:
    """Width and height from the header of an image validated before; nothing is decoded.

    Raises TooManyPixels when the size is over the cap (which may have been lowered since), CorruptMedia
    when the header does not parse.
    """
    limit = _pixel_limit(max_pixels)
    try:
        with _opener(media_type)(io.BytesIO(data)) as image:
            return _checked_size(image, limit)
    except MediaError:
        raise
    except Exception as exc:
        raise CorruptMedia(f"{media_type.name} header does not parse: {exc!r}") from None


def probe_video(data: bytes, max_pixels: int) -> tuple[int, int]:
    """The frame size of the first video stream in `data`; CorruptMedia when the container does not open."""
    import av  # imported lazily: only videos need FFmpeg

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise UnsupportedMediaType("container holds no video stream")
            context = container.streams.video[0].codec_context
            width, height = context.width, context.height
    except MediaError:
        raise
    except Exception as exc:  # PyAV raises FFmpeg errors and plain OSError/ValueError for bad input
        raise CorruptMedia(f"video does not open: {exc!r}", user_message=CorruptMedia.video_message) from None
    if width <= 0 or height <= 0:
        raise CorruptMedia(
            f"video stream reports a {width}x{height} frame", user_message=CorruptMedia.video_message
        )
    if width * height > max_pixels:
        raise TooManyPixels(f"{width}x{height} video", pixels=width * height, limit=max_pixels)
    return width, height


def _opener(media_type: MediaType) -> type[ImageFile.ImageFile]:
    opener = _OPENERS.get(media_type)
    if opener is None:
        raise UnsupportedMediaType(f"{media_type.name} is not an image type")
    return opener


def _checked_size(image: Image.Image, limit: int) -> tuple[int, int]:
    width, height = image.size
    if width * height > limit:
        raise TooManyPixels(f"{width}x{height} image", pixels=width * height, limit=limit)
    if max(width, height) > MAX_ASPECT_RATIO * max(min(width, height), 1):
        raise TooElongated(f"{width}x{height} image")  # the model's resize rule refuses it
    return width, height


def _decode_and_check_keepable(image: ImageFile.ImageFile, media_type: MediaType) -> bool:
    """Decode every pixel of the first frame (raising on damaged data); whether the upload can be stored as
    sent. A keepable JPEG is decoded at 1/8 scale only, so `image` is then not fit for re-encoding."""
    keepable = (
        media_type in _KEEPABLE
        and image.mode == "RGB"
        and "transparency" not in image.info
        and getattr(image, "n_frames", 1) == 1
        # PNG: 8 bits per channel (16-bit RGB also opens as mode RGB); read from the header, before load.
        and (media_type != PNG or all(tile.args == "RGB" for tile in image.tile))
    )
    if keepable and media_type == JPEG and _is_upright(image):  # JPEG EXIF precedes the pixels
        image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
        return True
    image.load()  # the first frame of an animation; raises on truncated data
    # PNG may carry its eXIf chunk after the pixels, so orientation is read once everything is loaded.
    return keepable and media_type != JPEG and _is_upright(image)


def _is_upright(image: Image.Image) -> bool:
    """No EXIF (or XMP) orientation, or orientation 1; any other value, even malformed, means re-encoding."""
    return image.getexif().get(_ORIENTATION_TAG, 1) == 1


def _pixel_limit(max_pixels: int) -> int:
    pillow_limit = Image.MAX_IMAGE_PIXELS
    return max_pixels if pillow_limit is None else min(max_pixels, pillow_limit)


def _pixels_in(message: str, limit: int) -> int:
    """The pixel count Pillow names in its decompression-bomb message, or just over the limit."""
    match = re.search(r"\((\d+) pixels\)", message)
    return int(match.group(1)) if match else limit + 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels are laid over white so they do not turn black (the model sees no alpha)."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
