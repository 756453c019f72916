"""Qwen messages → OpenAI messages: lossless PNGs, the resize rule, and the encoded-image cache."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bot.engine.openai_format import ImageUrlCache, image_data_url, png_bytes, to_openai_messages
from bot.settings import VisionSettings


def noisy(size: tuple[int, int], seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def decoded(url: str) -> Image.Image:
    header, data = url.split(",", 1)
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_png_bytes_are_lossless_for_any_size() -> None:
    for size in [(1, 1), (29, 3), (640, 480), (3, 301)]:
        image = noisy(size, seed=sum(size))
        again = Image.open(io.BytesIO(png_bytes(image)))
        again.load()
        assert again.mode == "RGB" and np.array_equal(np.asarray(again), np.asarray(image))


def test_image_data_url_resizes_as_qwen_vl_utils_does(tmp_path: Path) -> None:
    from qwen_vl_utils import fetch_image

    path = tmp_path / "photo.jpg"
    noisy((333, 250), seed=1).save(path, quality=90)
    limits = {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28}

    sent = decoded(image_data_url(path, **limits))
    expected = fetch_image({"image": str(path), **limits})
    assert sent.size == expected.size
    assert np.array_equal(np.asarray(sent.convert("RGB")), np.asarray(expected))


def test_the_cache_encodes_each_image_once_and_keeps_to_its_budget() -> None:
    cache = ImageUrlCache(max_bytes=10)
    made: list[str] = []

    def maker(value: str):  # type: ignore[no-untyped-def]
        return lambda: made.append(value) or value

    assert cache.get(("a", 1, 2), maker("aaaa")) == "aaaa"
    assert cache.get(("a", 1, 2), maker("other")) == "aaaa", "a hit does not encode again"
    assert cache.get(("a", 1, 3), maker("bbbb")) == "bbbb", "other pixel limits are another entry"
    assert cache.get(("c", 1, 2), maker("cccc")) == "cccc"  # 12 bytes: the oldest ("a", 1, 2) goes
    assert cache.get(("a", 1, 2), maker("aaaa")) == "aaaa"
    assert made == ["aaaa", "bbbb", "cccc", "aaaa"]
    assert cache.get(("huge", 1, 2), maker("x" * 11)) == "x" * 11, "too big to keep, still answered"


def test_roles_and_parts_take_the_openai_shape(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    noisy((56, 56), seed=2).save(path)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "What?"}],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "A "}, {"type": "text", "text": "square."}],
        },
        {"role": "user", "content": "And now?"},
    ]
    converted = to_openai_messages(messages, VisionSettings(), accepts_video=False)
    assert converted[0] == {"role": "system", "content": "Be brief."}
    assert converted[1]["content"][0]["type"] == "image_url"  # type: ignore[index]
    assert converted[1]["content"][1] == {"type": "text", "text": "What?"}  # type: ignore[index]
    assert converted[2] == {"role": "assistant", "content": "A square."}
    assert converted[3] == {"role": "user", "content": "And now?"}


def test_images_missing_from_the_cache_are_made_one_at_a_time() -> None:
    cache = ImageUrlCache(max_bytes=1000)
    making = 0
    most = 0
    made: list[str] = []
    lock = threading.Lock()

    def maker(value: str) -> Callable[[], str]:
        def make() -> str:
            nonlocal making, most
            with lock:
                making += 1
                most = max(most, making)
            time.sleep(0.02)  # a decode: the others would overlap it if they could
            with lock:
                making -= 1
                made.append(value)
            return value

        return make

    keys = [("a", 1, 2), ("b", 1, 2), ("a", 1, 2), ("c", 1, 2)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        urls = list(pool.map(lambda key: cache.get(key, maker(key[0])), keys))
    assert urls == ["a", "b", "a", "c"]
    assert most == 1 and sorted(made) == ["a", "b", "c"], "one at a time, and 'a' only once"
