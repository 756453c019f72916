"""Content-addressed files: `<media_dir>/<sha256[:2]>/<sha256><ext>`, written atomically and only once."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of `data` as 64 hex digits, the name a file is stored under."""
    return hashlib.sha256(data).hexdigest()


def content_path(media_dir: Path, digest: str, extension: str) -> Path:
    """Where the file with SHA-256 `digest` and `extension` lives under `media_dir` (it may not exist)."""
    return media_dir / digest[:2] / f"{digest}{extension}"


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
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return tempfile.mkstemp(dir=folder, prefix=".incoming-", suffix=extension)
    except FileNotFoundError:  # the purge removed the folder as empty just after the mkdir
        folder.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=folder, prefix=".incoming-", suffix=extension)
