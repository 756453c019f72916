"""Where the model's files are, found without loading them and without torch.

The loader asks this module whether a configured path exists, whether a CUDA device map can work and whether
to load from the cache alone; `python -m bot doctor` asks it where the files are and how large the weights
are (`locate_model_files`). Each failure is a ModelLoadError naming the settings that help.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import huggingface_hub

from bot.errors import ModelLoadError
from bot.settings import ModelSettings

log = logging.getLogger(__name__)

HUB_PROBE_SECONDS = 5.0
HUB_INFO_TIMEOUT_SECONDS = 10.0
WEIGHTS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class ModelFiles:
    """Where `from_pretrained` finds a model (a phrase naming it), and the size of its weights on disk."""

    where: str
    weights_bytes: int


def check_device_map(device_map: str | None, *, cuda_available: bool) -> None:
    """Raise ModelLoadError when `device_map` asks for CUDA and there is none."""
    if device_map is not None and device_map.startswith("cuda") and not cuda_available:
        raise ModelLoadError(
            f"model.device_map = {device_map!r} asks for a CUDA GPU, but torch sees none "
            '(set device_map = "auto" or "cpu", or install a CUDA build of torch)'
        )


def check_local_path(name_or_path: str) -> None:
    """Raise ModelLoadError when `name_or_path` looks like a directory but is none."""
    path = Path(name_or_path).expanduser()
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    if looks_local and not path.is_dir():
        raise ModelLoadError(
            f"model directory not found: {name_or_path} (set model.name_or_path to a directory holding "
            "config.json and the weights, or to a Hugging Face repo id such as Qwen/Qwen2.5-VL-3B-Instruct)"
        )


def use_cache_only(settings: ModelSettings) -> bool:
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
    if _cached_snapshot(settings) is not None:
        log.warning("the Hugging Face hub is unreachable (%s); loading the cached files", reason)
        return True
    raise ModelLoadError(
        f"cannot reach the Hugging Face hub at {huggingface_hub.constants.ENDPOINT} ({reason}) to download "
        f"{settings.name_or_path!r}, and {_cache_name(settings)} does not hold it: check the network, or "
        "download the model elsewhere and set model.cache_dir to its cache (with model.local_files_only = "
        "true), or model.name_or_path to its directory"
    )


def locate_model_files(settings: ModelSettings) -> ModelFiles:
    """Where the model `settings` name would load from, and its weights' size; downloads and loads nothing.

    Blocking (file system; for a hub repo the hub probe, and when uncached one request for its file list).
    Raises ModelLoadError when `from_pretrained` could not find the files.
    """
    check_local_path(settings.name_or_path)
    directory = Path(settings.name_or_path).expanduser()
    if directory.is_dir():
        return ModelFiles(f"directory {directory}", _weights_bytes(directory))
    offline = settings.local_files_only or huggingface_hub.constants.HF_HUB_OFFLINE
    cache_only = offline or use_cache_only(settings)
    snapshot = _cached_snapshot(settings)
    if snapshot is not None:
        where = f"{settings.name_or_path!r} in {_cache_name(settings)} ({snapshot})"
        try:
            return ModelFiles(where, _weights_bytes(snapshot))
        except ModelLoadError:  # an incomplete download: the hub can complete it, when it can be reached
            if cache_only:
                raise
    elif offline:
        raise ModelLoadError(
            f"{settings.name_or_path!r} is not in {_cache_name(settings)}, and model.local_files_only (or "
            "HF_HUB_OFFLINE) forbids downloading it: download it once without, or set model.name_or_path to "
            "its directory"
        )
    where = (
        f"{settings.name_or_path!r} on the hub at {huggingface_hub.constants.ENDPOINT} (downloaded at start)"
    )
    return ModelFiles(where, _hub_weights_bytes(settings))


def _cache_name(settings: ModelSettings) -> str:
    return f"model.cache_dir ({settings.cache_dir})" if settings.cache_dir else "the Hugging Face cache"


def _cached_snapshot(settings: ModelSettings) -> Path | None:
    """The cache folder holding the repo's config.json, or None when it is not cached."""
    cached = huggingface_hub.try_to_load_from_cache(
        settings.name_or_path, "config.json", cache_dir=settings.cache_dir, revision=settings.revision
    )
    return Path(cached).parent if isinstance(cached, str) else None


def _weights_bytes(directory: Path) -> int:
    """The size of the safetensors weights in `directory` (every shard its index names must be there)."""
    if not (directory / "config.json").is_file():
        raise ModelLoadError(
            f"{directory} holds no config.json: set model.name_or_path to a directory holding config.json "
            "and the weights"
        )
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in shards if not (directory / name).is_file()]
        if missing:
            raise ModelLoadError(
                f"{directory} lacks weight files its {WEIGHTS_INDEX} lists: {', '.join(missing)} "
                "(an interrupted download? fetch the model again)"
            )
        files = [directory / name for name in shards]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory} holds no *.safetensors weights: fetch the model again")
    return sum(path.stat().st_size for path in files)


def _hub_weights_bytes(settings: ModelSettings) -> int:
    """The size of the repo's safetensors weights, as the hub lists them."""
    name = settings.name_or_path
    try:
        info = huggingface_hub.HfApi().model_info(
            name, revision=settings.revision, files_metadata=True, timeout=HUB_INFO_TIMEOUT_SECONDS
        )
    except (OSError, ValueError, huggingface_hub.errors.HTTPError) as exc:
        raise ModelLoadError(
            f"cannot find {name!r} on the Hugging Face hub ({type(exc).__name__}: {exc}): check "
            "model.name_or_path and model.revision (a gated model also needs HF_TOKEN)"
        ) from None
    sizes = [file.size or 0 for file in info.siblings or () if file.rfilename.endswith(".safetensors")]
    if not sizes:
        raise ModelLoadError(f"the hub repo {name!r} holds no *.safetensors weights")
    return sum(sizes)
