"""The loader: every [model] option reaches from_pretrained, and failures are clear ModelLoadErrors."""

from __future__ import annotations

import logging
import shutil
import socket
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch

from bot.engine.loader import load_model, resolve_attn_implementation
from bot.errors import ModelLoadError
from bot.settings import ModelSettings

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(tiny_model_dir: Path, cache_dir: Path, repo_id: str, revision: str) -> None:
    """Lay out `tiny_model_dir` the way the Hugging Face cache stores a downloaded repo."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / revision).write_text(COMMIT)


def test_loads_local_directory_with_options(tiny_model_dir: Path) -> None:
    loaded = load_model(
        ModelSettings(
            name_or_path=str(tiny_model_dir), dtype="bfloat16", device_map="cpu", attn_implementation="eager"
        )
    )

    assert loaded.model.dtype == torch.bfloat16
    assert loaded.model.config._attn_implementation == "eager"
    assert loaded.device == torch.device("cpu")
    assert loaded.model.training is False
    assert loaded.processor.tokenizer.padding_side == "left"


def test_auto_dtype_keeps_checkpoint_dtype_and_auto_attention_is_sdpa_without_flash(
    tiny_model_dir: Path,
) -> None:
    loaded = load_model(ModelSettings(name_or_path=str(tiny_model_dir), device_map=None))

    assert loaded.model.dtype == torch.float32
    expected = "flash_attention_2" if resolve_attn_implementation("auto") == "flash_attention_2" else "sdpa"
    assert loaded.model.config._attn_implementation == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_flash_attention_without_cuda_falls_back_to_sdpa(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="bot.engine.loader"):
        loaded = load_model(
            ModelSettings(name_or_path=str(tiny_model_dir), attn_implementation="flash_attention_2")
        )

    assert loaded.model.config._attn_implementation == "sdpa"
    assert "using sdpa instead" in caplog.text


def test_repo_id_from_cache_dir_offline_with_revision(tiny_model_dir: Path, tmp_path: Path) -> None:
    hub_cache(tiny_model_dir, tmp_path, "tiny/qwen-vl", "v1")
    settings = ModelSettings(
        name_or_path="tiny/qwen-vl",
        revision="v1",
        cache_dir=str(tmp_path),
        local_files_only=True,
        device_map="cpu",
    )

    loaded = load_model(settings)
    assert loaded.model.config.text_config.hidden_size == 64

    with pytest.raises(ModelLoadError, match="local_files_only is set"):
        load_model(settings.model_copy(update={"revision": "v2"}))


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model directory not found") as caught:
        load_model(ModelSettings(name_or_path=str(tmp_path / "nowhere")))
    assert str(tmp_path / "nowhere") in str(caught.value)


def test_uncached_repo_with_local_files_only_is_a_clear_error(tmp_path: Path) -> None:
    settings = ModelSettings(
        name_or_path="nobody/no-such-model", cache_dir=str(tmp_path), local_files_only=True
    )
    with pytest.raises(ModelLoadError, match=r"'nobody/no-such-model'.*local_files_only is set"):
        load_model(settings)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_map_without_cuda_is_a_clear_error(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="asks for a CUDA GPU"):
        load_model(ModelSettings(name_or_path=str(tiny_model_dir), device_map="cuda"))


def test_an_unreachable_hub_is_said_at_once_naming_the_settings_that_help(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a port nobody listens on: the hub is down
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    settings = ModelSettings(
        name_or_path="Qwen/Qwen2.5-VL-3B-Instruct", cache_dir=str(tmp_path), device_map="cpu"
    )

    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="cannot reach the Hugging Face hub") as failed:
        load_model(settings)
    assert time.monotonic() - started < 10, "no two minutes of retries"
    assert "model.cache_dir" in str(failed.value) and "model.local_files_only" in str(failed.value)

    # With the files in the cache, the model loads from there at once instead.
    hub_cache(tiny_model_dir, tmp_path, "Qwen/Qwen2.5-VL-3B-Instruct", "main")
    started = time.monotonic()
    loaded = load_model(settings)
    assert loaded.model.config.text_config.hidden_size == 64
    assert time.monotonic() - started < 30
