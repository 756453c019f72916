"""Settings for tests that run the whole service: the tiny model on CPU, greedy and short, small images.

`tiny_settings` gives them as a validated `Settings`; `write_tiny_config` writes the same document as a TOML
file, for tests that start the bot the way users do (`python -m bot --config FILE ...`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bot.settings import Settings, parse_settings


def tiny_config(model_dir: Path, data_dir: Path, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
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
    return document


def tiny_settings(model_dir: Path, data_dir: Path, **sections: dict[str, Any]) -> Settings:
    """`tiny_config` validated as `Settings`."""
    return parse_settings(tiny_config(model_dir, data_dir, **sections))


def write_tiny_config(path: Path, model_dir: Path, data_dir: Path, **sections: dict[str, Any]) -> Path:
    """`tiny_config` written to `path` as TOML (values: strings, numbers, booleans, lists of those)."""
    lines: list[str] = []
    for name, values in tiny_config(model_dir, data_dir, **sections).items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path
