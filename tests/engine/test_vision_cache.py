"""The vision cache: same answers with and without it, fewer encoder runs, LRU eviction by bytes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from bot.engine.pipeline import Pipeline, PipelineRequest
from bot.engine.vision_cache import VisionCache
from tests.engine.media_files import write_png

GREEDY: dict[str, object] = {"max_new_tokens": 8, "do_sample": False}
PIXELS = 28 * 28


class EncoderCounter:
    """Counts the images the vision encoder really encodes (rows of `grid_thw` it is called with)."""

    def __init__(self, model: Any) -> None:
        self.images = 0
        self.calls = 0
        model.model.visual.register_forward_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        self.calls += 1
        self.images += kwargs["grid_thw"].shape[0]


@pytest.fixture
def model_and_processor(tiny_model_dir: Path) -> tuple[Any, Any]:
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    return model, processor


def _conversation(first: str, second: str) -> list[list[dict]]:
    """Three growing histories: a question about two images, a text follow-up, one more image."""
    turn1 = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": first},
                {"type": "image", "image": second},
                {"type": "text", "text": "Compare."},
            ],
        }
    ]
    turn2 = [
        *turn1,
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "text", "text": "How?"}]},
    ]
    turn3 = [
        *turn2,
        {"role": "assistant", "content": "In colour."},
        {
            "role": "user",
            "content": [{"type": "image", "image": first}, {"type": "text", "text": "This one again?"}],
        },
    ]
    return [turn1, turn2, turn3]


def test_cache_gives_identical_answers_and_skips_the_encoder(
    model_and_processor: tuple[Any, Any], tmp_path: Path
) -> None:
    model, processor = model_and_processor
    first = str(write_png(tmp_path / "a.png", 200, 150, seed=1))
    second = str(write_png(tmp_path / "b.png", 150, 200, seed=2))
    counter = EncoderCounter(model)
    plain = Pipeline(model, processor, min_pixels=4 * PIXELS, max_pixels=32 * PIXELS)
    cache = VisionCache(max_bytes=1 << 20)
    cached = Pipeline(model, processor, min_pixels=4 * PIXELS, max_pixels=32 * PIXELS, vision_cache=cache)

    for messages in _conversation(first, second):
        request = PipelineRequest(messages=messages, generate_kwargs=dict(GREEDY))
        assert cached.run_batch([request])[0].token_ids == plain.run_batch([request])[0].token_ids
    plain_images = 2 + 2 + 3

    assert counter.images - plain_images == 2  # with the cache: only the first turn's two images
    assert (cache.hits, cache.misses, len(cache)) == (5, 2, 2)

    counter.images = 0
    smaller = PipelineRequest(_conversation(first, second)[0], dict(GREEDY))
    cached.run_batch([smaller], pixel_scale=0.5)  # other pixel settings: other keys
    assert counter.images == 2 and len(cache) == 4


def test_batch_mixing_cached_and_new_images(model_and_processor: tuple[Any, Any], tmp_path: Path) -> None:
    model, processor = model_and_processor
    paths = [str(write_png(tmp_path / f"{index}.png", 70, 70, seed=index)) for index in range(3)]
    requests = [
        PipelineRequest(
            [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": "?"}]}],
            dict(GREEDY),
        )
        for path in paths
    ]
    plain = Pipeline(model, processor, min_pixels=4 * PIXELS, max_pixels=32 * PIXELS)
    cache = VisionCache(max_bytes=1 << 20)
    cached = Pipeline(model, processor, min_pixels=4 * PIXELS, max_pixels=32 * PIXELS, vision_cache=cache)
    cached.run_batch([requests[1]])
    counter = EncoderCounter(model)

    outputs = cached.run_batch(requests)

    assert counter.images == 2  # the middle image came from the cache
    assert [output.token_ids for output in outputs] == [
        output.token_ids for output in plain.run_batch(requests)
    ]
    assert "get_image_features" not in vars(model.model)  # the hook is gone after the call


def _tensor(values: int) -> torch.Tensor:
    return torch.zeros(values, dtype=torch.float32)  # 4 bytes per value


def test_lru_eviction_by_byte_budget() -> None:
    cache = VisionCache(max_bytes=100)
    cache.put("a", _tensor(10))
    cache.put("b", _tensor(10))
    assert cache.bytes_used == 80

    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", _tensor(6))  # 80 + 24 bytes is over budget: evicts "b", the least recently used

    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.bytes_used == 64
    assert (cache.hits, cache.misses) == (1, 0)
    assert cache.get("b") is None
    assert cache.misses == 1


def test_replacing_and_oversized_entries() -> None:
    cache = VisionCache(max_bytes=100)
    cache.put("a", _tensor(10))
    cache.put("a", _tensor(20))
    assert (len(cache), cache.bytes_used) == (1, 80)

    cache.put("huge", _tensor(26))  # 104 bytes: never fits
    assert "huge" not in cache and "a" in cache

    cache.clear()
    assert (len(cache), cache.bytes_used) == (0, 0)


def test_confined_to_one_thread() -> None:
    cache = VisionCache(max_bytes=100)
    cache.put("a", _tensor(1))
    errors: list[BaseException] = []

    def use() -> None:
        try:
            cache.get("a")
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=use)
    thread.start()
    thread.join()

    assert len(errors) == 1 and "confined" in str(errors[0])
