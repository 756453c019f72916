"""A stored image decoded and resized as the model takes it, holding the full-size pixels only briefly.

`qwen_vl_utils.fetch_image` opens the file, converts it to RGB (a second full-size copy, even when it is RGB
already) and then resizes it with PIL's default filter (bicubic) to `budget.smart_resize`'s size: a
7900x7900 PNG costs about 500 MiB at its peak. `image_for_model` does the same arithmetic on the same
decoded pixels, so the result is pixel for pixel what `fetch_image` returns, but it resizes straight from
the decoded image (stored images are always RGB: no conversion) and drops that image at once: about half
the peak. Torch-free: the server backend uses it too.

`release_memory` hands freed pages back to the system after big decodes and batches: glibc keeps the freed
memory of worker threads' arenas for reuse, and without it a 7900x7900 PNG validated in a worker thread
left ~240 MiB resident after the answer, and twelve of them 200 MiB more after their batch
(`bench/bench_big_images.py`).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from bot.engine.budget import smart_resize


def image_for_model(path: Path | str, *, min_pixels: int, max_pixels: int) -> Image.Image:
    """The RGB image at `path`, resized into [min_pixels, max_pixels] exactly as `fetch_image` resizes it."""
    with Image.open(path) as opened:
        opened.load()
        full = _to_rgb(opened)
        height, width = smart_resize(full.height, full.width, min_pixels=min_pixels, max_pixels=max_pixels)
        resized = full.resize((width, height))  # a copy when the size is already right
        del full
        opened.close()  # the full-size pixels go now, not when the caller's frame ends
    release_memory(4 * opened.width * opened.height)  # Pillow keeps RGB in 4 bytes a pixel
    return resized


def _to_rgb(image: Image.Image) -> Image.Image:
    """`qwen_vl_utils.to_rgb`, without its copy of an image that is RGB already."""
    if image.mode == "RGB":
        return image
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def is_model_size(image: Image.Image, *, min_pixels: int, max_pixels: int) -> bool:
    """Whether `smart_resize` leaves `image`'s size as it is, so resizing it again changes nothing."""
    size = smart_resize(image.height, image.width, min_pixels=min_pixels, max_pixels=max_pixels)
    return size == (image.height, image.width)


TRIM_AFTER_BYTES = 64 * 1024 * 1024  # a 16-megapixel decode, or the pixel values of a few images


def release_memory(freed_bytes: int) -> None:
    """After `freed_bytes` were freed: hand freed heap pages back to the system when that was much.

    `malloc_trim(0)` on glibc (a few milliseconds); nothing elsewhere, or under `TRIM_AFTER_BYTES`.
    """
    trim = _malloc_trim()
    if trim is not None and freed_bytes >= TRIM_AFTER_BYTES:
        trim()


@functools.cache
def _malloc_trim() -> Callable[[], None] | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    trim = libc.malloc_trim
    return lambda: trim(0)
