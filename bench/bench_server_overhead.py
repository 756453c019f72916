"""Benchmark: the bot's overhead per question on the server backend, vs the same request sent straight.

A real `transformers serve` runs the tiny random Qwen2.5-VL on 127.0.0.1 (tests/inference/server.py). Each
question carries its own ~2 MB photo-like JPEG (distinct, so content addressing cannot short-circuit) and is
answered two ways, alternating which goes first from one question to the next:

- Discord: a user mentions the real bot (discord.py client + answering service, `engine.backend = "server"`,
  talking straight to the server) in the loopback Discord (tests/fakediscord), each question in its own
  channel so history stays empty; the bot downloads the JPEG from the loopback CDN, validates and stores it,
  builds the context, resizes the image and encodes it as a PNG data URL (`openai_format`), streams the
  answer and edits it into Discord. Timed from the user's message sent to the first bot message showing
  answer text, and to the final answer (the reply linked to the stored answer, `RunningBot.wait_reply`).
- direct: the same chat request (the bot's own messages for that question, with the same resized PNG data
  URL prepared beforehand, the same `max_tokens`, temperature 0, `stream=True`) sent with the `openai`
  AsyncOpenAI client. Timed to the first streamed token and to the end of the stream.

The bot's overhead is median first text (Discord) − median first token (direct); goal: under 25 ms extra.
The same difference for the final answer vs the end of the stream shows the final edit going out as soon
as the stream ends: only intermediate edits are spaced by `discord.stream_edit_interval_seconds`.
`--max-tokens` is small so that generation time does not drown the overhead. A second table
splits the image preparation that only the bot does (`openai_format.image_data_url` on that JPEG), at the
bot's pixel limits here and at the default ones (`[vision]` defaults of a real deployment).

Everything runs on loopback on one machine: the server's work shares the CPU with the bot's, so absolute
figures are small and noisy; the difference is measured side by side in one run. One warm-up question per
path comes first and is not counted.

    python bench/bench_server_overhead.py [--questions 20] [--max-tokens 8] [--width 2048 --height 1536]
"""

from __future__ import annotations

import argparse
import base64
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import openai
from _common import (
    add_server_bench_args,
    ask_on_discord,
    attach_photos,
    chat_body,
    discord_bot,
    distinct_photos,
    median_ms,
    p90_ms,
    print_table,
    question,
    replace_images,
    run_against_inference_server,
    server_bot_settings,
    stream_direct,
    write_photos,
)
from PIL import Image
from tqdm import tqdm

from bot.engine.budget import smart_resize
from bot.engine.openai_format import image_data_url, png_bytes, to_openai_messages
from bot.media import MediaFetcher
from bot.settings import MediaSettings, VisionSettings

T = TypeVar("T")
BREAKDOWN_IMAGES = 5


def image_breakdown(paths: list[Path], vision: VisionSettings) -> list[tuple[str, float, float]]:
    """Median and p90 ms of `image_data_url` on each JPEG at `vision`'s limits and at the defaults, and of
    its parts at `vision`'s limits (decode + RGB, resize, PNG + base64)."""
    timings: dict[str, list[float]] = {}

    def timed(label: str, work: Callable[[], T]) -> T:
        started = time.perf_counter()
        result = work()
        timings.setdefault(label, []).append(time.perf_counter() - started)
        return result

    defaults = VisionSettings()
    here = f"{vision.min_pixels // 784}..{vision.max_pixels // 784} x 28x28"
    default = f"{defaults.min_pixels // 784}..{defaults.max_pixels // 784} x 28x28"
    for path in paths:
        timed(
            f"image_data_url, bot's limits ({here} px)",
            lambda path=path: image_data_url(
                path, min_pixels=vision.min_pixels, max_pixels=vision.max_pixels
            ),
        )

        def decode(path: Path = path) -> Image.Image:
            with Image.open(path) as opened:
                return opened.convert("RGB")

        image = timed("  decode + RGB", decode)
        height, width = smart_resize(
            image.height, image.width, min_pixels=vision.min_pixels, max_pixels=vision.max_pixels
        )
        small = timed("  resize", lambda image=image, size=(width, height): image.resize(size))

        def encode(small: Image.Image = small) -> str:
            return base64.b64encode(png_bytes(small)).decode("ascii")

        timed("  PNG + base64", encode)
        timed(
            f"image_data_url, default limits ({default} px)",
            lambda path=path: image_data_url(
                path, min_pixels=defaults.min_pixels, max_pixels=defaults.max_pixels
            ),
        )
    return [(label, median_ms(values), p90_ms(values)) for label, values in timings.items()]


async def time_fetches(urls: list[str], media: MediaSettings, media_dir: Path) -> list[float]:
    """Seconds per `MediaFetcher.fetch` of each URL into an empty media directory (nothing deduplicated)."""
    timings = []
    async with MediaFetcher(media, media_dir) as fetcher:
        for url in urls:
            started = time.perf_counter()
            await fetcher.fetch(url)
            timings.append(time.perf_counter() - started)
    return timings


