"""Decoding, blocking and meant for a worker thread: images under a pixel cap, normalised to RGB PNG; videos
probed for their frame size.

Images are opened with the one Pillow plugin that matches the sniffed type, which reads only the header, so
the pixel count is checked before a single pixel is allocated. Pillow's own `Image.MAX_IMAGE_PIXELS` guard
(which `Image.open` would apply) is honoured too: the effective cap is the smaller of the two.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from PIL import GifImagePlugin, Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from bot.errors import CorruptMedia, MediaError, TooManyPixels, UnsupportedMediaType
from bot.media.sniff import GIF, JPEG, PNG, WEBP, MediaType

_OPENERS: dict[MediaType, type[ImageFile.ImageFile]] = {
    PNG: PngImagePlugin.PngImageFile,
    JPEG: JpegImagePlugin.JpegImageFile,
    GIF: GifImagePlugin.GifImageFile,
    WEBP: WebPImagePlugin.WebPImageFile,
}
_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True, slots=True)
class NormalizedImage:
    """An image re-encoded as PNG: RGB, EXIF orientation applied, first frame only."""

    png: bytes
    width: int
    height: int


def normalize_image(data: bytes, media_type: MediaType, max_pixels: int) -> NormalizedImage:
    """Decode `data` (sniffed as `media_type`) under the pixel cap and re-encode it as an RGB PNG.

    Raises TooManyPixels before decoding when the header announces more than the cap, CorruptMedia when the
    pixels do not decode (truncated or damaged files).
    """
    opener = _OPENERS.get(media_type)
    if opener is None:
        raise UnsupportedMediaType(f"{media_type.name} is not an image type")
    limit = _pixel_limit(max_pixels)
    try:
        with opener(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > limit:
                raise TooManyPixels(f"{width}x{height} image", pixels=width * height, limit=limit)
            image.load()  # the first frame of an animation; raises on truncated data
            rgb = _to_rgb(ImageOps.exif_transpose(image))
        out = io.BytesIO()
        rgb.save(out, format="PNG")
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooManyPixels(str(exc), pixels=_pixels_in(str(exc), limit), limit=limit) from None
    except Exception as exc:  # Pillow signals malformed input with many exception types
        raise CorruptMedia(f"{media_type.name} does not decode: {exc!r}") from None
    return NormalizedImage(out.getvalue(), rgb.width, rgb.height)


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
        raise CorruptMedia(f"video does not open: {exc!r}") from None
    if width <= 0 or height <= 0:
        raise CorruptMedia(f"video stream reports a {width}x{height} frame")
    if width * height > max_pixels:
        raise TooManyPixels(f"{width}x{height} video", pixels=width * height, limit=max_pixels)
    return width, height


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
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
