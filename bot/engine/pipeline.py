"""The seed notebook's pipeline, for a batch of conversations.

For each request: chat template → vision info → processor → generate → trim the prompt → decode, exactly
as the reference notebook does it, with left padding so several conversations run through one `generate` call.
Images and videos must be local files: nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from qwen_vl_utils import process_vision_info
from transformers import BatchFeature
from transformers.generation.streamers import BaseStreamer

from bot.engine.vision_cache import VisionCache, cached_image_features

_VISION_KEYS = ("image", "image_url", "video")


@dataclass
class PipelineRequest:
    """One conversation to answer."""

    messages: list[dict]  # Qwen messages list (roles, content part lists)
    generate_kwargs: dict[str, object]  # options for generate(); batch only requests with equal kwargs
    # Called on the worker thread with each new text delta; whatever it raises aborts the whole generate call.
    on_text: Callable[[str], None] | None = None


@dataclass
class PipelineOutput:
    """One answer: its text, its generated ids (prompt, EOS and padding removed) and the prompt's length."""

    text: str
    token_ids: list[int]
    prompt_tokens: int


@dataclass
class PreparedBatch:
    """The processor's output for a batch (on CPU) and the prompt texts it was made from."""

    inputs: BatchFeature
    prompt_texts: list[str]


class Pipeline:
    """Runs batches of conversations through one loaded model; use from a single thread."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        min_pixels: int,
        max_pixels: int,
        vision_cache: VisionCache | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.vision_cache = vision_cache
        eos = model.generation_config.eos_token_id
        self._eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        pad = model.generation_config.pad_token_id
        self._pad_id = pad if pad is not None else processor.tokenizer.pad_token_id

    def count_text_tokens(self, text: str) -> int:
        """How many tokens `text` takes (no special tokens added), for context budgeting."""
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prepare(self, requests: list[PipelineRequest], *, pixel_scale: float = 1.0) -> PreparedBatch:
        """Template, vision info and processor for a batch, as the seed does it, with left padding."""
        conversations = [self._with_pixel_limits(request.messages, pixel_scale) for request in requests]
        texts = [
            self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            for messages in conversations
        ]
        image_inputs, videos, video_kwargs = process_vision_info(
            conversations, return_video_kwargs=True, return_video_metadata=True
        )
        video_inputs = None
        processor_kwargs: dict[str, Any] = {}
        if videos is not None:  # frames with their sampling metadata, which gives the processor the fps
            video_inputs = [frames for frames, _ in videos]
            processor_kwargs = {
                **video_kwargs,
                "video_metadata": [metadata for _, metadata in videos],
                "cap_pixels_per_frame": True,  # qwen-vl-utils already capped each frame
            }
        self.processor.tokenizer.padding_side = "left"
        inputs = self.processor(
            text=texts,
            images=image_inputs,
            videos=video_inputs,
            padding=True,
            return_tensors="pt",
            **processor_kwargs,
        )
        return PreparedBatch(inputs=inputs, prompt_texts=texts)

    def run_batch(self, requests: list[PipelineRequest], *, pixel_scale: float = 1.0) -> list[PipelineOutput]:
        """Answer every request with one `generate` call; all requests must share the same generate_kwargs."""
        if not requests:
            return []
        if any(request.generate_kwargs != requests[0].generate_kwargs for request in requests):
            raise ValueError("requests in one batch must share the same generate_kwargs")
        generate_kwargs = {k: v for k, v in requests[0].generate_kwargs.items() if v is not None}
        prepared = self.prepare(requests, pixel_scale=pixel_scale)
        vision_cache = self._vision_cache(prepared.inputs)  # hashes the pixels while they are on the CPU
        inputs = prepared.inputs.to(self.model.device)
        if any(request.on_text is not None for request in requests):
            generate_kwargs["streamer"] = _BatchStreamer(
                self.processor.tokenizer, [request.on_text for request in requests], self._eos_ids
            )
        with torch.inference_mode(), vision_cache:
            generated = self.model.generate(**inputs, **generate_kwargs)
        prompt_width = inputs["input_ids"].shape[1]
        rows = [self._answer_ids(row[prompt_width:].tolist()) for row in generated]
        texts = self.processor.batch_decode(
            rows, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
        return [
            PipelineOutput(text=text, token_ids=ids, prompt_tokens=int(length))
            for text, ids, length in zip(texts, rows, prompt_lengths, strict=True)
        ]

    def _vision_cache(self, inputs: BatchFeature) -> contextlib.AbstractContextManager[None]:
        if self.vision_cache is None or inputs.get("pixel_values") is None:
            return contextlib.nullcontext()
        return cached_image_features(self.model, self.vision_cache, _image_keys(inputs))

    def _answer_ids(self, ids: list[int]) -> list[int]:
        for index, token_id in enumerate(ids):
            if token_id in self._eos_ids:
                return ids[:index]
        while ids and ids[-1] == self._pad_id:
            ids.pop()
        return ids

    def _with_pixel_limits(self, messages: list[dict], pixel_scale: float) -> list[dict]:
        """A copy of `messages` whose vision parts are local files carrying their pixel limits."""
        max_pixels = max(int(self.max_pixels * pixel_scale), 1)
        min_pixels = min(self.min_pixels, max_pixels)
        copied = []
        for message in messages:
            content = message["content"]
            if isinstance(content, list):
                content = [self._vision_part(part, min_pixels, max_pixels, pixel_scale) for part in content]
            copied.append({**message, "content": content})
        return copied

    @staticmethod
    def _vision_part(part: dict, min_pixels: int, max_pixels: int, pixel_scale: float) -> dict:
        key = next((key for key in _VISION_KEYS if key in part), None)
        if key is None:
            return part
        source = part[key]
        if isinstance(source, Path):
            source = str(source)
        if isinstance(source, str):
            if "://" in source or source.startswith("data:"):
                raise ValueError(f"only local media files are accepted, got {source[:80]!r}")
            if not Path(source).is_file():
                raise FileNotFoundError(f"media file not found: {source}")
        elif not isinstance(source, Image.Image):
            raise ValueError(f"unsupported {key} value of type {type(source).__name__}")
        part = {**part, key: source}
        if "max_pixels" in part:
            part["max_pixels"] = max(int(part["max_pixels"] * pixel_scale), 1)
        elif key == "video":
            return part  # qwen-vl-utils' own per-frame budget
        else:
            part["max_pixels"] = max_pixels
        part.setdefault("min_pixels", min(min_pixels, part["max_pixels"]))
        return part


def _image_keys(inputs: BatchFeature) -> list[str]:
    """One content key per image: a hash of its pixel values and its grid."""
    pixel_values = inputs["pixel_values"].cpu()
    grid = inputs["image_grid_thw"].cpu()
    sizes = grid.prod(dim=-1).tolist()
    keys = []
    for chunk, thw in zip(torch.split(pixel_values, sizes), grid.tolist(), strict=True):
        digest = hashlib.sha256(chunk.contiguous().numpy().tobytes())
        digest.update(f"{thw}:{chunk.dtype}".encode())
        keys.append(digest.hexdigest())
    return keys


class _BatchStreamer(BaseStreamer):
    """Splits each generation step's token column by row and sends every row its new text."""

    def __init__(
        self, tokenizer: Any, callbacks: list[Callable[[str], None] | None], eos_ids: frozenset[int]
    ):
        self._tokenizer = tokenizer
        self._callbacks = callbacks
        self._eos_ids = eos_ids
        self._ids: list[list[int]] = [[] for _ in callbacks]
        self._sent: list[str] = ["" for _ in callbacks]
        self._done = [callback is None for callback in callbacks]
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        for row, token_id in enumerate(value.reshape(-1).tolist()):
            if self._done[row]:
                continue
            if token_id in self._eos_ids:
                self._done[row] = True
                self._emit(row, final=True)
                continue
            self._ids[row].append(token_id)
            self._emit(row, final=False)

    def end(self) -> None:
        for row in range(len(self._callbacks)):
            if not self._done[row]:
                self._done[row] = True
                self._emit(row, final=True)

    def _emit(self, row: int, *, final: bool) -> None:
        text = self._tokenizer.decode(
            self._ids[row], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        if not final and text.endswith("\ufffd"):
            return  # wait for the rest of a multi-byte character
        delta = text[len(self._sent[row]) :]
        if delta:
            self._sent[row] = text
            callback = self._callbacks[row]
            assert callback is not None
            callback(delta)
