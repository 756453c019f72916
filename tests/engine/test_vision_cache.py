"""The vision cache: same answers with and without it, fewer encoder runs, LRU eviction by bytes."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from bot.engine.pipeline import Pipeline, PipelineRequest
from bot.engine.vision_cache import FileDigests, VisionCache
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


def _image_part(source: str | Image.Image, **settings: int) -> dict:
    return {"type": "image", "image": source, **settings}


def _ask(*parts: dict) -> PipelineRequest:
    content = [*parts, {"type": "text", "text": "What is this?"}]
    return PipelineRequest([{"role": "user", "content": content}], dict(GREEDY))


def _encode_alone(pipeline: Pipeline, part: dict) -> torch.Tensor:
    """The uncached encoder output for one image part, prepared on its own."""
    inputs = pipeline.prepare([_ask(part)]).inputs
    with torch.inference_mode():
        features = pipeline.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    (embeds,) = features.pooler_output
    return embeds


def test_keys_follow_image_order_across_a_mixed_batch(
    model_and_processor: tuple[Any, Any], tmp_path: Path
) -> None:
    model, processor = model_and_processor
    sizes = [(60, 90), (120, 80), (70, 70), (150, 100)]
    paths = [str(write_png(tmp_path / f"{i}.png", w, h, seed=10 + i)) for i, (w, h) in enumerate(sizes)]
    in_memory = Image.open(write_png(tmp_path / "memory.png", 100, 60, seed=20)).convert("RGB")
    a, b, c, d = (_image_part(path) for path in paths)
    pil = _image_part(in_memory)
    plain = Pipeline(model, processor, min_pixels=4 * PIXELS, max_pixels=32 * PIXELS)
    cache = VisionCache(max_bytes=1 << 20)
    cached = Pipeline(model, processor, min_pixels=4 * PIXELS, max_pixels=32 * PIXELS, vision_cache=cache)
    cached.run_batch([_ask(b), _ask(d)])  # b and d are cached; a, c and the in-memory image are not
    requests = [
        _ask(a, b),
        PipelineRequest([{"role": "user", "content": "Hi"}], dict(GREEDY)),
        _ask(c, pil, d, a),
    ]
    counter = EncoderCounter(model)

    prepared = cached.prepare(requests)
    outputs = cached.run_batch(requests)

    order = [a, b, c, pil, d, a]  # message order across the batch's conversations
    alone = [cached.prepare([_ask(part)]).image_keys for part in order]
    assert prepared.image_keys == [keys[0] for keys in alone if keys]
    assert len(set(prepared.image_keys)) == 5  # a appears twice, under one key
    assert counter.images == 4  # a, c, the in-memory image and a again: one encoder call for the misses
    assert [output.token_ids for output in outputs] == [
        output.token_ids for output in plain.run_batch(requests)
    ]
    for part, key in zip(order, prepared.image_keys, strict=True):
        cached_embeds = cache.get(key)
        assert cached_embeds is not None
        torch.testing.assert_close(cached_embeds, _encode_alone(plain, part))


def test_same_file_at_other_pixel_limits_gets_other_keys(
    model_and_processor: tuple[Any, Any], tmp_path: Path
) -> None:
    model, processor = model_and_processor
    path = str(write_png(tmp_path / "wide.png", 240, 160, seed=3))
    requests = [_ask(_image_part(path)), _ask(_image_part(path, max_pixels=8 * PIXELS))]
    plain = Pipeline(model, processor, min_pixels=4 * PIXELS, max_pixels=32 * PIXELS)
    cache = VisionCache(max_bytes=1 << 20)
    cached = Pipeline(model, processor, min_pixels=4 * PIXELS, max_pixels=32 * PIXELS, vision_cache=cache)
    counter = EncoderCounter(model)

    prepared = cached.prepare(requests)
    first = cached.run_batch(requests)
    second = cached.run_batch(requests)

    grid = prepared.inputs["image_grid_thw"].tolist()
    assert grid[0] != grid[1]
    assert prepared.image_keys is not None and len(set(prepared.image_keys)) == 2
    assert counter.images == 2  # both encoded once, both reused on the second run
    assert (cache.hits, cache.misses, len(cache)) == (2, 2, 2)
    expected = [output.token_ids for output in plain.run_batch(requests)]
    assert [output.token_ids for output in first] == expected
    assert [output.token_ids for output in second] == expected


def test_file_keys_come_from_the_file_bytes(model_and_processor: tuple[Any, Any], tmp_path: Path) -> None:
    model, processor = model_and_processor
    original = write_png(tmp_path / "a.png", 90, 60, seed=4)
    copy = shutil.copy(original, tmp_path / "copy.png")
    recompressed = tmp_path / "recompressed.png"
    Image.open(original).save(recompressed, compress_level=1)  # same pixels, other bytes
    cached = Pipeline(
        model, processor, min_pixels=4 * PIXELS, max_pixels=32 * PIXELS, vision_cache=VisionCache(1 << 20)
    )
    plain = Pipeline(model, processor, min_pixels=4 * PIXELS, max_pixels=32 * PIXELS)

    def key(path: Path) -> str:
        keys = cached.prepare([_ask(_image_part(str(path)))]).image_keys
        assert keys is not None and len(keys) == 1
        return keys[0]

    assert key(original) == key(copy)  # the content counts, not the path
    assert key(original) != key(recompressed)
    assert plain.prepare([_ask(_image_part(str(original)))]).image_keys is None  # no cache: no keys


def test_in_memory_images_are_keyed_by_their_pixels(
    model_and_processor: tuple[Any, Any], tmp_path: Path
) -> None:
    model, processor = model_and_processor
    path = write_png(tmp_path / "a.png", 90, 60, seed=5)
    cached = Pipeline(
        model, processor, min_pixels=4 * PIXELS, max_pixels=32 * PIXELS, vision_cache=VisionCache(1 << 20)
    )

    def key(image: Image.Image) -> str:
        keys = cached.prepare([_ask(_image_part(image))]).image_keys
        assert keys is not None and len(keys) == 1
        return keys[0]

    same = key(Image.open(path).convert("RGB"))
    assert key(Image.open(path).convert("RGB")) == same
    assert key(Image.open(write_png(tmp_path / "b.png", 90, 60, seed=6)).convert("RGB")) != same


def test_file_digests_are_remembered_per_file_version(tmp_path: Path) -> None:
    digests = FileDigests(capacity=2)
    path = tmp_path / "a.bin"
    path.write_bytes(b"first")
    assert digests.digest(str(path)) == hashlib.sha256(b"first").digest()

    stat = path.stat()
    with path.open("r+b") as file:  # rewritten in place: same inode, size and (restored) mtime
        file.write(b"FIRST")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert digests.digest(str(path)) == hashlib.sha256(b"first").digest()  # remembered, not re-read

    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"second")
    os.replace(replacement, path)  # an atomic replace: a new inode
    assert digests.digest(str(path)) == hashlib.sha256(b"second").digest()

    for name in ("b", "c", "d"):
        (tmp_path / name).write_bytes(name.encode())
        digests.digest(str(tmp_path / name))
    assert len(digests) == 2


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
