"""The command line: help, config errors, migrations, and `chat` answering with the tiny model."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from bot.__main__ import main
from tests.tiny_settings import write_tiny_config


def _config(tmp_path: Path, model_dir: Path, **sections: dict) -> Path:
    return write_tiny_config(tmp_path / "config.toml", model_dir, tmp_path / "data", **sections)


def test_help_lists_the_subcommands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bot", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("run", "chat", "db", "doctor", "make-tiny-model", "sync-commands"):
        assert command in result.stdout


def test_a_wrong_config_fails_at_start_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[vision]\nmax_pixles = 5\n[model]\ndtype = "fp8"\n')
    assert main(["--config", str(config), "db", "upgrade"]) == 2
    error = capsys.readouterr().err
    assert "vision.max_pixles: unknown key" in error
    assert "model.dtype: Input should be" in error


def test_db_upgrade_creates_the_schema(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert main(["--config", str(_config(tmp_path, tiny_model_dir)), "db", "upgrade"]) == 0
    with sqlite3.connect(tmp_path / "data" / "bot.sqlite3") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"conversations", "messages", "alembic_version"} <= tables


def test_data_files_are_readable_by_the_bots_user_only(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = str(_config(tmp_path, tiny_model_dir))
    data = tmp_path / "data"
    assert main(["--config", config, "db", "upgrade"]) == 0
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), "blue").save(photo)
    assert main(["--config", config, "chat", "--image", str(photo), "What is this?"]) == 0

    def mode(path: Path) -> int:
        return path.stat().st_mode & 0o777

    assert mode(data) == 0o700 and mode(data / "media") == 0o700
    database_files = list(data.glob("bot.sqlite3*"))
    assert data / "bot.sqlite3" in database_files
    assert all(mode(path) == 0o600 for path in database_files), [
        (p.name, oct(mode(p))) for p in database_files
    ]
    media = [path for path in (data / "media").rglob("*")]
    assert media and all(mode(path) == (0o700 if path.is_dir() else 0o600) for path in media)

    (data / "bot.sqlite3").chmod(0o644)  # a database from an earlier version
    assert main(["--config", config, "db", "upgrade"]) == 0
    assert mode(data / "bot.sqlite3") == 0o600


def _stored_roles(data_dir: Path) -> list[str]:
    with sqlite3.connect(data_dir / "bot.sqlite3") as db:
        return [row[0] for row in db.execute("SELECT role FROM messages ORDER BY id")]


def test_chat_one_shot_starts_fresh_and_a_named_conversation_remembers(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(_config(tmp_path, tiny_model_dir))
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), "blue").save(photo)
    assert main(["--config", config, "chat", "--image", str(photo), "What is this?"]) == 0
    assert capsys.readouterr().out.strip()
    assert _stored_roles(tmp_path / "data") == [], "a one-shot question leaves no history behind"
    assert not list((tmp_path / "data" / "media").rglob("*.png")), "nor its image"

    named = ["--config", config, "chat", "--conversation", "trip"]
    assert main([*named, "--image", str(photo), "What is this?"]) == 0
    assert main([*named, "And now?"]) == 0
    capsys.readouterr()
    assert _stored_roles(tmp_path / "data") == ["user", "assistant", "user", "assistant"]
    assert main([*named, "--reset", "--model", str(tiny_model_dir), "Fresh start"]) == 0
    assert "Forgot 2 turns." in capsys.readouterr().out


def test_chat_reports_a_bad_image_clearly(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    config = str(_config(tmp_path, tiny_model_dir))
    assert main(["--config", config, "chat", "--image", str(not_an_image), "What is this?"]) == 1
    assert "isn't an image I can read" in capsys.readouterr().out


def test_make_tiny_model(tmp_path: Path) -> None:
    assert main(["make-tiny-model", str(tmp_path / "tiny")]) == 0
    assert (tmp_path / "tiny" / "config.json").is_file()


def test_a_missing_image_is_reported_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, tmp_path / "no-model-here")
    assert main(["--config", str(config), "chat", "--image", str(tmp_path / "nope.png"), "hi"]) == 1
    assert f"No such file: {tmp_path / 'nope.png'}" in capsys.readouterr().out


def test_a_data_dir_that_cannot_be_created_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\ndata_dir = "{(blocker / "data").as_posix()}"\n')
    assert main(["--config", str(config), "db", "upgrade"]) == 2
    assert "storage.data_dir: cannot create" in capsys.readouterr().err


def test_db_purge_sweeps_orphaned_files_even_when_turns_are_kept_forever(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, tiny_model_dir, history={"retention_days": 0})
    assert main(["--config", str(config), "db", "upgrade"]) == 0
    orphan = tmp_path / "data" / "media" / "ab" / f"{'ab' * 32}.png"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left by a question that failed")
    two_hours_ago = time.time() - 2 * 3600
    os.utime(orphan, (two_hours_ago, two_hours_ago))
    assert main(["--config", str(config), "db", "purge"]) == 0
    assert "Purged 0 old messages, 0 unused media files and 1 orphaned files." in capsys.readouterr().out
    assert not orphan.exists()


async def test_interactive_chat_tells_an_unknown_command_instead_of_asking_the_model(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.chat import run_chat
    from tests.tiny_settings import tiny_settings

    typed = iter(["/histroy", "/history", "/quit"])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(typed))
    out = io.StringIO()
    settings = tiny_settings(tiny_model_dir, tmp_path / "data")
    assert await run_chat(settings, question=None, images=[], conversation="c", reset=False, out=out) == 0
    printed = out.getvalue()
    assert "Conversation 'c': 0 earlier turns remembered" in printed
    assert "Unknown command /histroy." in printed and "bot> " not in printed
    assert "0 turns, 0 images stored." in printed
