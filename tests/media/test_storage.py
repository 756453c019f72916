"""The content-addressed layout, owned by `bot.media.storage`: paths made and paths read back agree."""

from __future__ import annotations

from pathlib import Path

from bot.media.storage import (
    INCOMING_PREFIX,
    content_digest,
    is_shard_name,
    sha256_hex,
    store_content_addressed,
)


def test_a_stored_file_names_its_digest(tmp_path: Path) -> None:
    digest, path = store_content_addressed(tmp_path, b"picture bytes", ".png")
    assert digest == sha256_hex(b"picture bytes")
    relative = path.relative_to(tmp_path)
    assert is_shard_name(relative.parts[0])
    assert content_digest(relative) == digest
    assert content_digest(relative.as_posix()) == digest
    assert not list(path.parent.glob(f"{INCOMING_PREFIX}*"))


def test_other_paths_name_no_digest() -> None:
    digest = "ab" + "0" * 62
    assert content_digest(f"ab/{digest}") == digest, "an extension is optional"
    assert content_digest(f"cd/{digest}.png") is None, "the shard must be the digest's first two digits"
    assert content_digest(f"{digest}.png") is None, "a file outside the shards"
    assert content_digest(f"x/ab/{digest}.png") is None
    assert content_digest(f"ab/{INCOMING_PREFIX}123.png") is None
    assert content_digest("ab/" + "A" * 64 + ".png") is None
    assert not is_shard_name("a") and not is_shard_name("AB") and is_shard_name("0f")
