"""The seed notebook's pipeline, for a batch of conversations.

For each request: chat template → vision info → processor → generate → trim the prompt → decode, exactly
as the reference notebook does it, with left padding so several conversations run through one `generate` call.
Images and videos must be local files: nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from qwen_vl_utils import extract_vision_info, process_vision_info
from transformers import BatchFeature, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from bot.engine.images import image_for_model, is_model_size, release_memory
from bot.engine.vision_cache import FileDigests, VisionCache, cached_image_features

_VISION_KEYS = ("image", "image_url", "video")
# An image part's own settings that shape its pixels (its file or PIL image and the processor do the rest).
_IMAGE_SETTINGS = ("min_pixels", "max_pixels", "resized_height", "resized_width")


@dataclass
class PipelineRequest:
    """One conversation to answer."""

    messages: Sequence[Mapping[str, Any]]  # a Qwen messages list (`QwenMessage`s, or with in-memory images)
    generate_kwargs: dict[str, object]  # options for generate(); batch only requests with equal kwargs
    # Called on the worker thread with each new text delta; whatever it raises aborts the whole generate call.
    on_text: Callable[[str], None] | None = None
    # Asked after every decode step; True ends this row there (its text so far is its answer), the rest go on.
    should_stop: Callable[[], bool] | None = None


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
    # One vision-cache key per image (rows of `image_grid_thw`); None when the pipeline has no cache.
    image_keys: list[str] | None = None


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
        self._file_digests = FileDigests()
        self._processor_digest = hashlib.sha256(processor.image_processor.to_json_string().encode()).digest()
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
        images = self._image_identities(conversations) if self.vision_cache is not None else None
        for messages in conversations:
            _decode_images(messages)
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
        image_keys = None if images is None else self._image_keys(images, inputs)
        return PreparedBatch(inputs=inputs, prompt_texts=texts, image_keys=image_keys)

    def run_batch(self, requests: list[PipelineRequest], *, pixel_scale: float = 1.0) -> list[PipelineOutput]:
        """Answer every request with one `generate` call; all requests must share the same generate_kwargs."""
        if not requests:
            return []
        if any(request.generate_kwargs != requests[0].generate_kwargs for request in requests):
            raise ValueError("requests in one batch must share the same generate_kwargs")
        generate_kwargs = {k: v for k, v in requests[0].generate_kwargs.items() if v is not None}
        prepared = self.prepare(requests, pixel_scale=pixel_scale)
        vision_cache = self._vision_cache(prepared.image_keys)
        inputs = prepared.inputs.to(self.model.device)
        if any(request.on_text is not None for request in requests):
            generate_kwargs["streamer"] = _BatchStreamer(
                self.processor.tokenizer, [request.on_text for request in requests], self._eos_ids
            )
        if any(request.should_stop is not None for request in requests):
            checks = [request.should_stop for request in requests]
            generate_kwargs["stopping_criteria"] = StoppingCriteriaList([_RowsAskedToStop(checks)])
        with torch.inference_mode(), vision_cache:
            generated = self.model.generate(**inputs, **generate_kwargs)
        prompt_width = inputs["input_ids"].shape[1]
        rows = [self._answer_ids(row[prompt_width:].tolist()) for row in generated]
        texts = self.processor.batch_decode(
            rows, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
        pixel_bytes = sum(
            value.nbytes for name, value in prepared.inputs.items() if name.startswith("pixel_values")
        )
        del prepared, inputs, generated
        release_memory(pixel_bytes)  # the batch's pixel values are freed by now
        return [
            PipelineOutput(text=text, token_ids=ids, prompt_tokens=int(length))
            for text, ids, length in zip(texts, rows, prompt_lengths, strict=True)
        ]

    def _vision_cache(self, image_keys: list[str] | None) -> contextlib.AbstractContextManager[None]:
        if self.vision_cache is None or not image_keys:
            return contextlib.nullcontext()
        return cached_image_features(self.model, self.vision_cache, image_keys)

    def _image_identities(self, conversations: list[list[dict]]) -> list[_ImageIdentity]:
        """Each image's file digest (None for an in-memory image) and settings, in the processor's order.

        `extract_vision_info` is what `process_vision_info` walks: images in message order across the batch.
        """
        identities = []
        for part in extract_vision_info(conversations):
            if "image" not in part and "image_url" not in part:
                continue  # a video
            source = part["image"] if "image" in part else part["image_url"]
            file_digest = self._file_digests.digest(source) if isinstance(source, str) else None
            settings = repr(tuple(part.get(name) for name in _IMAGE_SETTINGS))
            identities.append(_ImageIdentity(file_digest, settings))
        return identities

    def _image_keys(self, images: list[_ImageIdentity], inputs: BatchFeature) -> list[str]:
        """One cache key per image: its file's digest (or, in memory, its pixel values), grid and settings."""
        if not images:
            return []
        grid = inputs["image_grid_thw"]
        chunks = torch.split(inputs["pixel_values"], grid.prod(dim=-1).tolist())
        keys = []
        for image, chunk, thw in zip(images, chunks, grid.tolist(), strict=True):
            if image.file_digest is not None:
                digest = hashlib.sha256(b"file:" + image.file_digest)
            else:
                digest = hashlib.sha256(b"pixels:" + chunk.contiguous().numpy().tobytes())
                digest.update(str(chunk.dtype).encode())
            digest.update(f"{thw}:{image.settings}:".encode() + self._processor_digest)
            keys.append(digest.hexdigest())
        return keys

    def _answer_ids(self, ids: list[int]) -> list[int]:
        for index, token_id in enumerate(ids):
            if token_id in self._eos_ids:
                return ids[:index]
        while ids and ids[-1] == self._pad_id:
            ids.pop()
        return ids

    def _with_pixel_limits(self, messages: Sequence[Mapping[str, Any]], pixel_scale: float) -> list[dict]:
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