async def run(args: argparse.Namespace, model_dir: Path, server: Any, folder: Path) -> None:
    count = args.questions
    jpegs = distinct_photos(count + 1, args.width, args.height, seed=args.seed)  # [0] is the warm-up's
    paths = write_photos(folder, jpegs)

    def settings_for(fake: Any) -> Any:
        return server_bot_settings(
            model_dir,
            folder / "bot-data",
            fake,
            server,
            generation={"max_new_tokens": args.max_tokens, "do_sample": False},
            discord={"stream_edit_interval_seconds": args.edit_interval},
        )

    channel_names = [f"question-{index}" for index in range(count + 1)]
    discord: dict[str, list[float]] = {"first": [], "final": []}
    direct: dict[str, list[float]] = {"first": [], "final": []}
    tokens: list[int] = []
    async with discord_bot(settings_for, channel_names) as (fake, bot, user, channels):
        settings = bot.settings
        attachments = attach_photos(fake, jpegs)

        # Warm-up on both paths; the bot's prompt for it is the template of every direct request.
        await ask_on_discord(fake, bot, user, channels[0], question(0), [attachments[0]])
        template = bot.prompts[-1]
        prepared = [replace_images(template, [path], question(index)) for index, path in enumerate(paths)]
        bodies = [
            chat_body(
                server.model,
                to_openai_messages(messages, settings.vision, accepts_video=False),
                args.max_tokens,
            )
            for messages in tqdm(prepared, desc="data URLs (prepared beforehand)", unit="image")
        ]
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)
        try:
            await stream_direct(client, bodies[0])
            for index in tqdm(range(1, count + 1), desc="questions (both paths)", unit="question"):

                async def on_discord(index: int = index) -> None:
                    first, final = await ask_on_discord(
                        fake, bot, user, channels[index], question(index), [attachments[index]]
                    )
                    discord["first"].append(first)
                    discord["final"].append(final)

                async def straight(index: int = index) -> None:
                    first, end, completion_tokens = await stream_direct(client, bodies[index])
                    direct["first"].append(first)
                    direct["final"].append(end)
                    tokens.append(completion_tokens)

                for path in (on_discord, straight) if index % 2 else (straight, on_discord):
                    await path()
        finally:
            await client.close()
        # The bot's prompt for each question must be the direct request's (apart from where the image lies).
        same = (
            all(
                replace_images(sent, [paths[index]]) == prepared[index]
                for index, sent in enumerate(bot.prompts[: count + 1])
            )
            and len(bot.prompts) == count + 1
        )
        vision = settings.vision
        fetches = await time_fetches(
            [attachment["url"] for attachment in attachments[1 : 1 + BREAKDOWN_IMAGES]],
            settings.media,
            folder / "fetch-media",
        )
    breakdown = image_breakdown(paths[1 : 1 + BREAKDOWN_IMAGES], vision)
    breakdown.append(
        ("MediaFetcher.fetch: CDN download, validate, store", median_ms(fetches), p90_ms(fetches))
    )

    overhead_first = median_ms(discord["first"]) - median_ms(direct["first"])
    overhead_final = median_ms(discord["final"]) - median_ms(direct["final"])
    paired_first = statistics.median(a - b for a, b in zip(discord["first"], direct["first"], strict=True))
    paired_final = statistics.median(a - b for a, b in zip(discord["final"], direct["final"], strict=True))
    print(
        f"\nserver: transformers serve (CPU, float32, one request at a time), model: "
        f"{args.model or 'tiny random Qwen2.5-VL'} | seed {args.seed} | {count} questions, "
        f"{args.width}x{args.height} JPEG each (mean {np.mean([len(d) for d in jpegs]) / 1e6:.2f} MB), "
        f"max_tokens {args.max_tokens}, greedy | edit interval {args.edit_interval:.1f} s | "
        f"bot's image limits {vision.min_pixels}..{vision.max_pixels} px"
    )
    print_table(
        f"Per question, ms (median and p90 over {count} questions, paths alternating)",
        ["path", "first text", "p90", "final / end", "p90"],
        [
            (
                "Discord, real bot (server backend)",
                median_ms(discord["first"]),
                p90_ms(discord["first"]),
                median_ms(discord["final"]),
                p90_ms(discord["final"]),
            ),
            (
                "direct, openai client",
                median_ms(direct["first"]),
                p90_ms(direct["first"]),
                median_ms(direct["final"]),
                p90_ms(direct["final"]),
            ),
            ("bot overhead: difference of medians", overhead_first, "", overhead_final, ""),
            ("bot overhead: median of differences", paired_first * 1e3, "", paired_final * 1e3, ""),
        ],
    )
    print_table(
        f"Image preparation only the bot does, per {args.width}x{args.height} JPEG "
        f"(ms, {min(count, BREAKDOWN_IMAGES)} JPEGs, one at a time; the fetch row for comparison)",
        ["step", "median", "p90"],
        breakdown,
    )
    print(f"\ncompletion tokens per direct answer: {sorted(set(tokens))}")
    print(f"the bot's requests are the direct ones (same messages, images aside): {'yes' if same else 'NO'}")
    print(
        f"bot overhead to the first text: {overhead_first:.1f} ms (goal < 25 ms extra); to the final answer: "
        f"{overhead_final:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_bench_args(parser)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument(
        "--edit-interval", type=float, default=1.0, help="discord.stream_edit_interval_seconds (>= 1.0)"
    )
    run_against_inference_server(parser.parse_args(), "server-overhead", run)


if __name__ == "__main__":
    main()
