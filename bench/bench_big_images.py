"""Benchmark: peak memory of big images through the whole service, this code vs an earlier commit.

Each measurement runs in a fresh process: `running_service` (SQLite store, media fetcher, the tiny model or
`--model`) answers one warm-up question with a small image, then the scenario's questions, all at once, each
with its images as local files (validated, stored, decoded and resized for the model). The figures are that
process's peak resident memory over the scenario minus its memory before it (Linux's VmHWM, reset through
/proc/self/clear_refs after the warm-up), and what is still resident once the answers are in. The earlier
code (`--before`, by default the last commit before bounded image memory) runs from `git archive` in a
temporary directory, alternating with this checkout, so both see the same machine state.

    scenarios  png     one 7900x7900 PNG (about 200 KB: just under media.max_pixels, 64 megapixels)
               3x4     three conversations at once, each asking about four such PNGs
               jpeg    one 7900x7900 JPEG

    python bench/bench_big_images.py [--runs 3] [--before REV] [--scenarios png 3x4 jpeg] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import REPO_ROOT, add_model_args, bench_settings, model_directory, print_table
from PIL import Image

BEFORE = "afeb2cf"  # main before bounded image memory
SIDE = 7900
SCENARIOS = {"png": (1, 1, "png"), "3x4": (3, 4, "png"), "jpeg": (1, 1, "jpeg")}  # conversations, images
MB = 1024 * 1024

# Runs in the child process, with `bot` importable from the code under test only.
CHILD = r"""
import asyncio, gc, json, sys
from pathlib import Path

from bot.answering import Question
from bot.app import running_service
from bot.content import ConversationScope
from bot.settings import parse_settings


def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


async def main(settings, warm_up, conversations):
    async with running_service(settings) as service:
        scope = ConversationScope("discord", guild_id=1, channel_id=1)
        await service.answer(Question(scope=scope, text="warm up", local_files=(Path(warm_up),)))
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
        before = status("VmRSS")
        await asyncio.gather(*(
            service.answer(Question(
                scope=ConversationScope("discord", guild_id=1, channel_id=100 + index),
                text="What is in these pictures?",
                local_files=tuple(Path(path) for path in paths),
            ))
            for index, paths in enumerate(conversations)
        ))
        gc.collect()
        print(json.dumps({"peak": status("VmHWM") - before, "after": status("VmRSS") - before}))


settings, warm_up, conversations = json.loads(sys.argv[1])
asyncio.run(main(parse_settings(settings), warm_up, conversations))
"""


def write_images(folder: Path, count: int) -> tuple[list[Path], Path, Path]:
    """`count` distinct 7900x7900 PNGs (smooth gradients compress to ~200 KB), one such JPEG, a small JPEG."""
    ramp = np.linspace(0, 255, SIDE, dtype=np.float32)
    pngs = []
    for index in range(count):
        pixels = np.empty((SIDE, SIDE, 3), dtype=np.uint8)
        pixels[..., 0] = ramp[None, :].astype(np.uint8)
        pixels[..., 1] = ramp[:, None].astype(np.uint8)
        pixels[..., 2] = 20 * index  # a different file each: the store keeps one copy per content
        path = folder / f"big-{index}.png"
        Image.fromarray(pixels).save(path, compress_level=6)
        pngs.append(path)
        if index == 0:
            jpeg = folder / "big.jpg"
            Image.fromarray(pixels).save(jpeg, quality=90)
        del pixels
    small = folder / "small.jpg"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(small)
    return pngs, jpeg, small


def code_of(revision: str, folder: Path) -> Path:
    """The `bot` and `migrations` packages of `revision`, extracted under `folder`."""
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", revision, "bot", "migrations"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def measure(code: Path, settings: dict, warm_up: Path, conversations: list[list[str]]) -> dict[str, int]:
    """Peak and remaining memory growth (bytes) of one scenario, in a fresh process running `code`."""
    environment = {**os.environ, "PYTHONPATH": str(code), "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([settings, str(warm_up), conversations])],
        env=environment,
        cwd=code,
        capture_output=True,
        text=True,
    )
    if completed.returncode != 0:
        raise SystemExit(f"the measurement failed in {code}:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _model_keys(model_dir: Path, device: str) -> dict[str, object]:
    settings = bench_settings(model_dir, device)
    return settings.model.model_dump(mode="json", exclude_defaults=True)


def span(values: list[float], unit: str = "") -> str:
    low, high = min(values), max(values)
    return f"{low:.0f}{unit}" if round(low) == round(high) else f"{low:.0f}–{high:.0f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--before", default=BEFORE, help=f"the earlier commit to compare with ({BEFORE})")
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS))
    args = parser.parse_args()

    with model_directory(args) as model_dir, tempfile.TemporaryDirectory(prefix="bench-big-") as scratch:
        folder = Path(scratch)
        most = max(conversations * images for conversations, images, _ in SCENARIOS.values())
        pngs, jpeg, small = write_images(folder, most)
        (folder / "before").mkdir()
        codes = {"before": code_of(args.before, folder / "before"), "now": REPO_ROOT}
        results: dict[tuple[str, str], list[dict[str, int]]] = {}
        for run in range(args.runs):
            for name in args.scenarios:
                conversations, images, kind = SCENARIOS[name]
                files = [jpeg] if kind == "jpeg" else pngs
                asked = [
                    [str(files[(c * images + i) % len(files)]) for i in range(images)]
                    for c in range(conversations)
                ]
                for label, code in codes.items():
                    # Only keys both versions know: each validates the settings with its own schema.
                    settings = {
                        "model": _model_keys(model_dir, args.device),
                        "storage": {"data_dir": str(folder / f"data-{label}-{name}-{run}")},
                        "generation": {"max_new_tokens": 4},
                    }
                    figures = measure(code, settings, small, asked)
                    results.setdefault((name, label), []).append(figures)
                    print(f"run {run + 1} {name} {label}: {figures['peak'] / MB:.0f} MiB peak", flush=True)

    rows = []
    for name in args.scenarios:
        before, now = results[(name, "before")], results[(name, "now")]
        ratios = [n["peak"] / b["peak"] for b, n in zip(before, now, strict=True)]
        rows.append(
            [
                name,
                span([r["peak"] / MB for r in before], " MiB"),
                span([r["peak"] / MB for r in now], " MiB"),
                f"{min(ratios):.2f}–{max(ratios):.2f}",
                span([r["after"] / MB for r in before], " MiB"),
                span([r["after"] / MB for r in now], " MiB"),
            ]
        )
    print_table(
        f"Peak memory growth while answering, {args.runs} runs (before = {args.before})",
        ["scenario", "peak before", "peak now", "now/before", "held after, before", "held after, now"],
        rows,
    )


if __name__ == "__main__":
    main()
