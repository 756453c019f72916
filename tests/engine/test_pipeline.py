"""The batched pipeline: batching changes nothing, streaming adds up, media stay local and within budget."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from bot.engine.pipeline import Pipeline, PipelineOutput, PipelineRequest
from bot.engine.vision_cache import VisionCache
from tests.engine.media_files import write_mp4, write_png

GREEDY: dict[str, object] = {"max_new_tokens": 10, "do_sample": False}
PIXELS = 28 * 28


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    return Pipeline(model, processor, min_pixels=4 * PIXELS, max_pixels=64 * PIXELS)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    sizes = [(64, 48), (100, 80), (56, 56), (300, 200)]
    return [str(write_png(folder / f"{index}.png", w, h, seed=index)) for index, (w, h) in enumerate(sizes)]


def _user(text: str, *images: str) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [*({"type": "image", "image": path} for path in images), {"type": "text", "text": text}],
    }


def _mixed_requests(images: list[str], **kwargs: Any) -> list[PipelineRequest]:
    histories = [
        [_user("Hello there, who are you?")],
        [_user("What is this?", images[0])],
        [_user("Compare these pictures in detail, please.", images[1], images[2], images[3])],
        [
            {"role": "system", "content": "Answer briefly."},
            _user("First look at this one.", images[1]),
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "A grey square with some noise in it."}],
            },
            _user("And now tell me about the colours on the left, then on the right, at length."),
        ],
    ]
    return [
        PipelineRequest(messages=messages, generate_kwargs=dict(GREEDY), **kwargs) for messages in histories
    ]


def test_batched_answers_equal_unbatched(pipeline: Pipeline, images: list[str]) -> None:
    requests = _mixed_requests(images)

    batched = pipeline.run_batch(requests)
    alone = [pipeline.run_batch([request])[0] for request in requests]

    assert [output.token_ids for output in batched] == [output.token_ids for output in alone]
    assert [output.text for output in batched] == [output.text for output in alone]
    assert [output.prompt_tokens for output in batched] == [output.prompt_tokens for output in alone]
    assert all(0 < len(output.token_ids) <= 10 for output in batched)
    assert all(isinstance(output.text, str) and output.text for output in batched)
    assert len({output.prompt_tokens for output in batched}) == len(batched)


def test_paused_answers_resume_with_new_rows_and_equal_unbatched(
    pipeline: Pipeline, images: list[str]
) -> None:
    """Continuous batching on the pipeline: the batch pauses every 3 decode steps, one more request joins."""
    cached = Pipeline(
        pipeline.model,
        pipeline.processor,
        min_pixels=pipeline.min_pixels,
        max_pixels=pipeline.max_pixels,
        vision_cache=VisionCache(max_bytes=64 * 1024 * 1024),
    )
    requests = _mixed_requests(images)
    deltas: list[list[str]] = [[] for _ in requests]
    for request, row in zip(requests, deltas, strict=True):
        request.on_text = row.append
    alone = [pipeline.run_batch([dataclasses.replace(request, on_text=None)])[0] for request in requests]
    steps = itertools.count(1)
    pending, running = list(enumerate(requests)), []
    finished: dict[int, PipelineOutput] = {}
    calls = 0
    while pending or running:
        if pending:
            running.append(pending.pop(0))
        outputs = cached.run_batch([request for _, request in running], pause=lambda: next(steps) % 3 == 0)
        calls += 1
        still = []
        for (index, request), output in zip(running, outputs, strict=True):
            if output.finished:
                finished[index] = output
            else:
                assert output.token_ids and len(output.token_ids) % 3 == 0
                still.append((index, dataclasses.replace(request, resume=output.resume)))
        running = still

    assert calls > len(requests), "answers paused and resumed"
    for index, expected in enumerate(alone):
        output = finished[index]
        assert (output.token_ids, output.text, output.prompt_tokens) == (
            expected.token_ids,
            expected.text,
            expected.prompt_tokens,
        )
        assert "".join(deltas[index]) == output.text
    assert cached.vision_cache is not None and cached.vision_cache.misses == 4, "each image encoded once"


def test_options_that_count_from_the_prompt_never_pause(pipeline: Pipeline) -> None:
    options = {"max_new_tokens": 6, "min_new_tokens": 3, "do_sample": False}

    [output] = pipeline.run_batch([PipelineRequest([_user("Hi")], options)], pause=lambda: True)

    assert output.finished
    assert output.token_ids == pipeline.run_batch([PipelineRequest([_user("Hi")], options)])[0].token_ids


def test_streamed_deltas_add_up_to_each_final_text(pipeline: Pipeline, images: list[str]) -> None:
    requests = _mixed_requests(images)
    deltas: list[list[str]] = [[] for _ in requests]
    for request, row in zip(requests, deltas, strict=True):
        request.on_text = row.append
    requests[0].on_text = None  # rows without a callback are simply not streamed

    outputs = pipeline.run_batch(requests)

    assert deltas[0] == []
    for row, output in zip(deltas[1:], outputs[1:], strict=True):
        assert "".join(row) == output.text
        assert len(row) > 1
        assert all(row)


def test_an_exception_from_a_listener_aborts_the_batch(pipeline: Pipeline) -> None:
    received: list[str] = []

    def stop(delta: str) -> None:
        received.append(delta)
        raise LookupError("stop here")

    with pytest.raises(LookupError, match="stop here"):
        pipeline.run_batch([PipelineRequest([_user("Hi")], dict(GREEDY), on_text=stop)])
    assert len(received) == 1


def test_a_batch_needs_one_set_of_options(pipeline: Pipeline) -> None:
    requests = [
        PipelineRequest([_user("Hi")], dict(GREEDY)),
        PipelineRequest([_user("Hi")], {"max_new_tokens": 3}),
    ]
    with pytest.raises(ValueError, match="same generate_kwargs"):
        pipeline.run_batch(requests)


def test_unset_options_keep_the_model_defaults(pipeline: Pipeline) -> None:
    default_max = pipeline.model.generation_config.max_new_tokens
    request = PipelineRequest([_user("Hi")], {"max_new_tokens": None, "do_sample": None})

    output = pipeline.run_batch([request])[0]
    greedy = pipeline.run_batch(
        [PipelineRequest([_user("Hi")], {"max_new_tokens": default_max, "do_sample": False})]
    )

    assert output.token_ids == greedy[0].token_ids
    assert len(output.token_ids) > 10


def test_eos_and_padding_are_trimmed(pipeline: Pipeline) -> None:
    im_end = pipeline.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    forced = {"max_new_tokens": 6, "do_sample": False, "min_new_tokens": 2, "forced_eos_token_id": im_end}

    outputs = pipeline.run_batch(
        [PipelineRequest([_user("Hi")], forced), PipelineRequest([_user("Hello")], forced)]
    )

    for output in outputs:
        assert len(output.token_ids) == 5  # the sixth token is the forced EOS
        assert im_end not in output.token_ids


def test_pixel_limits_apply_to_images_without_their_own(pipeline: Pipeline, images: list[str]) -> None:
    own_limit = {"type": "image", "image": images[3], "max_pixels": 16 * PIXELS}
    requests = [
        PipelineRequest([_user("Big one", images[3])], GREEDY),
        PipelineRequest(
            [{"role": "user", "content": [own_limit, {"type": "text", "text": "Small"}]}], GREEDY
        ),
    ]

    def patches(pixel_scale: float) -> list[int]:
        grid = pipeline.prepare(requests, pixel_scale=pixel_scale).inputs["image_grid_thw"]
        return grid.prod(dim=-1).tolist()

    full, half = patches(1.0), patches(0.5)
    assert full[0] * 14 * 14 <= 64 * PIXELS and full[0] > 32 * PIXELS // (14 * 14)
    assert full[1] * 14 * 14 <= 16 * PIXELS
    assert half[0] * 14 * 14 <= 32 * PIXELS and half[0] < full[0]
    assert half[1] * 14 * 14 <= 8 * PIXELS and half[1] < full[1]


@pytest.mark.parametrize(
    "source",
    [
        "https://cdn.discordapp.com/a.png",
        "http://127.0.0.1/a.png",
        "file:///etc/passwd",
        "data:image/png;base64,AA",
    ],
)
def test_refuses_anything_but_local_files(pipeline: Pipeline, source: str) -> None:
    with pytest.raises(ValueError, match="only local media files"):
        pipeline.run_batch([PipelineRequest([_user("Look", source)], GREEDY)])


def test_missing_local_file_is_refused(pipeline: Pipeline, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        pipeline.run_batch([PipelineRequest([_user("Look", str(tmp_path / "gone.png"))], GREEDY)])


def test_video_part(pipeline: Pipeline, tmp_path: Path, images: list[str]) -> None:
    video = str(write_mp4(tmp_path / "clip.mp4", frames=8, fps=4))
    part = {"type": "video", "video": video, "max_frames": 4, "fps": 2.0, "max_pixels": 16 * PIXELS}
    request = PipelineRequest(
        [{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}], GREEDY
    )
    with_image = PipelineRequest([_user("And this?", images[0])], GREEDY)

    inputs = pipeline.prepare([request]).inputs
    outputs = pipeline.run_batch([request, with_image])

    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]]  # 4 frames / temporal patch 2, 56x56 frames
    assert inputs["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per grid step at 2 fps
    assert outputs[0].token_ids == pipeline.run_batch([request])[0].token_ids
    assert outputs[1].token_ids == pipeline.run_batch([with_image])[0].token_ids


def test_count_text_tokens(pipeline: Pipeline) -> None:
    text = "What is on the left side of the picture?"
    assert pipeline.count_text_tokens(text) == len(pipeline.processor.tokenizer(text)["input_ids"])
    assert pipeline.count_text_tokens("") == 0
    assert pipeline.count_text_tokens(text + text) > pipeline.count_text_tokens(text)


def test_streaming_decodes_incrementally_and_holds_back_half_characters(pipeline: Pipeline) -> None:
    import torch

    from bot.engine.pipeline import _BatchStreamer, _RowText

    tokenizer = pipeline.processor.tokenizer
    text = "Ein Bär 🐻 sagt: 你好, привет — ok."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2, "byte-level pieces: some characters span several tokens"
    decodes: list[int] = []
    decode = tokenizer.decode

    def counting_decode(window: list[int], **options: Any) -> str:
        decodes.append(len(window))
        return decode(window, **options)

    tokenizer.decode = counting_decode
    deltas: list[str] = []
    try:
        streamer = _BatchStreamer(tokenizer, [deltas.append], [_RowText()], frozenset({-1}))
        streamer.put(torch.tensor([[0]]))  # the prompt, skipped
        for token_id in ids:
            streamer.put(torch.tensor([token_id]))
        streamer.end()
        streamer.finish(0)
    finally:
        del tokenizer.decode

    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas), "a character is sent whole, never in halves"
    assert max(decodes) <= 8, "each step decodes a small window, not the whole answer"
