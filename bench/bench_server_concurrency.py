"""Benchmark: eight questions from eight channels at once vs one after another, on the server backend.

A real `transformers serve` runs the tiny random Qwen2.5-VL on 127.0.0.1 (tests/inference/server.py). The
real bot (discord.py client + answering service, `engine.backend = "server"`, `server.max_in_flight = 8`,
talking straight to the server) answers a user in the loopback Discord (tests/fakediscord); each question
carries its own photo-like JPEG, downloaded by the bot from the loopback CDN. Four modes, alternating their
order from one round to the next (each round uses fresh channels, so history stays empty):

- Discord, together:        8 questions sent in 8 channels at once; wall time from the first message sent to
                            the last final answer (the reply linked to the stored answer, `wait_reply`);
- Discord, one after other: the same 8, each sent after the previous final answer;
- direct, together:         the same 8 chat requests (the bot's messages, images as the same resized PNG data
                            URLs prepared beforehand, same `max_tokens`, temperature 0, streamed) sent at once
                            with the `openai` AsyncOpenAI client; wall time to the end of the last stream;
- direct, one after other:  the same 8, each after the previous stream ended.

Reported: the median wall time over `--rounds` and the ratio together / one after other for each path.
`transformers serve` runs vision requests strictly one at a time, so the direct ratio is about 1.0 here:
sending at once gains nothing but the overlap of request preparation. The bot's ratio shows whether the bot
adds serialisation of its own (it should not: it keeps up to `max_in_flight` requests open). On the servers
meant for production, vLLM and SGLang, concurrent requests are batched together (continuous batching), so
the same bot configuration gets a ratio well below 1 there.

Through Discord only intermediate edits are spaced by `discord.stream_edit_interval_seconds` (1.0 s, the
minimum: Discord rate-limits edits); the final text goes out as soon as the stream ends, so the Discord ratio
follows the server's. `--max-tokens` is large so that generation dominates.
One warm-up question per path comes first and is not counted.

    python bench/bench_server_concurrency.py [--rounds 3] [--questions 8] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
from _common import (
    add_server_bench_args,
    ask_on_discord,
    attach_photos,
    chat_body,
    discord_bot,
    distinct_photos,
    print_table,
    question,
    replace_images,
    run_against_inference_server,
    server_bot_settings,
    stream_direct,
    write_photos,
)
from tqdm import tqdm

from bot.engine.openai_format import to_openai_messages

MODES = ("Discord, together", "Discord, one after other", "direct, together", "direct, one after other")


async def run(args: argparse.Namespace, model_dir: Path, server: Any, folder: Path) -> None:
    count = args.questions
    jpegs = distinct_photos(count + 1, args.width, args.height, seed=args.seed)  # [count] is the warm-up's
    paths = write_photos(folder, jpegs)

    def settings_for(fake: Any) -> Any:
        return server_bot_settings(
            model_dir,
            folder / "bot-data",
            fake,
            server,
            generation={"max_new_tokens": args.max_tokens, "do_sample": False},
            engine={"max_queue_size": max(32, count)},
            server={"max_in_flight": args.max_in_flight},
        )

    # Fresh channels for each Discord mode in each round, and one for the warm-up.
    channel_names = ["warm-up"] + [
        f"round-{round_index}-{mode}-{index}"
        for round_index in range(args.rounds)
        for mode in ("together", "sequential")
        for index in range(count)
    ]
    timings: dict[str, list[float]] = {mode: [] for mode in MODES}
    tokens: list[int] = []
    async with discord_bot(settings_for, channel_names) as (fake, bot, user, channel_ids):
        settings = bot.settings
        attachments = attach_photos(fake, jpegs)
        free_channels = iter(channel_ids)

        await ask_on_discord(fake, bot, user, next(free_channels), question(count), [attachments[count]])
        template = bot.prompts[-1]
        bodies = [
            chat_body(
                server.model,
                to_openai_messages(
                    replace_images(template, [path], question(index)), settings.vision, accepts_video=False
                ),
                args.max_tokens,
            )
            for index, path in enumerate(paths)
        ]
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)

        async def discord_together() -> None:
            channels = [next(free_channels) for _ in range(count)]
            await asyncio.gather(
                *(
                    ask_on_discord(fake, bot, user, channel, question(index), [attachments[index]])
                    for index, channel in enumerate(channels)
                )
            )

        async def discord_sequential() -> None:
            channels = [next(free_channels) for _ in range(count)]
            for index, channel in enumerate(channels):
                await ask_on_discord(fake, bot, user, channel, question(index), [attachments[index]])

        async def direct_together() -> None:
            results = await asyncio.gather(*(stream_direct(client, body) for body in bodies[:count]))
            tokens.extend(completion for _, _, completion in results)

        async def direct_sequential() -> None:
            for body in bodies[:count]:
                tokens.append((await stream_direct(client, body))[2])

        modes: dict[str, Callable[[], Awaitable[None]]] = {
            "Discord, together": discord_together,
            "Discord, one after other": discord_sequential,
            "direct, together": direct_together,
            "direct, one after other": direct_sequential,
        }
        try:
            await stream_direct(client, bodies[count])
            for round_index in tqdm(range(args.rounds), desc="rounds", unit="round"):
                order = list(MODES) if round_index % 2 == 0 else list(reversed(MODES))
                for mode in order:
                    started = time.perf_counter()
                    await modes[mode]()
                    timings[mode].append(time.perf_counter() - started)
        finally:
            await client.close()
        assert bot.service is not None
        stats = bot.service._engine.stats

    wall = {mode: statistics.median(values) for mode, values in timings.items()}
    discord_ratio = wall["Discord, together"] / wall["Discord, one after other"]
    direct_ratio = wall["direct, together"] / wall["direct, one after other"]
    print(
        f"\nserver: transformers serve (CPU, float32, one request at a time), model: "
        f"{args.model or 'tiny random Qwen2.5-VL'} | seed {args.seed} | {count} questions, "
        f"{args.width}x{args.height} JPEG each, max_tokens {args.max_tokens}, greedy | bot: server backend, "
        f"max_in_flight {args.max_in_flight}, edit interval 1.0 s | median of {args.rounds} rounds"
    )
    rows = []
    for mode in MODES:
        sequential = wall[mode.split(",")[0] + ", one after other"]
        rows.append(
            (
                mode,
                wall[mode],
                min(timings[mode]),
                max(timings[mode]),
                wall[mode] / count * 1e3,
                wall[mode] / sequential,
            )
        )
    print_table(
        f"Answering {count} questions (wall s)",
        ["mode", "median s", "min s", "max s", "ms/question", "ratio vs one after other"],
        rows,
    )
    print(f"\ncompletion tokens per direct answer: {sorted(set(tokens))}")
    print(f"requests the bot sent: {stats.batches}, completed {stats.completed}, failed {stats.failed}")
    print(
        f"together / one after other: Discord {discord_ratio:.2f}, direct {direct_ratio:.2f} "
        f"(transformers serve is serial; vLLM/SGLang batch concurrent requests, ratio well below 1)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_bench_args(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-in-flight", type=int, default=8, help="server.max_in_flight of the bot")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    run_against_inference_server(parser.parse_args(), "server-concurrency", run)


if __name__ == "__main__":
    main()
