"""Token estimates and the resize rule: one owner, and the same arithmetic as qwen_vl_utils."""

from __future__ import annotations

import itertools

import pytest
from qwen_vl_utils import smart_resize as qwen_smart_resize

from bot.engine.budget import estimate_prompt_tokens, estimate_text_tokens, smart_resize
from bot.settings import VisionSettings


def test_smart_resize_matches_qwen_vl_utils_on_many_sizes() -> None:
    sides = [1, 27, 28, 29, 55, 100, 333, 640, 1000, 1921, 4032, 7900]
    limits = [(4 * 28 * 28, 16 * 28 * 28), (256 * 28 * 28, 1280 * 28 * 28), (3136, 12_845_056)]
    for (height, width), (min_pixels, max_pixels) in itertools.product(
        itertools.product(sides, sides), limits
    ):
        if max(height, width) / min(height, width) > 200:
            with pytest.raises(ValueError):
                smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
            continue
        expected = qwen_smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
        assert smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels) == expected


def test_text_estimate_is_generous_for_latin_and_cjk() -> None:
    assert estimate_text_tokens("") == 0
    assert estimate_text_tokens("x" * 300) == 100
    assert estimate_text_tokens("猫" * 10) == 10  # three UTF-8 bytes each
    assert estimate_text_tokens("\ud800") == 1  # a lone surrogate is counted, not an error


def test_prompt_estimate_counts_messages_text_and_image_budgets() -> None:
    vision = VisionSettings()
    image = [
        {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "hi"}]}
    ]
    small = [{"role": "user", "content": [{"type": "image", "image": "x.png", "max_pixels": 28 * 28 * 10}]}]

    assert estimate_prompt_tokens([{"role": "user", "content": "x" * 300}], vision) == 100 + 5
    assert estimate_prompt_tokens(image, vision) == vision.max_pixels // (28 * 28) + 2 + 1 + 5
    assert estimate_prompt_tokens(small, vision) == 10 + 2 + 5
    two = [{"role": "system", "content": "abc"}, {"role": "user", "content": "abcdef"}]
    assert estimate_prompt_tokens(two, vision) == (1 + 5) + (2 + 5)
