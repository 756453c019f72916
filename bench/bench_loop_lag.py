"""Event-loop responsiveness while the model generates: the engine's worker thread vs generating on the loop.

A ticker sleeps 10 ms at a time on the event loop and records how late each wake-up is, while requests
are generated back to back for a fixed time with the tiny random model on CPU. "engine" submits them to
`InferenceEngine` (a few in flight, streaming on); "naive" calls the pipeline directly on the loop, as a bot
without a worker thread would. "idle" is the ticker alone, the floor of what the loop can do.

    python bench/bench_loop_lag.py [--seconds 10] [--max-new-tokens 128] [--threads N] [--model DIR]

Goal: engine p99 < 20 ms and max < 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from _common import add_model_args, bench_settings, configure_torch, model_directory, print_table

from bot.engine import generate
from bot.engine.loader import load_model
from bot.engine.pipeline import Pipeline, PipelineRequest
from bot.engine.worker import InferenceEngine
from bot.settings import Settings

TICK_SECONDS = 0.010
QUESTIONS = [f"Question {n}: what is in the picture, and what colour is item {n}?" for n in range(64)]


@dataclass(frozen=True)
class Row:
    mode: str
    requests: int
    new_tokens: int
    lags: list[float]
    seconds: float


def messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question}]}]


async def measure(
    mode: str, seconds: float, work: Callable[[asyncio.Event], Awaitable[tuple[int, int]]]
) -> Row:
    """Run `work` until `seconds` pass while a 10 ms ticker records how late the loop wakes it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    lags: list[float] = []

    async def ticker() -> None:
        due = loop.time() + TICK_SECONDS
        while not stop.is_set():
            await asyncio.sleep(max(due - loop.time(), 0))
            now = loop.time()
            lags.append(now - due)
            due = now + TICK_SECONDS

    started = time.perf_counter()
    loop.call_later(seconds, stop.set)
    (requests, new_tokens), _ = await asyncio.gather(work(stop), ticker())
    return Row(mode, requests, new_tokens, lags, time.perf_counter() - started)


def generate_kwargs(max_new_tokens: int) -> dict[str, object]:
    # min_new_tokens keeps the random model from stopping early, so every request does the same work.
    return {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens, "do_sample": False}


async def run_idle(seconds: float) -> Row:
    async def nothing(stop: asyncio.Event) -> tuple[int, int]:
        await stop.wait()
        return 0, 0

    return await measure("idle", seconds, nothing)


async def run_engine(settings: Settings, seconds: float, in_flight: int) -> Row:
    engine = InferenceEngine(settings)
    await engine.start()
    kwargs = generate_kwargs(settings.generation.max_new_tokens or 0)
    deltas = 0

    def on_text(_: str) -> None:
        nonlocal deltas
        deltas += 1

    async def client(index: int, stop: asyncio.Event) -> tuple[int, int]:
        requests = tokens = 0
        while not stop.is_set():
            question = QUESTIONS[(index + requests * in_flight) % len(QUESTIONS)]
            result = await generate(
                engine,
                messages(question),
                conversation_key=f"c{index}",
                generate_kwargs=kwargs,
                on_text=on_text,
            )
            requests += 1
            tokens += len(result.token_ids)
        return requests, tokens

    async def work(stop: asyncio.Event) -> tuple[int, int]:
        totals = await asyncio.gather(*(client(index, stop) for index in range(in_flight)))
        return sum(requests for requests, _ in totals), sum(tokens for _, tokens in totals)

    try:
        return await measure(f"engine ({in_flight} in flight)", seconds, work)
    finally:
        await engine.stop()


async def run_naive(settings: Settings, seconds: float) -> Row:
    loaded = load_model(settings.model)
    pipeline = Pipeline(
        loaded.model,
        loaded.processor,
        min_pixels=settings.vision.min_pixels,
        max_pixels=settings.vision.max_pixels,
    )
    kwargs = generate_kwargs(settings.generation.max_new_tokens or 0)

    async def work(stop: asyncio.Event) -> tuple[int, int]:
        requests = tokens = 0
        while not stop.is_set():
            request = PipelineRequest(messages(QUESTIONS[requests % len(QUESTIONS)]), kwargs)
            tokens += len(pipeline.run_batch([request])[0].token_ids)  # blocks the loop: the point
            requests += 1
            await asyncio.sleep(0)  # let the ticker see how late it is
        return requests, tokens

    return await measure("naive (generate on loop)", seconds, work)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


def table_row(row: Row) -> list[object]:
    lags = row.lags or [0.0]
    return [
        row.mode,
        row.requests,
        round(row.new_tokens / row.seconds),
        len(row.lags),
        statistics.median(lags) * 1e3,
        percentile(lags, 0.99) * 1e3,
        max(lags) * 1e3,
    ]


async def run_all(args: argparse.Namespace, settings: Settings) -> list[Row]:
    return [
        await run_idle(args.seconds),
        await run_engine(settings, args.seconds, in_flight=1),
        await run_engine(settings, args.seconds, in_flight=4),
        await run_naive(settings, args.seconds),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per mode")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--switch-interval-ms", type=float, default=sys.getswitchinterval() * 1e3)
    args = parser.parse_args()
    if args.threads is None and args.device == "cpu":
        args.threads = max((os.cpu_count() or 2) - 1, 1)  # leave the event loop a core of its own
    logging.basicConfig(level=logging.WARNING)
    sys.setswitchinterval(args.switch_interval_ms / 1e3)
    setup = configure_torch(args)
    with model_directory(args) as model_dir:
        settings = bench_settings(
            model_dir,
            args.device,
            generation={"max_new_tokens": args.max_new_tokens, "do_sample": False},
            engine={"max_batch_size": 4, "batch_wait_ms": 5},
        )
        rows = asyncio.run(run_all(args, settings))
    print_table(
        f"event-loop lag of a 10 ms ticker | {setup} | {os.cpu_count()} cores | GIL switch interval "
        f"{sys.getswitchinterval() * 1e3:.1f} ms | {args.seconds:.0f} s per mode | "
        f"{args.max_new_tokens} new tokens per request",
        ["mode", "requests", "tok/s", "ticks", "p50 ms", "p99 ms", "max ms"],
        [table_row(row) for row in rows],
    )


if __name__ == "__main__":
    main()
