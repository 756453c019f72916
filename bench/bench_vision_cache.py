"""Benchmark: a follow-up question about the same image, with and without the vision-encoder cache.

A follow-up re-sends the whole conversation, image included. For each image size, turn one (image + question)
is answered once by each of two pipelines sharing one model: one with a `VisionCache`, one without. The
follow-up (the same image, the first answer, a new question) is then timed `--runs` times per pipeline,
alternating. The table prints the median wall time of the whole follow-up `run_batch` (processor, generate,
decode) and of one uncached encoder pass alone (the most the cache can save). The follow-up's greedy answers
must be identical with and without the cache.

    python bench/bench_vision_cache.py [--sizes 640x480,1280x960] [--runs 20] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import add_model_args, bench_settings, configure_torch, model_directory, print_table, write_photo
from tqdm import tqdm

from bot.engine.loader import load_model
from bot.engine.pipeline import Pipeline, PipelineOutput, PipelineRequest
from bot.engine.vision_cache import VisionCache

CACHE_BYTES = 256 * 1024 * 1024


def first_turn(image: Path) -> list[dict]:
    """The first turn of a conversation: `image` and a question about it."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(image)},
                {"type": "text", "text": "What is on the left side of the picture?"},
            ],
        }
    ]


def follow_up(image: Path, first_answer: str) -> list[dict]:
    """The second turn of a conversation about `image`, as `build_messages` would send it."""
    return [
        *first_turn(image),
        {"role": "assistant", "content": [{"type": "text", "text": first_answer}]},
        {"role": "user", "content": [{"type": "text", "text": "And what is on the right side?"}]},
    ]


def parse_size(text: str) -> tuple[int, int]:
    """`"640x480"` → (640, 480)."""
    width, height = text.lower().split("x")
    return int(width), int(height)


def time_follow_ups(
    pipelines: dict[str, Pipeline], messages: list[dict], kwargs: dict[str, object], runs: int, label: str
) -> tuple[dict[str, list[float]], dict[str, PipelineOutput]]:
    """Seconds per follow-up `run_batch` for each pipeline, alternating; and each pipeline's last output."""
    timings: dict[str, list[float]] = {name: [] for name in pipelines}
    outputs: dict[str, PipelineOutput] = {}
    for run_index in tqdm(range(runs), desc=f"follow-ups {label}", unit="run"):
        names = list(pipelines) if run_index % 2 == 0 else list(reversed(pipelines))
        for name in names:
            started = time.perf_counter()
            (outputs[name],) = pipelines[name].run_batch([PipelineRequest(messages, kwargs)])
            timings[name].append(time.perf_counter() - started)
    return timings, outputs


def time_encoder(pipeline: Pipeline, messages: list[dict], runs: int) -> float:
    """Median milliseconds of one uncached vision-encoder pass over the images of `messages`."""
    inputs = pipeline.prepare([PipelineRequest(messages, {})]).inputs.to(pipeline.model.device)
    timings = []
    with torch.inference_mode():
        for _ in range(runs):
            started = time.perf_counter()
            features = pipeline.model.model.get_image_features(
                inputs["pixel_values"], inputs["image_grid_thw"]
            )
            _ = [tensor.sum().item() for tensor in features.pooler_output]  # waits for the device
            timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1e3


def run(args: argparse.Namespace) -> None:
    setup = configure_torch(args)
    kwargs: dict[str, object] = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    rows = []
    with (
        model_directory(args) as model_dir,
        tempfile.TemporaryDirectory(prefix="bench-vision-cache-") as folder,
    ):
        settings = bench_settings(model_dir, args.device, vision={"max_pixels": args.max_pixels})
        loaded = load_model(settings.model)
        vision = settings.vision
        cache = VisionCache(max_bytes=CACHE_BYTES)
        pipelines = {
            name: Pipeline(
                loaded.model,
                loaded.processor,
                min_pixels=vision.min_pixels,
                max_pixels=vision.max_pixels,
                vision_cache=vision_cache,
            )
            for name, vision_cache in (("without cache", None), ("with cache", cache))
        }
        for index, size in enumerate(args.sizes.split(",")):
            width, height = parse_size(size)
            image = write_photo(Path(folder, f"{size}.jpg"), width, height, seed=args.seed + index)
            first = {
                name: pipeline.run_batch([PipelineRequest(first_turn(image), kwargs)])[0]
                for name, pipeline in pipelines.items()
            }
            if first["with cache"] != first["without cache"]:
                raise RuntimeError(f"turn one differs with and without the cache for {size}")
            messages = follow_up(image, first["with cache"].text)
            timings, outputs = time_follow_ups(pipelines, messages, kwargs, args.runs, size)
            without, with_cache = (statistics.median(timings[name]) * 1e3 for name in pipelines)
            encoder = time_encoder(pipelines["without cache"], messages, args.runs)
            same = outputs["with cache"] == outputs["without cache"]
            prompt = outputs["with cache"].prompt_tokens
            rows.append(
                (size, prompt, encoder, without, with_cache, with_cache / without, "yes" if same else "NO")
            )

    print(f"\n{setup}")
    print(
        f"follow-up turn, greedy, max_new_tokens {args.max_new_tokens}, max_pixels {args.max_pixels}; "
        f"median of {args.runs} runs; cache {cache.hits} hits, {cache.misses} misses"
    )
    print_table(
        "Follow-up on the same image (whole run_batch)",
        [
            "image",
            "prompt tokens",
            "encoder ms",
            "without cache ms",
            "with cache ms",
            "with / without",
            "same answer",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--sizes", default="640x480,1280x960", help="comma-separated WIDTHxHEIGHT list")
    parser.add_argument("--max-pixels", type=int, default=1280 * 28 * 28, help="the [vision] max_pixels")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
