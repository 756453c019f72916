"""Benchmark: eight questions from eight conversations arriving together, micro-batched vs one at a time.

Each question carries its own photo-like JPEG and asks for the same number of greedy new tokens. Three ways of
answering all of them are timed side by side, alternating within each round:

- seed, sequential:      the reference notebook's code (template → vision info → processor → generate → trim →
                         decode), one question after the other;
- pipeline, sequential:  `Pipeline.run_batch([request])` per question (the bot's pipeline, no batching);
- engine, batched:       all questions submitted to `InferenceEngine` at once (micro-batching, batch of 8).

Wall time is the median over the rounds; the ratio is engine / seed (goal ≤ 0.35). The greedy answers of the
three modes must be identical, which the table reports. The engine loads its own copy of the model (the
sequential modes share another), and its vision cache is off so repeated rounds do not reuse encoder outputs.

    python bench/bench_batching.py [--questions 8] [--max-new-tokens 64] [--rounds 5] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch
from _common import (
    add_model_args,
    bench_settings,
    configure_torch,
    model_directory,
    print_table,
    question,
    write_photo,
)
from qwen_vl_utils import process_vision_info
from tqdm import tqdm

from bot.engine import EngineRequest
from bot.engine.loader import LoadedModel, load_model
from bot.engine.pipeline import Pipeline, PipelineRequest
from bot.engine.worker import InferenceEngine
from bot.settings import Settings

Answers = list[tuple[str, int]]  # (text, new tokens without EOS) per question, in order


def conversations(
    image_dir: Path, count: int, args: argparse.Namespace, settings: Settings
) -> list[list[dict]]:
    """One single-turn conversation per question, each with its own image and explicit pixel limits."""
    vision = settings.vision
    result = []
    for index in range(count):
        image = write_photo(image_dir / f"q{index}.jpg", args.width, args.height, seed=args.seed + index)
        content = [
            {
                "type": "image",
                "image": str(image),
                "min_pixels": vision.min_pixels,
                "max_pixels": vision.max_pixels,
            },
            {"type": "text", "text": question(index)},
        ]
        result.append([{"role": "user", "content": content}])
    return result


async def seed_sequential(loaded: LoadedModel, chats: list[list[dict]], kwargs: dict[str, object]) -> Answers:
    """The reference notebook's steps, one conversation at a time."""
    model, processor = loaded.model, loaded.processor
    eos = model.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos)
    answers = []
    for messages in chats:
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image_inputs, video_inputs = process_vision_info(messages)
        inputs = processor(
            text=[text], images=image_inputs, videos=video_inputs, padding=True, return_tensors="pt"
        ).to(model.device)
        with torch.inference_mode():
            generated_ids = model.generate(**inputs, **kwargs)
        trimmed = [out[len(ids) :] for ids, out in zip(inputs.input_ids, generated_ids, strict=True)]
        (text,) = processor.batch_decode(
            trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        new_ids = trimmed[0].tolist()
        answers.append((text, next((i for i, t in enumerate(new_ids) if t in eos_ids), len(new_ids))))
    return answers


async def pipeline_sequential(
    pipeline: Pipeline, chats: list[list[dict]], kwargs: dict[str, object]
) -> Answers:
    """The bot's pipeline with batches of one."""
    answers = []
    for messages in chats:
        (output,) = pipeline.run_batch([PipelineRequest(messages, kwargs)])
        answers.append((output.text, len(output.token_ids)))
    return answers


async def engine_batched(
    engine: InferenceEngine, chats: list[list[dict]], kwargs: dict[str, object]
) -> Answers:
    """Every conversation submitted at once; the engine batches them."""
    handles = [
        engine.submit(EngineRequest(messages, conversation_key=f"bench:{index}", generate_kwargs=kwargs))
        for index, messages in enumerate(chats)
    ]
    results = await asyncio.gather(*(handle.result() for handle in handles))
    return [(result.text, len(result.token_ids)) for result in results]


async def run(args: argparse.Namespace) -> None:
    setup = configure_torch(args)
    kwargs: dict[str, object] = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    with model_directory(args) as model_dir, tempfile.TemporaryDirectory(prefix="bench-batching-") as folder:
        settings = bench_settings(
            model_dir,
            args.device,
            generation={"max_new_tokens": args.max_new_tokens, "do_sample": False},
            engine={
                "max_batch_size": args.questions,
                "max_queue_size": max(32, args.questions),
                "batch_wait_ms": args.batch_wait_ms,
                "vision_cache_mb": 0,
            },
        )
        chats = conversations(Path(folder), args.questions, args, settings)
        loaded = load_model(settings.model)
        vision = settings.vision
        pipeline = Pipeline(
            loaded.model, loaded.processor, min_pixels=vision.min_pixels, max_pixels=vision.max_pixels
        )
        engine = InferenceEngine(settings)
        await engine.start()
        try:
            modes: dict[str, Callable[[], Awaitable[Answers]]] = {
                "seed, sequential": lambda: seed_sequential(loaded, chats, kwargs),
                "pipeline, sequential": lambda: pipeline_sequential(pipeline, chats, kwargs),
                "engine, batched": lambda: engine_batched(engine, chats, kwargs),
            }
            timings: dict[str, list[float]] = {mode: [] for mode in modes}
            answers: dict[str, Answers] = {}
            for round_index in tqdm(range(args.rounds + 1), desc="rounds (first is warm-up)", unit="round"):
                order = list(modes) if round_index % 2 == 0 else list(reversed(modes))
                for mode in order:
                    started = time.perf_counter()
                    outcome = await modes[mode]()
                    elapsed = time.perf_counter() - started
                    answers.setdefault(mode, outcome)
                    if round_index > 0:
                        timings[mode].append(elapsed)
            stats = engine.stats
        finally:
            await engine.stop()

    seed_median = statistics.median(timings["seed, sequential"])
    token_counts = [tokens for _, tokens in answers["seed, sequential"]]
    rows = []
    for mode, values in timings.items():
        wall = statistics.median(values)
        rows.append(
            (
                mode,
                wall,
                wall / args.questions * 1e3,
                sum(token_counts) / wall,
                wall / seed_median,
                "yes" if answers[mode] == answers["seed, sequential"] else "NO",
            )
        )
    print(f"\n{setup}")
    print(
        f"{args.questions} questions, {args.width}x{args.height} JPEG each, greedy, max_new_tokens "
        f"{args.max_new_tokens}; median of {args.rounds} rounds after a warm-up round"
    )
    print_table(
        "Answering all questions",
        ["mode", "wall s", "ms/question", "tokens/s", "ratio vs seed", "same answers"],
        rows,
    )
    print(f"\nengine batch sizes (size: batches): {dict(sorted(stats.batch_sizes.items()))}")
    print(f"new tokens per answer: {token_counts}")
    engine_ratio = statistics.median(timings["engine, batched"]) / seed_median
    print(f"engine / seed wall-time ratio: {engine_ratio:.2f} (goal <= 0.35)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-wait-ms", type=float, default=50.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
