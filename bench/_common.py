"""Shared helpers of the throughput and latency benchmarks: model, settings, images, loopback server, tables.

Importing this module puts the repository root on `sys.path`, so `python bench/<name>.py` finds the `bot`
package from a plain checkout (no install needed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import random
import socket
import statistics
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bot.settings import Settings, parse_settings  # noqa: E402  (needs the path above)

LOOPBACK_HOST = "127.0.0.1"


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
