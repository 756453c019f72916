"""Settings for tests that run the whole service: the tiny model on CPU, greedy and short, small images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bot.settings import Settings, parse_settings


def tiny_settings(model_dir: Path, data_dir: Path, **sections: dict[str, Any]) -> Settings:
    """The tiny model at `model_dir`, storage in `data_dir`; each keyword adds to (or overrides) a section."""
    document: dict[str, dict[str, Any]] = {
        "model": {
            "name_or_path": str(model_dir),
            "device_map": "cpu",
            "dtype": "float32",
            "local_files_only": True,
        },
        "vision": {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28, "max_images_per_message": 2},
        "generation": {"max_new_tokens": 6, "do_sample": False},
        "storage": {"data_dir": str(data_dir)},
        "engine": {"batch_wait_ms": 1.0},
    }
    for name, values in sections.items():
        document[name] = {**document.get(name, {}), **values}
    return parse_settings(document)
