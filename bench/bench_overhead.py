"""Benchmark: the bot's own work per message, everything except `generate`.

Each message goes through the steps `AnswerService` takes around the model, on the real store (SQLite in a
temporary directory) and the real `MediaFetcher`:

    lookups         find_conversation + is_recorded
    fetch           download a ~2 MB photo-like JPEG from a loopback aiohttp server on 127.0.0.1
                    (allowed_hosts = ["127.0.0.1"]), sniff, validate (re-encode if needed), store by sha256
    load_window     the newest 2 × history.max_turns messages
    build_messages  the Qwen messages list within budget (text tokens counted with the model's tokenizer)
    record_turn     question, media and answer in one transaction

Rows: distinct JPEGs (content addressing cannot short-circuit), the same JPEG every time, and text only.
Conversations are pre-filled with `--history-turns` turns so the window is full. A second table splits
`fetch` for the distinct JPEGs into its parts, next to cheaper alternatives (a 1/8-scale draft decode, PNG
level 1, a JPEG re-encode, keeping the JPEG as sent); `--profile` adds a cProfile of `validate_image`.

    python bench/bench_overhead.py [--messages 50] [--width 2048 --height 1536] [--profile] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
import numpy as np
from _common import (
    LOOPBACK_HOST,
    LoopbackImageServer,
    add_model_args,
    bench_settings,
    configure_torch,
    jpeg_bytes,
    median_ms,
    model_directory,
    p90_ms,
    photo_pixels,
    print_table,
)
from PIL import Image, ImageOps
from tqdm import tqdm
from transformers import AutoTokenizer

from bot.content import ChatMessage, ConversationScope, MediaPart, TextPart
from bot.conversation import build_messages
from bot.media import MediaFetcher
from bot.media.decode import validate_image
from bot.media.download import download
from bot.media.sniff import JPEG
from bot.media.storage import store_content_addressed
from bot.settings import Settings
from bot.store import ConversationStore, NewTurn, upgrade

T = TypeVar("T")
STAGES = ("lookups", "fetch", "load_window", "build_messages", "record_turn")
CONVERSATIONS = 5
ANSWER = "On the left side of the picture there is an ocean with waves crashing onto the shore. " * 6


@dataclass
class StageTimes:
    """Seconds per message for each stage, and per message in total."""

    stages: dict[str, list[float]] = field(default_factory=lambda: {stage: [] for stage in STAGES})
    total: list[float] = field(default_factory=list)


def distinct_jpegs(count: int, width: int, height: int, seed: int) -> list[bytes]:
    """`count` different photo-like JPEGs of one size (shifted copies of one picture, so they cost alike)."""
    base = photo_pixels(width, height, seed=seed)
    return [jpeg_bytes(np.roll(base, 7 * index, axis=1), quality=92) for index in tqdm(range(count), "jpegs")]


class Bot:
    """The answering service's steps around the model, timed one by one."""

    def __init__(
        self,
        settings: Settings,
        store: ConversationStore,
        media: MediaFetcher,
        count_tokens: Callable[[str], int],
    ) -> None:
        self.settings = settings
        self.store = store
        self.media = media
        self.count_tokens = count_tokens
        self.next_discord_id = 1

    async def message(self, scope: ConversationScope, text: str, url: str | None, times: StageTimes) -> None:
        """One message: every step except generate (the answer is a fixed text)."""
        discord_id = self.next_discord_id
        self.next_discord_id += 1
        marks = [time.perf_counter()]
        conversation_id = await self.store.find_conversation(scope)
        assert conversation_id is not None
        await self.store.is_recorded(conversation_id, discord_id)
        marks.append(time.perf_counter())
        parts: list[MediaPart | TextPart] = [MediaPart(await self.media.fetch(url))] if url else []
        question = ChatMessage(role="user", parts=(*parts, TextPart(text)))
        marks.append(time.perf_counter())
        history = await self.store.load_window(conversation_id, 2 * self.settings.history.max_turns)
        marks.append(time.perf_counter())
        build_messages(
            history,
            question,
            vision=self.settings.vision,
            history_settings=self.settings.history,
            generation=self.settings.generation,
            count_text_tokens=self.count_tokens,
        )
        marks.append(time.perf_counter())
        await self.store.record_turn(
            conversation_id, NewTurn(question, ANSWER, question_discord_id=discord_id)
        )
        marks.append(time.perf_counter())
        for stage, start, end in zip(STAGES, marks[:-1], marks[1:], strict=True):
            times.stages[stage].append(end - start)
        times.total.append(marks[-1] - marks[0])


