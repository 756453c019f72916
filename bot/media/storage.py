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
    if path.exists():
        return digest, path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".incoming-", suffix=extension)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return digest, path
