"""Small deterministic media files for engine tests."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image


def write_png(path: Path, width: int, height: int, *, seed: int = 0) -> Path:
    """A random-noise RGB PNG of the given size."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_mp4(path: Path, *, frames: int = 8, size: int = 64, fps: int = 4, seed: int = 0) -> Path:
    """A short random-noise H.264 MP4."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path
