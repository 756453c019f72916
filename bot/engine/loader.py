"""Load the model and its processor with every option of `[model]`, failing with a clear ModelLoadError."""

from __future__ import annotations

import importlib.util
import logging
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import huggingface_hub
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from bot.errors import ModelLoadError
from bot.settings import ModelSettings

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode), its processor (left padding) and the device of its inputs."""

    model: Any
    processor: Any
    device: torch.device


def resolve_dtype(name: str) -> torch.dtype | str:
    """`"auto"` stays `"auto"`; a dtype name becomes the torch dtype."""
    return name if name == "auto" else _DTYPES[name]


def resolve_attn_implementation(requested: str) -> str:
    """The attention implementation to load: FlashAttention 2 only with flash-attn installed and CUDA."""
    flash_ready = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    if requested == "auto":
        return "flash_attention_2" if flash_ready else "sdpa"
    if requested == "flash_attention_2" and not flash_ready:
        log.warning(
            "attn_implementation = flash_attention_2 needs the flash-attn package and a CUDA GPU; "
            "using sdpa instead"
        )
        return "sdpa"
    return requested


def load_model(settings: ModelSettings) -> LoadedModel:
    """Load the Qwen2.5-VL model and processor that `settings` name; raise ModelLoadError if impossible."""
    _check_device_map(settings.device_map)
    _check_local_path(settings.name_or_path)
    attn = resolve_attn_implementation(settings.attn_implementation)
    hub_options: dict[str, Any] = {
        "revision": settings.revision,
        "cache_dir": settings.cache_dir,
        "local_files_only": settings.local_files_only or _use_cache_only(settings),
    }
    source = settings.name_or_path
    started = time.monotonic()
    log.info("loading processor from %s", source)
    try:
        processor = AutoProcessor.from_pretrained(source, **hub_options)
        log.info("loading model from %s (dtype=%s, attention=%s)", source, settings.dtype, attn)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            source,
            dtype=resolve_dtype(settings.dtype),
            device_map=settings.device_map,
            low_cpu_mem_usage=settings.low_cpu_mem_usage,
            attn_implementation=attn,
            **hub_options,
        )
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        raise ModelLoadError(_explain(settings, exc)) from exc
    model.eval()
    processor.tokenizer.padding_side = "left"
    device = model.device
    log.info("model ready on %s in %.1f s", device, time.monotonic() - started)
    return LoadedModel(model=model, processor=processor, device=device)


HUB_PROBE_SECONDS = 5.0


def _use_cache_only(settings: ModelSettings) -> bool:
    """For a hub repo id: whether to load from the cache alone, because the hub cannot be reached.

    The hub client retries a refused connection for over two minutes, printing warnings, before it gives up
    or falls back to the cache; one short connection attempt tells the same in seconds. Without cached files
    that is a ModelLoadError naming the settings that help.
    """
    if settings.local_files_only or Path(settings.name_or_path).expanduser().is_dir():
        return False
    endpoint = urlsplit(huggingface_hub.constants.ENDPOINT)
    if huggingface_hub.constants.HF_HUB_OFFLINE or endpoint.scheme in urllib.request.getproxies():
        return False  # offline mode decides by itself; through a proxy a direct probe proves nothing
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "", port), timeout=HUB_PROBE_SECONDS).close()
        return False
    except OSError as exc:
        reason = f"{type(exc).__name__}: {exc}"
    cached = huggingface_hub.try_to_load_from_cache(
        settings.name_or_path, "config.json", cache_dir=settings.cache_dir, revision=settings.revision
    )
    if isinstance(cached, str):
        log.warning("the Hugging Face hub is unreachable (%s); loading the cached files", reason)
        return True
    where = f"model.cache_dir ({settings.cache_dir})" if settings.cache_dir else "the Hugging Face cache"
    raise ModelLoadError(
        f"cannot reach the Hugging Face hub at {huggingface_hub.constants.ENDPOINT} ({reason}) to download "
        f"{settings.name_or_path!r}, and {where} does not hold it: check the network, or download the model "
        "elsewhere and set model.cache_dir to its cache (with model.local_files_only = true), or "
        "model.name_or_path to its directory"
    )


def _check_device_map(device_map: str | None) -> None:
    if device_map is not None and device_map.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"model.device_map = {device_map!r} asks for a CUDA GPU, but torch sees none "
            '(set device_map = "auto" or "cpu", or install a CUDA build of torch)'
        )


def _check_local_path(name_or_path: str) -> None:
    path = Path(name_or_path).expanduser()
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    if looks_local and not path.is_dir():
        raise ModelLoadError(
            f"model directory not found: {name_or_path} (set model.name_or_path to a directory holding "
            "config.json and the weights, or to a Hugging Face repo id such as Qwen/Qwen2.5-VL-3B-Instruct)"
        )


def _explain(settings: ModelSettings, exc: Exception) -> str:
    source = settings.name_or_path
    if settings.local_files_only:
        hint = (
            "local_files_only is set, so it must be a local directory or already in the Hugging Face cache"
            + (f" ({settings.cache_dir})" if settings.cache_dir else "")
        )
    else:
        hint = "check model.name_or_path (a local directory or a Hugging Face repo id), revision and network"
    return f"cannot load model {source!r}: {hint}. Cause: {type(exc).__name__}: {exc}"
