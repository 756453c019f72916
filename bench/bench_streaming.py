"""Benchmark: time to the first streamed piece of an answer vs time to the whole answer, through the engine.

Each request is a question about a photo-like JPEG, greedy, `--max-new-tokens` long. Every round submits one
request alone, then `--batch` requests together (one micro-batch, as when several people ask at once); the
alternation makes machine load hit both rows alike. Times run from `submit()` to the first `on_text` call
(which the engine makes on the event loop) and to the result; the table prints the medians over all requests
of each row. The vision cache is off, so every request pays for its image like a first question does.

    python bench/bench_streaming.py [--runs 20] [--batch 8] [--max-new-tokens 64] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from _common import add_model_args, bench_settings, configure_torch, model_directory, print_table, write_photo
from tqdm import tqdm

from bot.engine import EngineRequest
from bot.engine.worker import InferenceEngine

Timing = tuple[float, float]  # seconds to the first text, seconds to the result


async def timed_requests(engine: InferenceEngine, messages: list[dict], count: int, tag: str) -> list[Timing]:
    """Submit `count` requests at once (distinct conversations); time each one's first text and result."""
    first_text: list[float | None] = [None] * count

    def on_text_for(index: int):
        def on_text(_delta: str) -> None:
            if first_text[index] is None:
                first_text[index] = time.perf_counter()

        return on_text

    started = time.perf_counter()
    handles = [
        engine.submit(EngineRequest(messages, conversation_key=f"{tag}:{index}", on_text=on_text_for(index)))
        for index in range(count)
    ]
    timings = []
    for index, handle in enumerate(handles):
        await handle.result()
        finished = time.perf_counter()
        first = first_text[index]
        if first is None:
            raise RuntimeError("a request finished without streaming any text")
        timings.append((first - started, finished - started))
    return timings


async def run(args: argparse.Namespace) -> None:
    setup = configure_torch(args)
    with model_directory(args) as model_dir, tempfile.TemporaryDirectory(prefix="bench-streaming-") as folder:
        image = write_photo(Path(folder, "photo.jpg"), args.width, args.height, seed=args.seed)
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": str(image)},
                    {"type": "text", "text": "Describe this image."},
                ],
            }
        ]
        settings = bench_settings(
            model_dir,
            args.device,
            generation={"max_new_tokens": args.max_new_tokens, "do_sample": False},
            engine={"max_batch_size": args.batch, "batch_wait_ms": 20.0, "vision_cache_mb": 0},
        )
        engine = InferenceEngine(settings)
        await engine.start()
        try:
            await timed_requests(engine, messages, args.batch, "warm-up")
            batched = f"in a batch of {args.batch}"
            scenarios: dict[str, list[Timing]] = {"alone": [], batched: []}
            for run_index in tqdm(range(args.runs), desc="rounds (one alone, one batch)", unit="round"):
                scenarios["alone"] += await timed_requests(engine, messages, 1, f"alone-{run_index}")
                scenarios[batched] += await timed_requests(engine, messages, args.batch, f"batch-{run_index}")
        finally:
            await engine.stop()

    rows = []
    for name, timings in scenarios.items():
        first = statistics.median(t for t, _ in timings) * 1e3
        full = statistics.median(t for _, t in timings) * 1e3
        rows.append((name, len(timings), first, full, first / full))
    print(f"\n{setup}")
    print(f"{args.width}x{args.height} JPEG + question, greedy, max_new_tokens {args.max_new_tokens}")
    print_table(
        "Streaming latency (medians)",
        ["scenario", "requests", "first text ms", "full answer ms", "first / full"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
