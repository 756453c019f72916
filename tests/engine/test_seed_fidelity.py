"""The Pipeline reproduces the seed notebook's own pipeline, token for token, over a multi-turn conversation.

The reference block below is the notebook's code (sections 3–6) as written, on CPU instead of CUDA, with the
one fix the product needs: the assistant turn appended to the history is `output_text[0]`, not the list.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from qwen_vl_utils import process_vision_info
from qwen_vl_utils.vision_process import IMAGE_MAX_TOKEN_NUM, IMAGE_MIN_TOKEN_NUM
from transformers import AutoProcessor, BatchFeature, Qwen2_5_VLForConditionalGeneration

from bot.engine.pipeline import Pipeline, PipelineOutput, PipelineRequest
from bot.engine.vision_cache import VisionCache
from tests.engine.media_files import write_png

MAX_NEW_TOKENS = 12
# The seed's two generate calls: greedy-by-config for the first turn, its sampling options for follow-ups.
GREEDY: dict[str, object] = {"max_new_tokens": MAX_NEW_TOKENS}
SAMPLING: dict[str, object] = {
    "max_new_tokens": MAX_NEW_TOKENS,
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.9,
}


def _seed_turn(
    model: Qwen2_5_VLForConditionalGeneration, processor: Any, messages: list[dict], generate_kwargs: dict
) -> tuple[str, BatchFeature, list[int], list[str]]:
    """Sections 3.2–5 of the notebook, verbatim apart from the device."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_inputs, video_inputs = process_vision_info(messages)
    inputs = processor(
        text=[text],
        images=image_inputs,
        videos=video_inputs,
        padding=True,
        return_tensors="pt",
    )
    inputs = inputs.to("cpu")

    generated_ids = model.generate(**inputs, **generate_kwargs)
    generated_ids_trimmed = [
        out_ids[len(in_ids) :]
        for in_ids, out_ids in zip(inputs.input_ids, generated_ids)  # noqa: B905 (verbatim)
    ]
    output_text = processor.batch_decode(
        generated_ids_trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    return text, inputs, generated_ids_trimmed[0].tolist(), output_text


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple[Qwen2_5_VLForConditionalGeneration, Any]:
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    return model, processor


def test_pipeline_matches_seed_notebook_turn_by_turn(
    loaded: tuple[Qwen2_5_VLForConditionalGeneration, Any], tmp_path: Path
) -> None:
    model, processor = loaded
    eos_ids = set(model.generation_config.eos_token_id)
    # The seed calls process_vision_info without pixel limits, i.e. with qwen-vl-utils' defaults.
    pipeline = Pipeline(
        model, processor, min_pixels=IMAGE_MIN_TOKEN_NUM * 28 * 28, max_pixels=IMAGE_MAX_TOKEN_NUM * 28 * 28
    )
    image = write_png(tmp_path / "demo.png", 120, 90)
    messages: list[dict] = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(image)},
                {"type": "text", "text": "What is on the left side of the picture?"},
            ],
        }
    ]
    follow_ups = ["What are on the right and in the middle of the picture?", "And the colours?"]

    for turn, generate_kwargs in enumerate([GREEDY, GREEDY, SAMPLING]):
        if turn > 0:
            messages.append({"role": "user", "content": [{"type": "text", "text": follow_ups[turn - 1]}]})
        request = PipelineRequest(messages=copy.deepcopy(messages), generate_kwargs=dict(generate_kwargs))
        torch.manual_seed(turn)
        seed_text, seed_inputs, seed_ids, output_text = _seed_turn(
            model, processor, messages, generate_kwargs
        )

        prepared = pipeline.prepare([request])
        torch.manual_seed(turn)
        output = pipeline.run_batch([request])[0]

        assert prepared.prompt_texts == [seed_text]
        assert torch.equal(prepared.inputs["input_ids"], seed_inputs["input_ids"])
        assert torch.equal(prepared.inputs["pixel_values"], seed_inputs["pixel_values"])
        assert torch.equal(prepared.inputs["image_grid_thw"], seed_inputs["image_grid_thw"])
        answer_length = len(output.token_ids)
        assert seed_ids[:answer_length] == output.token_ids
        assert all(token_id in eos_ids for token_id in seed_ids[answer_length:])
        assert output.text == output_text[0]
        assert output.prompt_tokens == seed_inputs["input_ids"].shape[1]

        assert len(output.token_ids) > 0
        messages.append({"role": "assistant", "content": [{"type": "text", "text": output_text[0]}]})


def test_answers_paused_for_newcomers_match_the_seed_notebook(
    loaded: tuple[Qwen2_5_VLForConditionalGeneration, Any], tmp_path: Path
) -> None:
    """Continuous batching: every 2 decode steps the batch pauses and one more conversation joins; every
    greedy answer is still the notebook's, token for token."""
    model, processor = loaded
    eos_ids = set(model.generation_config.eos_token_id)
    pipeline = Pipeline(
        model,
        processor,
        min_pixels=IMAGE_MIN_TOKEN_NUM * 28 * 28,
        max_pixels=IMAGE_MAX_TOKEN_NUM * 28 * 28,
        vision_cache=VisionCache(max_bytes=64 * 1024 * 1024),
    )

    def user(text: str, image: Path | None = None) -> list[dict]:
        parts = [{"type": "image", "image": str(image)}] if image is not None else []
        return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]

    conversations = [
        user("What is on the left side of the picture?", write_png(tmp_path / "a.png", 120, 90)),
        user("Hello, who are you?"),
        user("Describe it.", write_png(tmp_path / "b.png", 136, 90, seed=1)),
    ]
    seed_answers = []
    for messages in conversations:
        ids = _seed_turn(model, processor, messages, GREEDY)[2]
        seed_answers.append(list(itertools.takewhile(lambda token: token not in eos_ids, ids)))

    steps = itertools.count(1)
    pending = [(n, PipelineRequest(copy.deepcopy(m), dict(GREEDY))) for n, m in enumerate(conversations)]
    running: list[tuple[int, PipelineRequest]] = []
    answers: dict[int, PipelineOutput] = {}
    while pending or running:
        if pending:
            running.append(pending.pop(0))
        outputs = pipeline.run_batch([request for _, request in running], pause=lambda: next(steps) % 2 == 0)
        paused = []
        for (n, request), output in zip(running, outputs, strict=True):
            if output.finished:
                answers[n] = output
            else:
                paused.append((n, dataclasses.replace(request, resume=output.resume)))
        running = paused

    assert [answers[n].token_ids for n in range(len(conversations))] == seed_answers
    assert all(len(answer) > 2 for answer in seed_answers), "every answer was paused at least once"
