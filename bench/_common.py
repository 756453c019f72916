"""Shared helpers of the throughput and latency benchmarks: model, settings, images, loopback server, tables.

Importing this module puts the repository root on `sys.path`, so `python bench/<name>.py` finds the `bot`
package from a plain checkout (no install needed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import random
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bot.settings import Settings, parse_settings  # noqa: E402  (needs the path above)

if TYPE_CHECKING:
    import openai

    from tests.discord.harness import RunningBot
    from tests.fakediscord.server import FakeDiscord, FakeUser
    from tests.inference.server import InferenceServer

LOOPBACK_HOST = "127.0.0.1"
QUESTIONS = (
    "What is on the left side of the picture?",
    "Describe this image in one sentence.",
    "What colour is the sky?",
    "How many people are in the photo?",
    "Can you read the text on the sign?",
    "Where was this taken?",
    "Is this food healthy?",
    "Please summarise the chart.",
)


def question(index: int) -> str:
    """The benchmarks' questions, in turn."""
    return QUESTIONS[index % len(QUESTIONS)]


# -- arguments, torch and the model ----------------------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--device`, `--threads` and `--seed`, shared by every model benchmark."""
    parser.add_argument(
        "--model", type=Path, default=None, help="a Qwen2.5-VL checkpoint directory (default: the tiny model)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)


def configure_torch(args: argparse.Namespace) -> str:
    """Seed Python, NumPy and torch, apply `--threads`; return a one-line description of the set-up."""
    import torch

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = f"{torch.get_num_threads()} CPU threads"
    where = (
        f"cuda ({torch.cuda.get_device_name()}), {threads}" if args.device == "cuda" else f"cpu, {threads}"
    )
    model = args.model or "tiny random Qwen2.5-VL"
    return f"model: {model} | device: {where} | torch {torch.__version__} | seed {args.seed}"


@contextlib.contextmanager
def model_directory(args: argparse.Namespace) -> Iterator[Path]:
    """`--model` when given, else the tiny random model built into a temporary directory (removed after)."""
    if args.model is not None:
        yield args.model
        return
    from bot.engine.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-tiny-model-") as folder:
        yield build_tiny_model(Path(folder), seed=args.seed)


def bench_settings(model_dir: Path, device: str, **sections: Mapping[str, Any]) -> Settings:
    """Validated settings for `model_dir` on `device`; `sections` override whole keys per section."""
    model: dict[str, Any] = {
        "name_or_path": str(model_dir),
        "device_map": device,
        "dtype": "float32" if device == "cpu" else "auto",
        "local_files_only": True,
    }
    data: dict[str, dict[str, Any]] = {"model": model}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_settings(data)


# -- images ----------------------------------------------------------------------------------------------


def photo_pixels(width: int, height: int, *, seed: int, noise: float = 30.0) -> np.ndarray:
    """A photo-like RGB array: smooth colour gradients plus sensor-like noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    channels = [
        127 + 100 * np.sin(x / width * (2 + c) * np.pi + phase[c]) * np.cos(y / height * (1 + c) * np.pi)
        for c in range(3)
    ]
    base = np.stack(channels, axis=-1)
    return np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray, *, quality: int = 90) -> bytes:
    """`pixels` (H×W×3 uint8) encoded as a baseline JPEG."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def write_photo(path: Path, width: int, height: int, *, seed: int, quality: int = 90) -> Path:
    """A photo-like JPEG file at `path`."""
    path.write_bytes(jpeg_bytes(photo_pixels(width, height, seed=seed), quality=quality))
    return path


def distinct_photos(count: int, width: int, height: int, *, seed: int, quality: int = 92) -> list[bytes]:
    """`count` different photo-like JPEGs of one size (shifted copies of one picture, so they cost alike)."""
    base = photo_pixels(width, height, seed=seed)
    return [jpeg_bytes(np.roll(base, 7 * index, axis=1), quality=quality) for index in range(count)]


# -- a loopback HTTP server --------------------------------------------------------------------------------


class LoopbackImageServer:
    """Serves in-memory files at `http://127.0.0.1:<port>/<name>` from its own thread and event loop.

    Running apart from the caller's loop, the server's work is not charged to the code being timed there
    (it still shares the CPU).
    """

    def __init__(self, files: Mapping[str, bytes]) -> None:
        self._files = dict(files)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loopback-server", daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def url(self, name: str) -> str:
        """The URL of file `name`."""
        return f"http://{LOOPBACK_HOST}:{self.port}/{name}"

    def __enter__(self) -> LoopbackImageServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _serve(self, request: web.Request) -> web.Response:
        data = self._files.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="image/jpeg")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{name}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((LOOPBACK_HOST, 0))  # port 0: the OS picks a free one
        self.port = listener.getsockname()[1]
        await web.SockSite(self._runner, listener).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


