"""Content-addressed files: `<media_dir>/<sha256[:2]>/<sha256><ext>`, written atomically and only once.

This module owns that layout: the store reads file names only through `is_shard_name`, `content_digest` and
`INCOMING_PREFIX`.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path, PurePath

INCOMING_PREFIX = ".incoming-"  # a file being written, moved into place when complete
_SHARD_NAME = re.compile(r"[0-9a-f]{2}")
_CONTENT_NAME = re.compile(r"([0-9a-f]{64})(\.[A-Za-z0-9]+)?")


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of `data` as 64 hex digits, the name a file is stored under."""
    return hashlib.sha256(data).hexdigest()


def content_path(media_dir: Path, digest: str, extension: str) -> Path:
    """Where the file with SHA-256 `digest` and `extension` lives under `media_dir` (it may not exist)."""
    return media_dir / digest[:2] / f"{digest}{extension}"


def is_shard_name(name: str) -> bool:
    """Whether a folder directly under the media dir is one of the layout's shards (`<sha256[:2]>`)."""
    return _SHARD_NAME.fullmatch(name) is not None


def content_digest(relative_path: str | PurePath) -> str | None:
    """The SHA-256 a stored file's path relative to the media dir names, or None for any other path."""
    path = PurePath(relative_path)
    match = _CONTENT_NAME.fullmatch(path.name)
    if match is None or len(path.parts) != 2 or not match.group(1).startswith(path.parts[0]):
        return None
    return match.group(1)


def store_content_addressed(
    media_dir: Path, data: bytes, extension: str, *, digest: str | None = None
) -> tuple[str, Path]:
    """Save `data` under its SHA-256 unless that file already exists; return the digest and the path.

    `digest`, when the caller already has it, must be `sha256_hex(data)`. Blocking: call it from a worker
    thread. The bytes go to a temporary file in the target folder first and are moved into place with
    `os.replace`, so a reader never sees a half-written file.
    """
    digest = digest or sha256_hex(data)
    path = content_path(media_dir, digest, extension)
    if reuse_existing(path):
        return digest, path
    fd, temp_name = _temporary_file(path.parent, extension)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return digest, path


def reuse_existing(path: Path) -> bool:
    """Whether `path` is already stored; if so its mtime is set to now.

    The retention purge deletes a file no media row references once its mtime is older than a grace period;
    refreshing it here keeps a file that a question in flight reuses from counting as an old orphan before
    that question's turn is recorded.
    """
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    except OSError:  # e.g. a read-only media dir: the file is still usable, only its mtime stays old
        pass
    return path.is_file()


def _temporary_file(folder: Path, extension: str) -> tuple[int, str]:
    """Create a temporary file in `folder`, making the folder first."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:  # mkstemp creates the file readable by its owner only (0600)
        return tempfile.mkstemp(dir=folder, prefix=INCOMING_PREFIX, suffix=extension)
    except FileNotFoundError:  # the purge removed the folder as empty just after the mkdir
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=folder, prefix=INCOMING_PREFIX, suffix=extension)