def _decode_images(messages: list[dict]) -> None:
    """Replace each image file in `messages` (copies made by `_with_pixel_limits`) by its pixels at the
    model's size (`image_for_model`), which `process_vision_info` then keeps as they are: the same pixels its
    own `fetch_image` would make from the file, at half the peak memory. An image whose size the resize rule
    would change again (limits too close together) stays a file, for `fetch_image` to resize.
    """
    for message in messages:
        content = message["content"]
        if not isinstance(content, list):
            continue
        for index, part in enumerate(content):
            if not isinstance(part.get("image"), str) or "resized_height" in part:
                continue
            limits = {"min_pixels": part["min_pixels"], "max_pixels": part["max_pixels"]}
            image = image_for_model(part["image"], **limits)
            if is_model_size(image, **limits):
                content[index] = {**part, "image": image}


class _RowsAskedToStop(StoppingCriteria):
    """Ends each row whose request asks to stop; `generate` pads finished rows while the others go on."""

    def __init__(self, checks: list[Callable[[], bool] | None]) -> None:
        self._checks = checks

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        stopped = [check is not None and check() for check in self._checks]
        return torch.tensor(stopped, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


@dataclass(frozen=True)
class _ImageIdentity:
    """What the cache key of one image starts from, known before its pixels are read."""

    file_digest: bytes | None  # sha256 of the image file's bytes; None for an in-memory image
    settings: str  # the part's own pixel settings (min/max pixels, explicit size)


class _BatchStreamer(BaseStreamer):
    """Splits each generation step's token column by row and sends every row its new text.

    Detokenizes incrementally, as vLLM does: each step decodes only the tokens since the last emitted text
    (a window from `prefix` to the end), never the whole answer again, so a 1,024-token answer costs 1,024
    small decodes instead of a quadratic amount of work on the worker thread. Text ending in a partial UTF-8
    character waits for the rest.
    """

    def __init__(
        self, tokenizer: Any, callbacks: list[Callable[[str], None] | None], eos_ids: frozenset[int]
    ):
        self._tokenizer = tokenizer
        self._callbacks = callbacks
        self._eos_ids = eos_ids
        self._rows = [_RowText() for _ in callbacks]
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
            self._rows[row].ids.append(token_id)
            self._emit(row, final=False)

    def end(self) -> None:
        for row in range(len(self._callbacks)):
            if not self._done[row]:
                self._done[row] = True
                self._emit(row, final=True)

    def _emit(self, row: int, *, final: bool) -> None:
        state = self._rows[row]
        prefix_text = self._decode(state.ids[state.prefix : state.read])
        window_text = self._decode(state.ids[state.prefix :])
        if len(window_text) <= len(prefix_text) or (not final and window_text.endswith("\ufffd")):
            return  # nothing new yet, or the rest of a multi-byte character is still to come
        state.prefix, state.read = state.read, len(state.ids)
        callback = self._callbacks[row]
        assert callback is not None
        callback(window_text[len(prefix_text) :])

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return str(self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


@dataclass
class _RowText:
    """One row's generated ids and the window of them still being decoded."""

    ids: list[int] = field(default_factory=list)
    prefix: int = 0  # the window starts here: the text before is sent
    read: int = 0  # the window's tokens up to here are sent too
