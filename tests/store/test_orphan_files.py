"""The retention purge also deletes media files that no media row references (a question that failed)."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from bot.store import ConversationStore, NewTurn, PurgeResult, upgrade
from tests.store.factories import question, scope, write_media

TWO_HOURS = 2 * 3600


def age(path: Path, seconds: float) -> None:
    """Pretend `path` was last written `seconds` ago (without following a symlink)."""
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp), follow_symlinks=False)


async def test_old_orphans_go_while_fresh_and_referenced_files_stay(
    store: ConversationStore, media_dir: Path
) -> None:
    old_orphan, fresh_orphan = write_media(media_dir, 1), write_media(media_dir, 2)
    mine, theirs = write_media(media_dir, 3), write_media(media_dir, 4)
    one, two = await store.conversation_for(scope(1)), await store.conversation_for(scope(2))
    await store.record_turn(one, NewTurn(question("mine", mine), "x", question_discord_id=1))
    await store.record_turn(two, NewTurn(question("theirs", theirs), "y", question_discord_id=2))
    for item in (old_orphan, mine, theirs):
        age(item.path, TWO_HOURS)
    age(fresh_orphan.path, 30 * 60)

    result = await store.purge_older_than(30)

    assert result == PurgeResult(messages_deleted=0, media_deleted=0, orphan_files_deleted=1)
    assert not old_orphan.path.exists()
    assert fresh_orphan.path.is_file() and mine.path.is_file() and theirs.path.is_file()
    assert (await store.load_window(one, 10))[0].media == (mine,)
    assert (await store.load_window(two, 10))[0].media == (theirs,)
    assert await store.purge_older_than(30) == PurgeResult(0, 0, 0)


async def test_the_grace_period_is_a_parameter(store: ConversationStore, media_dir: Path) -> None:
    orphan = write_media(media_dir, 1)
    age(orphan.path, 10 * 60)

    assert (await store.purge_older_than(30)).orphan_files_deleted == 0
    result = await store.purge_older_than(30, orphan_grace=timedelta(minutes=5))

    assert result.orphan_files_deleted == 1 and not orphan.path.exists()


async def test_emptied_shard_folders_are_removed(store: ConversationStore, media_dir: Path) -> None:
    orphan, kept = write_media(media_dir, 1), write_media(media_dir, 2)
    assert orphan.path.parent != kept.path.parent
    age(orphan.path, TWO_HOURS)

    await store.purge_older_than(30)

    assert not orphan.path.parent.exists()
    assert kept.path.parent.is_dir()
    assert media_dir.is_dir()


async def test_stale_temporary_files_go_and_fresh_ones_stay(
    store: ConversationStore, media_dir: Path
) -> None:
    shard = media_dir / "ab"
    shard.mkdir()
    stale, writing = shard / ".incoming-stale.png", shard / ".incoming-writing.png"
    stale.write_bytes(b"half")
    writing.write_bytes(b"half")
    age(stale, TWO_HOURS)

    assert (await store.purge_older_than(30)).orphan_files_deleted == 1

    assert not stale.exists() and writing.is_file()


async def test_files_outside_the_layout_are_never_touched(store: ConversationStore, media_dir: Path) -> None:
    orphan = write_media(media_dir, 1)
    shard = orphan.path.parent
    digest = "ab" * 32
    strangers = [
        media_dir / "notes.txt",  # not in a shard folder
        media_dir / f"{digest}.png",  # content name, but not in its shard
        shard / "readme.txt",  # in a shard, not a content name
        shard / f"{digest}.png",  # content name under another shard
        media_dir / "backup" / f"{digest}.png",  # folder name is not a shard
    ]
    assert orphan.sha256[:2] != "ab"
    for path in strangers:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"keep me")
        age(path, TWO_HOURS)
    age(orphan.path, TWO_HOURS)

    assert (await store.purge_older_than(30)).orphan_files_deleted == 1

    assert all(path.read_bytes() == b"keep me" for path in strangers)


async def test_symlinks_are_never_followed(store: ConversationStore, media_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / f"{'cd' * 32}.png"
    target.write_bytes(b"not ours")
    age(target, TWO_HOURS)
    link_in_shard = media_dir / "cd" / target.name
    link_in_shard.parent.mkdir()
    try:
        link_in_shard.symlink_to(target)
        (media_dir / "ef").symlink_to(outside, target_is_directory=True)
    except OSError:
        pytest.skip("this file system cannot make symlinks")
    age(link_in_shard, TWO_HOURS)
    other_target = outside / f"{'ef' * 32}.png"
    other_target.write_bytes(b"not ours either")
    age(other_target, TWO_HOURS)

    assert (await store.purge_older_than(30)).orphan_files_deleted == 0

    assert link_in_shard.is_symlink() and target.read_bytes() == b"not ours"
    assert other_target.read_bytes() == b"not ours either"


async def test_a_missing_media_dir_purges_nothing(database_url: str, tmp_path: Path) -> None:
    upgrade(database_url)
    async with ConversationStore(database_url, tmp_path / "absent") as store:
        assert await store.purge_older_than(30) == PurgeResult(0, 0, 0)
