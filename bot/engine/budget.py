"""Qwen2.5-VL's sizes, in one place: token costs for prompt budgets, and the image resize rule.

Torch-free, so the conversation builder, the scheduler and the server backend share it. `smart_resize` is
the rule `qwen_vl_utils` applies before the in-process model sees an image (a test checks they agree), so
an image sent to an inference server already has the size the in-process engine would give the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bot.settings import VisionSettings

if TYPE_CHECKING:
    from bot.engine.api import QwenMessage

IMAGE_FACTOR = 28  # a 14-pixel patch, merged 2x2: image sides are multiples of 28
PATCH_PIXELS = IMAGE_FACTOR * IMAGE_FACTOR  # one visual token covers a 28x28 patch after merging
MAX_ASPECT_RATIO = 200  # qwen_vl_utils refuses images more elongated than this
MESSAGE_OVERHEAD_TOKENS = 5  # <|im_start|>role\n … <|im_end|>\n
MEDIA_OVERHEAD_TOKENS = 2  # <|vision_start|> … <|vision_end|>
_BYTES_PER_TOKEN = 3  # a generous guess when no tokenizer is at hand: English ~4 bytes a token, CJK ~3


def estimate_text_tokens(text: str) -> int:
    """An upper-bound guess of the tokens in `text`, for when the model's tokenizer is not loaded here."""
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / _BYTES_PER_TOKEN)


def image_tokens(pixels: int) -> int:
    """Visual tokens of an image of `pixels` pixels (after resizing), with its start/end markers."""
    return pixels // PATCH_PIXELS + MEDIA_OVERHEAD_TOKENS


def video_tokens(frame_pixels: int, vision: VisionSettings) -> int:
    """Visual tokens of a video whose frames have `frame_pixels` pixels, with its start/end markers."""
    frames = vision.video_max_frames // 2  # two frames merge into one temporal patch
    return frames * frame_pixels // PATCH_PIXELS + MEDIA_OVERHEAD_TOKENS


def smart_resize(height: int, width: int, *, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) for the model: multiples of 28, within [min_pixels, max_pixels], aspect kept.

    The same arithmetic as `qwen_vl_utils.smart_resize`; raises ValueError beyond `MAX_ASPECT_RATIO`.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio over {MAX_ASPECT_RATIO}: {width}x{height}")
    new_height = max(IMAGE_FACTOR, round(height / IMAGE_FACTOR) * IMAGE_FACTOR)
    new_width = max(IMAGE_FACTOR, round(width / IMAGE_FACTOR) * IMAGE_FACTOR)
    if new_height * new_width > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_height = math.floor(height / beta / IMAGE_FACTOR) * IMAGE_FACTOR
        new_width = math.floor(width / beta / IMAGE_FACTOR) * IMAGE_FACTOR
    elif new_height * new_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * beta / IMAGE_FACTOR) * IMAGE_FACTOR
        new_width = math.ceil(width * beta / IMAGE_FACTOR) * IMAGE_FACTOR
    return new_height, new_width


def estimate_prompt_tokens(messages: Sequence[QwenMessage], vision: VisionSettings) -> int:
    """A cheap upper-bound guess of a Qwen `messages` list's length: text, each image's pixel budget."""
    tokens = 0
    for message in messages:
        tokens += MESSAGE_OVERHEAD_TOKENS
        content = message["content"]
        if isinstance(content, str):
            tokens += estimate_text_tokens(content)
            continue
        for part in content:
            if part["type"] == "text":
                tokens += estimate_text_tokens(part["text"])
            elif part["type"] == "image":
                tokens += image_tokens(part.get("max_pixels", vision.max_pixels))
            else:
                tokens += video_tokens(part.get("max_pixels", vision.video_max_pixels), vision)
    return tokens
