"""LRU cache of the vision encoder's output per image, bounded by a byte budget.

A follow-up question about the same image re-sends the whole conversation, image included. The cache
keeps each image's encoder output, keyed by what determines it (the file's bytes or the pixel values, the
grid, the pixel settings; see `Pipeline`), so the encoder does not run again; the model still receives
`input_ids`, `pixel_values` and `image_grid_thw`, so its multimodal position ids stay exactly as without the
cache. Confined to the one thread that owns the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling


class VisionCache:
    """Image embeddings by key, evicting the least recently used beyond `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._owner: int | None = None

    @property
    def bytes_used(self) -> int:
        """Bytes held by the cached tensors."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor | None:
        """The cached embeddings for `key` (now most recently used), or None; counts hits and misses."""
        self._check_thread()
        tensor = self._entries.get(key)
        if tensor is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return tensor

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Store `tensor` under `key`, evicting the oldest entries to fit; one over budget is not kept."""
        self._check_thread()
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.numel() * old.element_size()
        while self._entries and self._bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.numel() * evicted.element_size()
        self._entries[key] = tensor.detach()
        self._bytes += size

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()
        self._bytes = 0

    def _check_thread(self) -> None:
        ident = threading.get_ident()
        if self._owner is None:
            self._owner = ident
        elif self._owner != ident:
            raise RuntimeError("VisionCache is confined to the thread that first used it")


class FileDigests:
    """sha256 of local files' bytes, remembered for the last `capacity` files by path, inode, mtime and size.

    A file rewritten in place within one mtime tick at the same size would keep its old digest; media files
    are content-addressed and written atomically (a new inode), so that does not happen here.
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._digests: OrderedDict[tuple[str, int, int, int], bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._digests)

    def digest(self, path: str) -> bytes:
        """The sha256 digest of the file at `path`, read and hashed only when the file is new or changed."""
        stat = os.stat(path)
        memo_key = (path, stat.st_ino, stat.st_mtime_ns, stat.st_size)
        digest = self._digests.get(memo_key)
        if digest is not None:
            self._digests.move_to_end(memo_key)
            return digest
        with open(path, "rb") as file:
            digest = hashlib.file_digest(file, "sha256").digest()
        self._digests[memo_key] = digest
        while len(self._digests) > self.capacity:
            self._digests.popitem(last=False)
        return digest


@contextlib.contextmanager
def cached_image_features(model: Any, cache: VisionCache, image_keys: list[str]) -> Iterator[None]:
    """Within the block, `model`'s image encoder reuses `cache` for images whose key it holds.

    `image_keys` names the images of the next forward pass in order (one per row of `image_grid_thw`).
    """
    inner = model.model
    encode = inner.get_image_features

    def get_image_features(
        pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, **kwargs: Any
    ) -> BaseModelOutputWithPooling:
        if len(image_keys) != image_grid_thw.shape[0]:
            return encode(pixel_values, image_grid_thw, **kwargs)
        sizes = image_grid_thw.prod(dim=-1).tolist()
        chunks = torch.split(pixel_values, sizes)
        embeds: list[torch.Tensor | None] = [cache.get(key) for key in image_keys]
        missing = [index for index, embed in enumerate(embeds) if embed is None]
        if missing:
            fresh = encode(
                torch.cat([chunks[index] for index in missing]),
                image_grid_thw[missing],
                **{**kwargs, "return_dict": True},
            ).pooler_output
            for index, embed in zip(missing, fresh, strict=True):
                embeds[index] = embed
                cache.put(image_keys[index], embed)
        # Qwen2.5-VL's own get_image_features returns one tensor per image here, as a tuple.
        return BaseModelOutputWithPooling(pooler_output=tuple(embeds))  # type: ignore[arg-type]

    inner.get_image_features = get_image_features
    try:
        yield
    finally:
        del inner.get_image_features
