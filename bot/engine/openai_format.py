"""Qwen `messages` (media as local files) → OpenAI chat messages (media inline as `data:` URLs).

Each image is resized here exactly as the in-process engine resizes it (`budget.smart_resize`, the same
pixel limits, PIL's default filter as `qwen_vl_utils` uses) and sent as a lossless PNG, so the server sees
the pixels the local model would see, never fetches a URL and never receives a 48-megapixel photo. Runs in a
worker thread: decoding and encoding images is CPU work.
"""

from __future__ import annotations

import base64
import io
import mimetypes
from pathlib import Path

from PIL import Image

from bot.engine.budget import smart_resize
from bot.errors import VideoNotSupported
from bot.settings import VisionSettings

_PNG_COMPRESS_LEVEL = 1  # fast; the bytes only cross to the server once


def image_data_url(path: Path, *, min_pixels: int, max_pixels: int) -> str:
    """The image at `path`, resized into [min_pixels, max_pixels] as the model takes it, as a PNG data URL."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    height, width = smart_resize(image.height, image.width, min_pixels=min_pixels, max_pixels=max_pixels)
    if (width, height) != image.size:
        image = image.resize((width, height))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def video_data_url(path: Path) -> str:
    """The video file at `path` as a data URL of its own type (the server samples its frames)."""
    mime = mimetypes.guess_type(path.name)[0] or "video/mp4"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_openai_messages(
    messages: list[dict], vision: VisionSettings, *, accepts_video: bool
) -> list[dict[str, object]]:
    """The OpenAI chat form of a Qwen `messages` list.

    User content stays a list of parts (text, `image_url`, `video_url`); system and assistant content become
    plain strings, which every OpenAI-compatible server takes. Without `accepts_video`, a video in the newest
    message raises VideoNotSupported and videos in older turns are left out (their text stays).
    """
    converted: list[dict[str, object]] = []
    for index, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str):
            converted.append({"role": message["role"], "content": content})
            continue
        if message["role"] != "user":
            text = "".join(part.get("text", "") for part in content if part.get("type") == "text")
            converted.append({"role": message["role"], "content": text})
            continue
        newest = index == len(messages) - 1
        parts = [_part(part, vision, accepts_video=accepts_video, newest=newest) for part in content]
        converted.append({"role": "user", "content": [part for part in parts if part is not None]})
    return converted


def _part(
    part: dict, vision: VisionSettings, *, accepts_video: bool, newest: bool
) -> dict[str, object] | None:
    kind = part.get("type")
    if kind == "image":
        max_pixels = int(part.get("max_pixels", vision.max_pixels))
        min_pixels = int(part.get("min_pixels", min(vision.min_pixels, max_pixels)))
        url = image_data_url(Path(part["image"]), min_pixels=min_pixels, max_pixels=max_pixels)
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "video":
        if accepts_video:
            return {"type": "video_url", "video_url": {"url": video_data_url(Path(part["video"]))}}
        if newest:
            raise VideoNotSupported("server.accepts_video is false")
        return None
    return {"type": "text", "text": part.get("text", "")}
