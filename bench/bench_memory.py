"""Benchmark: resident memory over many requests through the real answering service.

`running_service` wires the real stack (SQLite store, media fetcher, inference engine with the tiny model, or
`--model`) in a temporary data directory. Questions go to `--conversations` conversations, one per
conversation at a time, all conversations at once (so the engine batches them); every `--image-every`-th
question attaches a small JPEG, a different one each time, and later questions re-send it from the history.
After `--warm-up` requests the process's RSS (psutil, after a garbage collection and glibc's `malloc_trim`,
so freed heap pages the allocator still holds do not count) is the baseline; it is printed every
`--checkpoint` requests (the untrimmed RSS too), then the growth over the measured requests and its
least-squares trend.

    python bench/bench_memory.py [--requests 1000] [--warm-up 50] [--conversations 8] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from _common import add_model_args, bench_settings, configure_torch, model_directory, print_table, write_photo
from tqdm import tqdm

from bot.answering import AnswerService, Question
from bot.app import running_service
from bot.content import ConversationScope

MB = 1024 * 1024


def _malloc_trim() -> Callable[[], None] | None:
    """glibc's `malloc_trim(0)`, which hands freed heap pages back to the OS; None elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return lambda: libc.malloc_trim(0)


MALLOC_TRIM = _malloc_trim()


def rss_mb() -> tuple[float, float]:
    """The process's resident set size in MiB after a garbage collection, and after `malloc_trim` too
    (the same value where there is no glibc)."""
    gc.collect()
    raw = psutil.Process().memory_info().rss / MB
    if MALLOC_TRIM is not None:
        MALLOC_TRIM()
    return raw, psutil.Process().memory_info().rss / MB


class Traffic:
    """Numbered questions over a fixed set of conversations; some carry a new small image."""

    def __init__(self, image_dir: Path, conversations: int, image_every: int, seed: int) -> None:
        self.image_dir = image_dir
        self.scopes = [
            ConversationScope("discord", channel_id=100 + n, guild_id=1) for n in range(conversations)
        ]
        self.image_every = image_every
        self.seed = seed
        self.sent = 0

    def question(self, scope: ConversationScope) -> Question:
        """The next question, in `scope`."""
        number = self.sent
        self.sent += 1
        files: tuple[Path, ...] = ()
        if number % self.image_every == 0:
            image = self.image_dir / f"image-{number}.jpg"
            files = (write_photo(image, 96, 72, seed=self.seed + number),)
        text = f"Question {number}: what is in the picture?"
        return Question(scope=scope, text=text, local_files=files, discord_message_id=number + 1)

    async def round(self, service: AnswerService, count: int) -> None:
        """`count` questions, at most one per conversation, answered concurrently."""
        questions = [self.question(scope) for scope in self.scopes[:count]]
        answers = await asyncio.gather(*(service.answer(question) for question in questions))
        if any(answer.duplicate or answer.assistant_message_id is None for answer in answers):
            raise RuntimeError("a request was not answered and recorded")


async def drive(
    service: AnswerService, traffic: Traffic, total: int, label: str, every: int = 0
) -> list[tuple]:
    """Send `total` questions; every `every` requests record (requests, seconds, RSS)."""
    checkpoints = []
    started = time.perf_counter()
    done = 0
    next_checkpoint = every
    with tqdm(total=total, desc=label, unit="request") as progress:
        while done < total:
            count = min(len(traffic.scopes), total - done)
            await traffic.round(service, count)
            done += count
            progress.update(count)
            if every and (done >= next_checkpoint or done == total):
                checkpoints.append((done, time.perf_counter() - started, rss_mb()))
                next_checkpoint += every
    return checkpoints


async def run(args: argparse.Namespace) -> None:
    setup = configure_torch(args)
    with model_directory(args) as model_dir, tempfile.TemporaryDirectory(prefix="bench-memory-") as folder:
        settings = bench_settings(
            model_dir,
            args.device,
            vision={"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28},
            generation={"max_new_tokens": args.max_new_tokens, "do_sample": False},
            storage={"data_dir": str(Path(folder, "data"))},
            engine={"batch_wait_ms": 1.0},
        )
        images = Path(folder, "images")
        images.mkdir()
        traffic = Traffic(images, args.conversations, args.image_every, args.seed)
        before_start = rss_mb()
        async with running_service(settings) as service:
            started = rss_mb()
            await drive(service, traffic, args.warm_up, "warm-up")
            baseline = rss_mb()
            checkpoints = await drive(service, traffic, args.requests, "measured", args.checkpoint)

    (_, base), (_, final) = baseline, checkpoints[-1][2]
    print(f"\n{setup}")
    print(
        f"{args.requests} requests after {args.warm_up} warm-up requests; {args.conversations} conversations "
        f"answered concurrently; an image every {args.image_every} questions; "
        f"max_new_tokens {args.max_new_tokens}"
    )
    trim = "after gc + malloc_trim(0)" if MALLOC_TRIM is not None else "after gc (no glibc: no malloc_trim)"
    print(
        f"RSS {trim}: before start {before_start[1]:.1f} MiB, after start {started[1]:.1f} MiB, "
        f"after warm-up {base:.1f} MiB (the baseline)"
    )
    rows = [
        (requests, seconds, raw, trimmed, trimmed - base) for requests, seconds, (raw, trimmed) in checkpoints
    ]
    print_table(
        "RSS during the measured requests (MiB)",
        ["requests", "elapsed s", "RSS after gc", "RSS after trim", "growth (trimmed)"],
        rows,
    )
    requests, seconds, _ = checkpoints[-1]
    slope = statistics.linear_regression([row[0] for row in rows], [row[3] for row in rows]).slope
    middle = rows[(len(rows) - 1) // 2]
    print(
        f"\ngrowth over {requests} requests: {final - base:.1f} MiB (goal < 50 MB); "
        f"from request {middle[0]} to {requests}: {final - middle[3]:+.1f} MiB; "
        f"trend {slope * 1000:.1f} MiB per 1,000 requests (least squares)"
    )
    print(f"{seconds:.1f} s for the measured requests, {requests / seconds:.1f} requests/s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warm-up", type=int, default=50)
    parser.add_argument("--checkpoint", type=int, default=100)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--image-every", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=2)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
