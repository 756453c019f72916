"""Big images reach the model exactly as the seed's pipeline gives them, at a lower memory peak.

The bot validates and stores an upload (`MediaFetcher`), then the pipeline decodes and resizes the stored file
itself (`images.image_for_model`) instead of leaving that to `qwen_vl_utils.fetch_image`. The processor's
inputs must not change by a single value: they are compared with the seed's `process_vision_info` on the
original upload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from qwen_vl_utils import fetch_image, process_vision_info
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from bot.engine.images import image_for_model
from bot.engine.pipeline import Pipeline, PipelineRequest
from bot.media import MediaFetcher
from bot.settings import MediaSettings

MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 1280 * 28 * 28  # the default vision.max_pixels: about one megapixel


def big_picture(width: int, height: int) -> Image.Image:
    """Smooth gradients with fine stripes: cheap to encode, and every resize tap matters."""
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    stripes = (np.sin(x * 900 + y * 700) + 1) * 40
    red = np.broadcast_to(x * 170 + stripes, (height, width))
    green = np.broadcast_to(y * 170 + stripes, (height, width))
    blue = np.broadcast_to((x + y) * 85, (height, width))
    return Image.fromarray(np.stack([red, green, blue], axis=-1).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    return Pipeline(model, processor, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def _question(image: str, **limits: int) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": image, **limits}, {"type": "text", "text": "What is it?"}],
        }
    ]


def _seed_inputs(processor: Any, messages: list[dict[str, Any]]) -> Any:
    """The seed notebook's section 3: template, `process_vision_info`, processor."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_inputs, video_inputs = process_vision_info(messages)
    return processor(text=[text], images=image_inputs, videos=video_inputs, padding=True, return_tensors="pt")


@pytest.mark.parametrize(("fmt", "size"), [("PNG", (3000, 2100)), ("JPEG", (3100, 2300))])
async def test_the_model_input_of_a_big_upload_is_the_seeds(
    pipeline: Pipeline, tmp_path: Path, fmt: str, size: tuple[int, int]
) -> None:
    original = tmp_path / f"upload.{fmt.lower()}"
    options = {"quality": 90} if fmt == "JPEG" else {"compress_level": 1}
    big_picture(*size).save(original, format=fmt, **options)
    settings = MediaSettings(max_bytes=20 * 1024 * 1024, max_pixels=64_000_000)
    async with MediaFetcher(settings, tmp_path / "media") as fetcher:
        stored = await fetcher.store_file(original)

    for pixel_scale in (1.0, 0.5):  # 0.5: the engine's retry after running out of GPU memory
        limits = {"min_pixels": MIN_PIXELS, "max_pixels": int(MAX_PIXELS * pixel_scale)}
        request = PipelineRequest(_question(str(stored.path)), generate_kwargs={})
        ours = pipeline.prepare([request], pixel_scale=pixel_scale).inputs
        seed = _seed_inputs(pipeline.processor, _question(str(original), **limits))
        assert set(ours.keys()) == set(seed.keys())
        for key in seed:
            assert torch.equal(ours[key], seed[key]), key
        assert ours["image_grid_thw"].prod().item() * 14 * 14 <= limits["max_pixels"]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_image_for_model_is_fetch_image(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "picture.png"
    picture = big_picture(1500, 900)
    if mode == "RGBA":
        picture.putalpha(Image.linear_gradient("L").resize(picture.size))
    picture.convert(mode).save(path)
    limits = {"min_pixels": MIN_PIXELS, "max_pixels": 300 * 28 * 28}
    ours = image_for_model(path, **limits)
    expected = fetch_image({"image": str(path), **limits})
    assert ours.mode == "RGB" and ours.size == expected.size
    assert np.array_equal(np.asarray(ours), np.asarray(expected))
