"""Benchmark: questions that arrive while the in-process engine answers join its running batch.

What users feel when several channels ask at about the same time. The real bot (discord.py client, answering
service, `InferenceEngine` on the tiny random Qwen2.5-VL) answers a user in the loopback Discord
(tests/fakediscord) with two engine settings in turn: `engine.join_interval_steps` as given (late questions
join the running batch) and 0 (they wait for it to end); the bench switches the running engine's setting
between scenarios, as discord.py allows one API base per process. In every round, alternating the order:

- burst:      8 questions in 8 channels, sent at once (they reach the engine within a fraction of a second,
              after each photo's download and checks);
- staggered:  8 questions in 8 channels, one every 300 ms;
- one by one: the 8 questions one after another, each sent when the previous answer is final (with one
              question at a time there is nothing to join).

Every question carries its own photo-like JPEG, new in every round; both engines get the same pixels in
files that differ by a JPEG comment, so the vision cache never carries over and their answers compare.
Per question: seconds from its message to the first bot message showing answer text, and to the final
answer; per scenario their mean and worst, and "all done": from the first message to the last final answer,
as a ratio to one by one (goal for the burst: <= 0.30). Alongside, the floor the burst can reach: bare
`Pipeline.run_batch` on a second copy of the model, no Discord, the one-by-one questions all at once vs one
after another. Medians over the rounds after a warm-up. The greedy answers with and without joins must be
equal, which is printed.

    python bench/bench_joins.py [--rounds 3] [--max-new-tokens 256] [--gap-ms 300] [--model DIR --device cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    add_model_args,
    ask_on_discord,
    configure_torch,
    discord_bot,
    distinct_photos,
    local_bot_settings,
    model_directory,
    print_table,
    question,
)
from tqdm import tqdm

from bot.engine.loader import load_model
from bot.engine.pipeline import Pipeline, PipelineRequest
from bot.settings import EngineSettings, Settings

QUESTIONS = 8
SCENARIOS = ("burst", "staggered")
ENGINES = ("joins", "no joins")


def with_comment(jpeg: bytes, comment: bytes) -> bytes:
    """`jpeg` with a comment segment after its start marker: the same pixels in a file with another digest."""
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


@dataclass
class Timings:
    """One scenario, per round: each question's (first text, final answer) seconds and the whole span."""

    questions: list[list[tuple[float, float]]] = field(default_factory=list)
    all_done: list[float] = field(default_factory=list)

    def median_of(self, pick: Callable[[list[tuple[float, float]]], float]) -> float:
        """The median over the rounds of `pick(one round's per-question timings)`."""
        return statistics.median(pick(per_question) for per_question in self.questions)


@dataclass
class Loopback:
    """The running bot, its loopback Discord and user, and the channels not used yet."""

    fake: Any
    bot: Any
    user: Any
    channels: list[int]

    def set_join_interval(self, steps: int) -> None:
        """Switch the running engine's `join_interval_steps` (read at the start of every batch)."""
        engine = self.bot.service._engine
        engine._limits = engine._limits.model_copy(update={"join_interval_steps": steps})

    async def ask_all(
        self, photos: Sequence[bytes], gap: float | None
    ) -> tuple[list[tuple[float, float]], float, list[str]]:
        """Ask the benchmark's questions, each with its photo in a new channel, `gap` seconds apart (None:
        each after the previous final answer): each one's timings, the span from the first message to the
        last final answer, and the answers."""
        channels, self.channels = self.channels[: len(photos)], self.channels[len(photos) :]
        attachments = []
        for channel, data in zip(channels, photos, strict=True):
            url = self.fake.add_file(f"photo-{channel}.jpg", data, "image/jpeg")
            attachments.append(self.fake.attachment(url, f"photo-{channel}.jpg", len(data), "image/jpeg"))
        started = time.perf_counter()

        async def one(index: int) -> tuple[float, float]:
            if gap is not None:
                await asyncio.sleep(index * gap)
            text = question(index)
            return await ask_on_discord(
                self.fake, self.bot, self.user, channels[index], text, [attachments[index]]
            )

        if gap is None:
            timings = [await one(index) for index in range(len(photos))]
        else:
            timings = list(await asyncio.gather(*(one(index) for index in range(len(photos)))))
        span = time.perf_counter() - started
        answers = {
            self.fake.messages[message_id]["channel_id"]: answer.text
            for answer, message_id in self.bot.replies
        }
        return timings, span, [answers[str(channel)] for channel in channels]


def bare_generate(pipeline: Pipeline, settings: Settings, images: Sequence[Path]) -> tuple[float, float]:
    """Seconds for bare `run_batch` to answer the questions about `images` all at once, and one by one."""
    requests = [
        PipelineRequest(
            [
                {"role": "system", "content": settings.generation.system_prompt},
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": str(image)},
                        {"type": "text", "text": question(n)},
                    ],
                },
            ],
            settings.generation.generate_kwargs(),
        )
        for n, image in enumerate(images)
    ]
    started = time.perf_counter()
    pipeline.run_batch(requests)
    batched = time.perf_counter() - started
    started = time.perf_counter()
    for request in requests:
        pipeline.run_batch([request])
    return batched, time.perf_counter() - started


