"""Sweeping media files that no media row references (a question that failed after its file was stored).

Only the content-addressed layout is considered, `<media_dir>/<sha256[:2]>/<sha256><ext>`, plus the media
fetcher's `.incoming-*` temporary files inside those shard folders; anything else under the media dir, and
anything reached through a symlink, is left alone. A file is deleted only once its mtime is older than the
grace period, so a question in flight, whose file is stored but not yet recorded, never loses it (the
fetcher refreshes the mtime of a file it reuses).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Collection
from datetime import timedelta
from pathlib import Path

from bot.media.storage import INCOMING_PREFIX, content_digest, is_shard_name

log = logging.getLogger(__name__)


def sweep_orphan_files(
    media_root: Path, referenced: Callable[[Collection[str]], set[str]], grace: timedelta
) -> int:
    """Delete old unreferenced files (and emptied shard folders) under `media_root`; return the file count.

    `referenced` gets candidate paths relative to `media_root` (POSIX form) and returns those a media row
    still uses. Blocking: call it from a worker thread.
    """
    if grace < timedelta(0):
        raise ValueError("the orphan grace period cannot be negative")
    cutoff = time.time() - grace.total_seconds()
    try:
        shards = [entry for entry in os.scandir(media_root) if _is_shard(entry)]
    except FileNotFoundError:
        return 0
    deleted = 0
    for shard in shards:
        temporary, content = _old_candidates(Path(shard.path), cutoff)
        kept = referenced(list(content)) if content else set()
        doomed = temporary + [path for relative, path in content.items() if relative not in kept]
        deleted += sum(_unlink_if_old(path, cutoff) for path in doomed)
        _remove_if_empty(Path(shard.path))
    if deleted:
        log.info("deleted %d media files that no conversation references", deleted)
    return deleted


def _is_shard(entry: os.DirEntry[str]) -> bool:
    return is_shard_name(entry.name) and entry.is_dir(follow_symlinks=False)


def _old_candidates(shard: Path, cutoff: float) -> tuple[list[Path], dict[str, Path]]:
    """The shard's temporary files and content files (by relative path) last modified before `cutoff`."""
    temporary: list[Path] = []
    content: dict[str, Path] = {}
    try:
        entries = list(os.scandir(shard))
    except OSError as exc:
        log.warning("could not list media folder %s: %s", shard.name, exc)
        return temporary, content
    for entry in entries:
        try:
            if (
                not entry.is_file(follow_symlinks=False)
                or entry.stat(follow_symlinks=False).st_mtime >= cutoff
            ):
                continue
        except OSError:  # gone meanwhile
            continue
        relative = f"{shard.name}/{entry.name}"
        if entry.name.startswith(INCOMING_PREFIX):
            temporary.append(Path(entry.path))
        elif content_digest(relative) is not None:
            content[relative] = Path(entry.path)
    return temporary, content


def _unlink_if_old(path: Path, cutoff: float) -> bool:
    """Delete `path` unless it was touched since it was listed (a question reusing it); True when deleted."""
    try:
        if path.lstat().st_mtime >= cutoff:
            return False
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("could not delete orphan media file %s: %s", path.name, exc)
        return False
    return True


def _remove_if_empty(shard: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (the usual case), or gone
        shard.rmdir()
