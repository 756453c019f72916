"""Benchmark: one long answer through the loopback Discord vs bare `generate` of the same answer by the seed.

What a user of the in-process engine feels for one question. The real bot (discord.py client, answering
service, `InferenceEngine` on the tiny random Qwen2.5-VL) answers a user in the loopback Discord
(tests/fakediscord); the question carries a photo-like JPEG that the bot downloads from the loopback CDN.
Timed from the user's message sent to the first bot message showing answer text, and to the final answer
(the reply linked to the stored answer). Alternating with it, the reference notebook's steps (template,
vision info, processor, `generate`, trim, decode) answer the same question with the same pixel limits and
greedy options on a second copy of the model: the bare `generate` the bot's answer is measured against.

The ratio final answer / bare seed is the goal of issue 11 (<= 1.3): everything the bot adds around the model
(download, checks, store, the worker thread, streaming, Discord edits) must stay small next to generation.
Intermediate edits are spaced by `discord.stream_edit_interval_seconds` (1.0 s, the minimum); the final text
goes out when the answer ends. Both paths must produce the same number of new tokens, which is printed.

    python bench/bench_final_text.py [--max-new-tokens 1024] [--rounds 3] [--model DIR --device cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_model_args,
    ask_on_discord,
    configure_torch,
    discord_bot,
    local_bot_settings,
    model_directory,
    print_table,
    write_photo,
)
from qwen_vl_utils import process_vision_info
from tqdm import tqdm

from bot.engine.loader import LoadedModel, load_model
from bot.settings import Settings

QUESTION = "Describe everything you can see in this picture, in as much detail as you can."


def seed_answer(loaded: LoadedModel, image: Path, settings: Settings) -> tuple[float, int]:
    """The reference notebook's steps for the question; seconds and new tokens (EOS excluded)."""
    model, processor = loaded.model, loaded.processor
    vision = settings.vision
    messages = [
        {"role": "system", "content": settings.generation.system_prompt},
        {
            "role": "user",
            "content": [
                {
                    "type": "image",
                    "image": str(image),
                    "min_pixels": vision.min_pixels,
                    "max_pixels": vision.max_pixels,
                },
                {"type": "text", "text": QUESTION},
            ],
        },
    ]
    started = time.perf_counter()
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_inputs, video_inputs = process_vision_info(messages)
    inputs = processor(
        text=[text], images=image_inputs, videos=video_inputs, padding=True, return_tensors="pt"
    ).to(model.device)
    with torch.inference_mode():
        generated = model.generate(**inputs, **settings.generation.generate_kwargs())
    trimmed = generated[0][inputs.input_ids.shape[1] :]
    processor.batch_decode([trimmed], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    elapsed = time.perf_counter() - started
    eos = model.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos)
    ids = trimmed.tolist()
    return elapsed, next((index for index, token in enumerate(ids) if token in eos_ids), len(ids))


async def run(args: argparse.Namespace) -> None:
    setup = configure_torch(args)
    with model_directory(args) as model_dir, tempfile.TemporaryDirectory(prefix="bench-final-") as folder:
        image = write_photo(Path(folder) / "photo.jpg", args.width, args.height, seed=args.seed)
        data = image.read_bytes()

        def settings_for(fake: Any) -> Settings:
            return local_bot_settings(
                model_dir,
                args.device,
                Path(folder) / "bot-data",
                fake,
                max_new_tokens=args.max_new_tokens,
                engine={"vision_cache_mb": 0},
            )

        timings: dict[str, list[float]] = {"seed": [], "first": [], "final": []}
        tokens: dict[str, int] = {}
        channel_names = [f"round-{index}" for index in range(args.rounds + 1)]
        async with discord_bot(settings_for, channel_names) as (fake, bot, user, channels):
            loaded = load_model(bot.settings.model)
            url = fake.add_file("photo.jpg", data, "image/jpeg")
            attachment = fake.attachment(url, "photo.jpg", len(data), "image/jpeg")
            for index in tqdm(range(args.rounds + 1), desc="rounds (first is warm-up)", unit="round"):
                order = ("seed", "discord") if index % 2 == 0 else ("discord", "seed")
                for path in order:
                    if path == "seed":
                        elapsed, tokens["seed"] = await asyncio.to_thread(
                            seed_answer, loaded, image, bot.settings
                        )
                        if index:
                            timings["seed"].append(elapsed)
                        continue
                    first, final = await ask_on_discord(
                        fake, bot, user, channels[index], QUESTION, [attachment]
                    )
                    tokens["discord"] = answered_tokens(bot.log.lines)
                    if index:
                        timings["first"].append(first)
                        timings["final"].append(final)

    seed = statistics.median(timings["seed"])
    first, final = statistics.median(timings["first"]), statistics.median(timings["final"])
    print(f"\n{setup}")
    print(
        f"one question with a {args.width}x{args.height} JPEG, greedy, max_new_tokens {args.max_new_tokens}; "
        f"median of {args.rounds} rounds after a warm-up, paths alternating"
    )
    print_table(
        "One answer (seconds)",
        ["path", "median s", "ratio vs bare seed"],
        [
            ("seed: bare generate (template → generate → decode)", seed, 1.0),
            ("Discord: first visible text", first, first / seed),
            ("Discord: final answer", final, final / seed),
        ],
    )
    print(f"\nnew tokens: seed {tokens['seed']}, bot {tokens['discord']}")
    print(f"final answer / bare seed: {final / seed:.2f} (goal <= 1.3)")


def answered_tokens(log_lines: list[str]) -> int:
    """New tokens of the bot's last answer, from the answering service's log line about it."""
    line = next(line for line in reversed(log_lines) if "answered in" in line)
    found = re.search(r"(\d+) new tokens", line)
    assert found is not None, line
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
