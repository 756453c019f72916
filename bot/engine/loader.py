"""Load the model and its processor with every option of `[model]`, failing with a clear ModelLoadError."""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from bot.engine.model_files import check_device_map, check_local_path, use_cache_only
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
    check_device_map(settings.device_map, cuda_available=torch.cuda.is_available())
    check_local_path(settings.name_or_path)
    attn = resolve_attn_implementation(settings.attn_implementation)
    hub_options: dict[str, Any] = {
        "revision": settings.revision,
        "cache_dir": settings.cache_dir,
        "local_files_only": settings.local_files_only or use_cache_only(settings),
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