async def prefill(bot: Bot, scopes: Sequence[ConversationScope], turns: int, small_jpeg: bytes) -> None:
    """Give each conversation `turns` turns, an image every fifth one."""
    image = await bot.media.store_bytes(small_jpeg)
    for scope in scopes:
        conversation_id = await bot.store.conversation_for(scope)
        for turn in range(turns):
            parts = (MediaPart(image), TextPart(f"question {turn}")) if turn % 5 == 0 else (TextPart("hi"),)
            question = ChatMessage(role="user", parts=parts)
            await bot.store.record_turn(conversation_id, NewTurn(question, ANSWER, question_discord_id=None))


def fetch_breakdown(jpegs: Sequence[bytes], settings: Settings, media_dir: Path) -> tuple[list[tuple], float]:
    """Median and p90 ms of each part of `fetch` after the download, and of two alternatives, run one by one
    on this thread; and the mean size of the stored images in bytes."""
    parts: dict[str, list[float]] = {}
    stored_sizes = []

    def timed(label: str, work: Callable[[], T]) -> T:
        started = time.perf_counter()
        result = work()
        parts.setdefault(label, []).append(time.perf_counter() - started)
        return result

    def decode(data: bytes, *, draft: bool) -> Image.Image:
        with Image.open(io.BytesIO(data)) as image:
            if draft:  # JPEG DCT scaling: every block is still entropy-decoded, so damage still shows
                image.draft("RGB", (image.width // 8, image.height // 8))
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")

    def encode(image: Image.Image, **options: object) -> bytes:
        out = io.BytesIO()
        image.save(out, **options)
        return out.getvalue()

    for data in tqdm(jpegs, desc="fetch breakdown", unit="image"):
        rgb = timed("decode + EXIF + RGB, full size", lambda data=data: decode(data, draft=False))
        timed("decode at 1/8 scale (JPEG draft mode)", lambda data=data: decode(data, draft=True))
        timed("PNG encode, level 6 (Pillow default)", lambda rgb=rgb: encode(rgb, format="PNG"))
        timed("PNG encode, level 1", lambda rgb=rgb: encode(rgb, format="PNG", compress_level=1))
        timed("JPEG encode, quality 95", lambda rgb=rgb: encode(rgb, format="JPEG", quality=95))
        validated = timed(
            "validate_image as shipped (1/8 draft decode, kept as sent)",
            lambda data=data: validate_image(data, JPEG, settings.media.max_pixels),
        )
        stored_sizes.append(len(validated.data))
        timed(
            "sha256 + write, what validate_image returns",
            lambda stored=validated.data: store_content_addressed(media_dir, stored, ".jpg"),
        )
        timed(
            "sha256 + write, the JPEG as sent",
            lambda data=data: store_content_addressed(media_dir, data, ".jpg"),
        )
    rows = [(name, median_ms(values), p90_ms(values)) for name, values in parts.items()]
    return rows, float(np.mean(stored_sizes))


async def time_downloads(urls: Sequence[str], settings: Settings) -> list[float]:
    """Seconds per download alone (one shared session, as MediaFetcher keeps)."""
    timings = []
    async with aiohttp.ClientSession() as session:
        for url in urls:
            started = time.perf_counter()
            await download(session, url, settings.media)
            timings.append(time.perf_counter() - started)
    return timings


def profile_validate(jpegs: Sequence[bytes], settings: Settings) -> None:
    """Print where `validate_image` spends its time (cProfile, top functions by own time)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for data in jpegs:
        validate_image(data, JPEG, settings.media.max_pixels)
    profiler.disable()
    print(f"\ncProfile of validate_image over {len(jpegs)} JPEGs (top 12 by own time):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


async def run(args: argparse.Namespace) -> None:
    setup = configure_torch(args)
    jpegs = distinct_jpegs(args.messages, args.width, args.height, args.seed)
    files = {f"distinct-{index}.jpg": data for index, data in enumerate(jpegs)}
    with (
        model_directory(args) as model_dir,
        tempfile.TemporaryDirectory(prefix="bench-overhead-") as folder,
        LoopbackImageServer(files) as server,
    ):
        settings = bench_settings(
            model_dir,
            args.device,
            media={"allowed_hosts": [LOOPBACK_HOST]},
            storage={"data_dir": folder},
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

        def count_tokens(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        database_url = settings.storage.resolved_database_url
        upgrade(database_url)
        media_dir = settings.storage.resolved_media_dir
        scenarios = {
            "distinct 2 MB JPEGs": [server.url(name) for name in files],
            "same JPEG every time": [server.url("distinct-0.jpg")] * args.messages,
            "text only": [None] * args.messages,
        }
        results: dict[str, StageTimes] = {}
        async with (
            ConversationStore(database_url, media_dir) as store,
            MediaFetcher(settings.media, media_dir) as media,
        ):
            bot = Bot(settings, store, media, count_tokens)
            small_jpeg = jpeg_bytes(photo_pixels(64, 48, seed=args.seed))
            for index, (name, urls) in enumerate(scenarios.items()):
                scopes = [ConversationScope("cli", channel_id=100 * index + n) for n in range(CONVERSATIONS)]
                await prefill(bot, scopes, args.history_turns, small_jpeg)
                await bot.message(scopes[0], "warm-up", urls[0], StageTimes())
                times = results[name] = StageTimes()
                for number, url in enumerate(tqdm(urls, desc=name, unit="message")):
                    await bot.message(scopes[number % CONVERSATIONS], f"question {number}?", url, times)
            download_times = await time_downloads(list(scenarios["distinct 2 MB JPEGs"]), settings)
        sample = jpegs[: args.breakdown_images]
        breakdown, stored_size = fetch_breakdown(sample, settings, Path(folder, "breakdown"))
        if args.profile:
            profile_validate(jpegs[:10], settings)

    print(f"\n{setup}")
    print(
        f"{args.messages} messages per row over {CONVERSATIONS} conversations pre-filled with "
        f"{args.history_turns} turns; JPEG {args.width}x{args.height}, "
        f"mean {np.mean([len(data) for data in jpegs]) / 1e6:.2f} MB (as stored: {stored_size / 1e6:.2f} MB)"
    )
    print_table(
        "Bot overhead per message, excluding generate (median ms; total also p90)",
        ["message", *STAGES, "total", "total p90"],
        [
            (
                name,
                *(median_ms(times.stages[stage]) for stage in STAGES),
                median_ms(times.total),
                p90_ms(times.total),
            )
            for name, times in results.items()
        ],
    )
    print_table(
        f"Where fetch goes (ms, each part alone; downloads: all JPEGs, the rest: {len(sample)} of them)",
        ["part", "median", "p90"],
        [
            ("download only (loopback, 127.0.0.1)", median_ms(download_times), p90_ms(download_times)),
            *breakdown,
        ],
    )
    print("\ngoal: total < 25 ms per message")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument("--history-turns", type=int, default=20)
    parser.add_argument("--breakdown-images", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="cProfile the image validation step")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
