"""Finding the model's files and the size of its weights without loading them (and without torch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bot.engine.model_files import locate_model_files
from bot.errors import ModelLoadError
from bot.settings import ModelSettings


def test_a_local_directory_counts_its_safetensors(tiny_model_dir: Path) -> None:
    files = locate_model_files(ModelSettings(name_or_path=str(tiny_model_dir)))
    assert files.where == f"directory {tiny_model_dir}"
    assert files.weights_bytes == (tiny_model_dir / "model.safetensors").stat().st_size


def test_sharded_weights_count_every_shard_and_a_missing_one_is_named(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    (model / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 1000)
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    size = (tiny_model_dir / "model.safetensors").stat().st_size

    assert locate_model_files(ModelSettings(name_or_path=str(model))).weights_bytes == size + 1000
    (model / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"lacks weight files .* model-00002-of-00002\.safetensors"):
        locate_model_files(ModelSettings(name_or_path=str(model)))


def test_a_directory_without_config_or_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"holds no config\.json"):
        locate_model_files(ModelSettings(name_or_path=str(tmp_path)))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"holds no \*.safetensors weights"):
        locate_model_files(ModelSettings(name_or_path=str(tmp_path)))


def test_an_uncached_repo_with_local_files_only_is_refused(tmp_path: Path) -> None:
    settings = ModelSettings(
        name_or_path="nobody/no-such-model", cache_dir=str(tmp_path), local_files_only=True
    )
    with pytest.raises(ModelLoadError, match=r"not in model.cache_dir .* forbids downloading it"):
        locate_model_files(settings)