async def run(args: argparse.Namespace) -> None:
    setup = configure_torch(args)
    rounds = args.rounds + 1
    photos = iter(
        distinct_photos(rounds * (len(SCENARIOS) + 1) * QUESTIONS, args.width, args.height, seed=args.seed)
    )
    channel_names = [f"c{index}" for index in range(rounds * (len(ENGINES) * len(SCENARIOS) + 1) * QUESTIONS)]
    timings = {(engine, scenario): Timings() for engine in ENGINES for scenario in SCENARIOS}
    one_by_one = Timings()
    bare: list[tuple[float, float]] = []
    same_answers = True
    with model_directory(args) as model_dir, tempfile.TemporaryDirectory(prefix="bench-joins-") as folder:

        def settings_for(fake: Any) -> Settings:
            return local_bot_settings(
                model_dir,
                args.device,
                Path(folder) / "bot-data",
                fake,
                max_new_tokens=args.max_new_tokens,
                engine={"max_batch_size": QUESTIONS},
            )

        async with discord_bot(settings_for, channel_names) as (fake, bot, user, channels):
            loopback = Loopback(fake, bot, user, channels)
            vision = bot.settings.vision
            loaded = load_model(bot.settings.model)
            pipeline = Pipeline(
                loaded.model, loaded.processor, min_pixels=vision.min_pixels, max_pixels=vision.max_pixels
            )
            steps = {"joins": args.join_interval_steps, "no joins": 0}
            for round_index in tqdm(range(args.rounds + 1), desc="rounds (first is warm-up)", unit="round"):
                order = ENGINES if round_index % 2 == 0 else ENGINES[::-1]
                for scenario in SCENARIOS:
                    gap = 0.0 if scenario == "burst" else args.gap_ms / 1000
                    batch = [next(photos) for _ in range(QUESTIONS)]
                    answers = {}
                    for engine in order:
                        loopback.set_join_interval(steps[engine])
                        variants = [with_comment(photo, engine.encode()) for photo in batch]
                        per_question, span, answers[engine] = await loopback.ask_all(variants, gap)
                        if round_index:
                            timings[(engine, scenario)].questions.append(per_question)
                            timings[(engine, scenario)].all_done.append(span)
                    same_answers = same_answers and answers["joins"] == answers["no joins"]
                batch = [next(photos) for _ in range(QUESTIONS)]
                per_question, span, _ = await loopback.ask_all(batch, None)
                images = [Path(folder, f"bare-{round_index}-{n}.jpg") for n in range(QUESTIONS)]
                for image, data in zip(images, batch, strict=True):
                    image.write_bytes(data)
                floor = await asyncio.to_thread(bare_generate, pipeline, bot.settings, images)
                if round_index:
                    one_by_one.questions.append(per_question)
                    one_by_one.all_done.append(span)
                    bare.append(floor)
            batch_sizes = dict(sorted(bot.service._engine.stats.batch_sizes.items()))

    sequential = statistics.median(one_by_one.all_done)
    rows = [row("one by one", one_by_one, sequential)]
    rows += [
        row(f"{scenario}, {engine}", timings[(engine, scenario)], sequential)
        for scenario in SCENARIOS
        for engine in ENGINES[::-1]
    ]
    print(f"\n{setup}")
    print(
        f"{QUESTIONS} questions in {QUESTIONS} channels, a {args.width}x{args.height} JPEG each, greedy, "
        f"max_new_tokens {args.max_new_tokens}; staggered: one every {args.gap_ms:.0f} ms; joins every "
        f"{args.join_interval_steps} decode steps; medians of {args.rounds} rounds after a warm-up"
    )
    print_table(
        "Message in -> first visible text, -> final answer, per question (seconds)",
        [
            "scenario, engine",
            "first mean",
            "first worst",
            "final mean",
            "final worst",
            "all done",
            "/ 1 by 1",
        ],
        rows,
    )
    print(
        f"\nbatch sizes (size: batches; a batch that pauses for newcomers counts at each run): {batch_sizes}"
    )
    print(f"same answers with and without joins: {'yes' if same_answers else 'NO'}")
    burst = statistics.median(timings[("joins", "burst")].all_done) / sequential
    batched, alone = (statistics.median(values) for values in zip(*bare, strict=True))
    print(
        f"bare run_batch, no Discord: all at once {batched:.2f} s vs one by one {alone:.2f} s: "
        f"{batched / alone:.2f} (the floor)"
    )
    print(f"burst / one by one, with joins: {burst:.2f} (goal <= 0.30)")


def row(label: str, timings: Timings, sequential: float) -> tuple[object, ...]:
    """A table row: mean and worst first text and final answer, all done, and its ratio to one by one."""
    all_done = statistics.median(timings.all_done)
    return (
        label,
        timings.median_of(lambda per: statistics.mean(first for first, _ in per)),
        timings.median_of(lambda per: max(first for first, _ in per)),
        timings.median_of(lambda per: statistics.mean(final for _, final in per)),
        timings.median_of(lambda per: max(final for _, final in per)),
        all_done,
        all_done / sequential,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--gap-ms", type=float, default=300.0, help="between staggered questions")
    parser.add_argument(
        "--join-interval-steps",
        type=int,
        default=EngineSettings().join_interval_steps,
        help="engine.join_interval_steps of the engine with joins",
    )
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