# -- the server backend: `transformers serve`, the bot on the loopback Discord, direct requests ------------


def add_server_bench_args(parser: argparse.ArgumentParser) -> None:
    """`--model` and `--seed` of the server benchmarks (`transformers serve` runs the model, on the CPU)."""
    parser.add_argument(
        "--model", type=Path, default=None, help="a Qwen2.5-VL checkpoint directory (default: the tiny model)"
    )
    parser.add_argument("--seed", type=int, default=0)


def run_against_inference_server(
    args: argparse.Namespace, name: str, run: Callable[[argparse.Namespace, Path, Any, Path], Awaitable[None]]
) -> None:
    """Seed, start `transformers serve` on the model of `args`, and `run(args, model_dir, server, folder)`
    in a temporary folder; everything is stopped and removed after, even on Ctrl-C."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as folder, model_directory(args) as model_dir:
        print("starting transformers serve ...", flush=True)
        with inference_server(model_dir, Path(folder, "server.log")) as server:
            asyncio.run(run(args, model_dir, server, Path(folder)))


def write_photos(folder: Path, photos: Sequence[bytes]) -> list[Path]:
    """Each JPEG of `photos` as `folder/photo-N.jpg`."""
    paths = [folder / f"photo-{index}.jpg" for index in range(len(photos))]
    for path, data in zip(paths, photos, strict=True):
        path.write_bytes(data)
    return paths


def attach_photos(fake: FakeDiscord, photos: Sequence[bytes]) -> list[dict[str, Any]]:
    """Each JPEG of `photos` served by the loopback CDN, as a Discord attachment payload."""
    attachments = []
    for index, data in enumerate(photos):
        url = fake.add_file(f"photo-{index}.jpg", data, "image/jpeg")
        attachments.append(fake.attachment(url, f"photo-{index}.jpg", len(data), "image/jpeg"))
    return attachments


@contextlib.contextmanager
def inference_server(model_dir: Path, log_path: Path) -> Iterator[InferenceServer]:
    """`transformers serve` on `model_dir` (tests/inference/server.py), stopped on leaving, even on Ctrl-C.

    Ctrl-C during the start-up wait is held back until the process handle exists, so the server (in its own
    session, out of the terminal's reach) is always stopped.
    """
    from tests.inference.server import start_inference_server

    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        server = start_inference_server(model_dir, log_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        if interrupted:
            raise KeyboardInterrupt
        yield server
    finally:
        server.stop()


def _with_loopback(fake: FakeDiscord, sections: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """`sections` added to the settings every bot behind the loopback Discord takes: Discord and the CDN on
    loopback, the minimum edit interval, no per-user limits (one benchmark user asks everything)."""
    from tests.discord.harness import UNLIMITED

    data: dict[str, dict[str, Any]] = {
        "discord": {"api_base_url": fake.api_base_url, "stream_edit_interval_seconds": 1.0},
        "media": {"allowed_hosts": [LOOPBACK_HOST], "retries": 0},
        "limits": dict(UNLIMITED),
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def local_bot_settings(
    model_dir: Path,
    device: str,
    data_dir: Path,
    fake: FakeDiscord,
    *,
    max_new_tokens: int,
    **sections: Mapping[str, Any],
) -> Settings:
    """The in-process engine on `model_dir` behind the loopback Discord: small images, greedy answers of
    `max_new_tokens`, storage in `data_dir`; `sections` add to each section."""
    base = {
        "vision": {"min_pixels": 4 * 28 * 28, "max_pixels": 64 * 28 * 28},
        "generation": {"max_new_tokens": max_new_tokens, "do_sample": False},
        "storage": {"data_dir": str(data_dir)},
    }
    return bench_settings(model_dir, device, **_with_loopback(fake, {**base, **sections}))


def server_bot_settings(
    model_dir: Path,
    data_dir: Path,
    fake: FakeDiscord,
    inference: InferenceServer,
    **sections: Mapping[str, Any],
) -> Settings:
    """The tests' tiny settings (tests/tiny_settings.py) on the server backend, straight to `inference`
    (no proxy), behind the loopback Discord; `sections` add to each section."""
    from tests.tiny_settings import tiny_settings

    base = {
        "engine": {"backend": "server"},
        "server": {"base_url": inference.base_url, "model": inference.model},
    }
    merged = {name: {**base.get(name, {}), **values} for name, values in sections.items()}
    return tiny_settings(model_dir, data_dir, **_with_loopback(fake, {**base, **merged}))


@contextlib.asynccontextmanager
async def discord_bot(
    settings_for: Any, channel_names: Sequence[str]
) -> AsyncIterator[tuple[FakeDiscord, RunningBot, FakeUser, list[int]]]:
    """The loopback Discord (a guild with `channel_names`, a user) and the real bot running against it;
    `settings_for(fake)` gives the bot's settings. Yields (fake, bot, user, channel ids); both stop after.

    The harness records every log line at DEBUG (for the tests' token checks); here the root logger goes back
    to INFO, as a deployed bot logs, so formatting debug lines is not charged to the bot.
    """
    from tests.discord.harness import TOKEN, RunningBot
    from tests.fakediscord.server import FakeDiscord

    fake = FakeDiscord(token=TOKEN)
    _guild_id, channel_ids, _roles = fake.add_guild("bench", list(channel_names))
    user = fake.add_user("alice")
    await fake.start()
    try:
        bot = RunningBot(settings_for(fake), fake)
        await bot.start()
        try:
            logging.getLogger().setLevel(logging.INFO)
            yield fake, bot, user, channel_ids
        finally:
            await bot.stop()
    finally:
        await fake.close()


def shows_answer_text(message: Mapping[str, Any]) -> bool:
    """Whether a bot message shows answer text (not empty, not a queue or "answering now" placeholder)."""
    from bot.discord.replies import ANSWERING_NOW

    content = str(message.get("content") or "").strip()
    return bool(content) and not content.startswith("⏳") and content != ANSWERING_NOW


async def ask_on_discord(
    fake: FakeDiscord,
    bot: RunningBot,
    user: FakeUser,
    channel_id: int,
    text: str,
    attachments: list[dict[str, Any]] | None = None,
    *,
    timeout: float = 120.0,
) -> tuple[float, float]:
    """`user` mentions the bot in `channel_id`; seconds from sending to the first bot message showing answer
    text there, and to the final answer (the reply linked to the stored answer: `RunningBot.wait_reply`)."""
    after = len(bot.replies)
    started = time.perf_counter()

    async def first_text() -> float:
        await fake.wait_for_message(channel_id, shows_answer_text, timeout=timeout)
        return time.perf_counter() - started

    async def final() -> float:
        await bot.wait_reply(channel_id, after=after, timeout=timeout)
        return time.perf_counter() - started

    waiting = asyncio.gather(first_text(), final())
    try:
        await fake.send_message(channel_id, user, f"{fake.bot.mention} {text}", attachments=attachments)
        first, last = await waiting
    except BaseException:
        waiting.cancel()
        raise
    return first, last


async def stream_direct(client: openai.AsyncOpenAI, body: Mapping[str, Any]) -> tuple[float, float, int]:
    """One streamed chat completion: seconds to the first piece of text and to the end of the stream, and
    the completion tokens the server reports (0 when it reports none)."""
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    stream = await client.chat.completions.create(**body)
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    end = time.perf_counter() - started
    return (end if first is None else first), end, tokens


def chat_body(model: str, messages: list[dict[str, object]], max_tokens: int) -> dict[str, Any]:
    """The chat-completion request the server backend sends for greedy answers of at most `max_tokens`
    (`ServerEngine._request_body` with `do_sample = false`)."""
    return {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }


def replace_images(messages: list[dict], images: Sequence[Path], question: str | None = None) -> list[dict]:
    """A copy of Qwen `messages` with the newest message's images swapped for `images` (in order) and,
    when given, its text for `question`."""
    result = [dict(message) for message in messages]
    newest = dict(result[-1])
    pending = iter(images)
    parts = []
    for part in newest["content"]:
        part = dict(part)
        if part.get("type") == "image":
            part["image"] = str(next(pending))
        elif part.get("type") == "text" and question is not None:
            part["text"] = question
        parts.append(part)
    newest["content"] = parts
    result[-1] = newest
    return result


# -- statistics and tables -------------------------------------------------------------------------------


def median_ms(seconds: Sequence[float]) -> float:
    """The median of `seconds`, in milliseconds."""
    return statistics.median(seconds) * 1e3


def p90_ms(seconds: Sequence[float]) -> float:
    """The 90th percentile of `seconds`, in milliseconds (the maximum for fewer than 2 values)."""
    if len(seconds) < 2:
        return max(seconds) * 1e3
    return statistics.quantiles(seconds, n=10)[-1] * 1e3


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain-text table: the first column left-aligned, the others right-aligned; floats to 2 dp."""

    def cell(value: object) -> str:
        return f"{value:,.2f}" if isinstance(value, float) else str(value)

    cells = [[cell(value) for value in row] for row in rows]
    widths = [max(len(str(header)), *(len(row[i]) for row in cells)) for i, header in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        first, *rest = values
        aligned = (value.rjust(width) for value, width in zip(rest, widths[1:], strict=True))
        return "  ".join([first.ljust(widths[0]), *aligned])

    print()
    print(title)
    print(line([str(header) for header in headers]))
    print("  ".join("-" * width for width in widths))
    for row in cells:
        print(line(row))
