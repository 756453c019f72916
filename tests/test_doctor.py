"""`python -m bot doctor` against the loopback Discord, the tiny model and real SQLite files.

A good set-up passes every check (exit 0). Each broken part is one ✗ that says what to do; checks that need a
failed one are skipped. The token is never printed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import huggingface_hub
import pytest
import torch
from alembic import command
from pydantic import SecretStr

from bot.app import migrate
from bot.discord import sync_commands
from bot.doctor import CheckResult, Status, run_checks, run_doctor
from bot.errors import format_bytes
from bot.settings import Settings
from bot.store.database import alembic_config, create_engine_for
from tests.discord.harness import TOKEN
from tests.engine.test_loader import hub_cache
from tests.fakediscord.server import FakeDiscord
from tests.tiny_settings import tiny_settings, write_tiny_config

ROOT = Path(__file__).resolve().parents[1]
DISCORD_CHECKS = ("Discord token", "Message content intent", "Guilds", "Channels", "Slash commands")
# What a server's @everyone usually holds, and what README's invite URL grants the bot's role.
EVERYONE = discord.Permissions(view_channel=True, send_messages=True, read_message_history=True)
BOT_ROLE = discord.Permissions(
    view_channel=True,
    send_messages=True,
    read_message_history=True,
    create_public_threads=True,
    send_messages_in_threads=True,
    attach_files=True,
    embed_links=True,
)


@dataclass
class World:
    """A good set-up: the fake Discord (one guild, #general and #images), the tiny model, a migrated store."""

    fake: FakeDiscord
    guild_id: int
    channels: list[int]
    tmp_path: Path
    model_dir: Path

    def settings(self, **sections: dict[str, Any]) -> Settings:
        return tiny_settings(self.model_dir, self.tmp_path / "data", **self._sections(sections))

    def config_file(self, **sections: dict[str, Any]) -> Path:
        path = self.tmp_path / "config.toml"
        return write_tiny_config(path, self.model_dir, self.tmp_path / "data", **self._sections(sections))

    def _sections(self, sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        discord_section = {"api_base_url": self.fake.api_base_url, "allowed_channel_ids": self.channels}
        return {**sections, "discord": {**discord_section, **sections.get("discord", {})}}


@pytest.fixture
async def world(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[World]:
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    fake = FakeDiscord(token=TOKEN)
    guild_id, channels, _ = fake.add_guild("Guild", ["general", "images"])
    fake.set_role_permissions(guild_id, guild_id, EVERYONE.value)
    fake.set_role_permissions(guild_id, fake.bot_role_ids[guild_id], BOT_ROLE.value)
    await fake.start()
    world = World(fake, guild_id, channels, tmp_path, tiny_model_dir)
    settings = world.settings()
    await sync_commands(settings, SecretStr(TOKEN))
    migrate(settings.storage)
    try:
        yield world
    finally:
        await fake.close()


async def _results(settings: Settings) -> dict[str, CheckResult]:
    return {result.name: result async for result in run_checks(settings)}


def _failed(results: dict[str, CheckResult]) -> dict[str, str]:
    return {name: result.detail for name, result in results.items() if result.status is Status.FAILED}


async def test_a_good_setup_passes_every_check_as_a_command(world: World) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "doctor",
        "--config",
        str(world.config_file()),
        cwd=ROOT,
        env={**os.environ, "DISCORD_TOKEN": TOKEN},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await asyncio.wait_for(process.communicate(), timeout=120))[0].decode()
    lines = output.splitlines()
    assert process.returncode == 0, output
    assert [line.split(":")[0] for line in lines] == [
        "✓ Discord token",
        "✓ Message content intent",
        "✓ Guilds",
        "✓ Channels",
        "✓ Slash commands",
        "✓ Model files",
        "✓ GPU",
        "✓ Database",
        "✓ Media directory",
    ], output
    assert "#general (Guild), #images (Guild)" in lines[3]
    assert "ask, history, reset" in lines[4]
    assert TOKEN not in output


async def test_a_rejected_token_fails_once_and_skips_the_discord_checks(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "not-the-token")
    assert await run_doctor(world.settings()) == 1
    lines = capsys.readouterr().out.splitlines()

    assert lines[0] == "✗ Discord token: Discord rejected the bot token: check DISCORD_TOKEN"
    assert lines[1:5] == [f"- {name}: skipped (needs a Discord login)" for name in DISCORD_CHECKS[1:]]
    assert all(line.startswith("✓") for line in lines[5:]), lines
    assert "not-the-token" not in "\n".join(lines)


async def test_a_missing_token_is_said_and_the_other_checks_still_run(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DISCORD_TOKEN")
    results = await _results(world.settings())
    assert _failed(results) == {
        "Discord token": "set the DISCORD_TOKEN environment variable to your bot's token"
    }
    assert results["Database"].status is Status.OK


async def test_a_missing_message_content_intent_says_where_to_enable_it(world: World) -> None:
    world.fake.application_flags = 0
    failed = _failed(await _results(world.settings()))
    assert list(failed) == ["Message content intent"]
    assert failed["Message content intent"].endswith(
        "enable MESSAGE CONTENT INTENT in the Developer Portal → Bot"
    )


async def test_a_channel_where_the_bot_cannot_send_is_named_with_the_missing_permission(
    world: World,
) -> None:
    images = world.channels[1]
    bot_role = world.fake.bot_role_ids[world.guild_id]
    world.fake.add_permission_overwrite(images, bot_role, deny=discord.Permissions(send_messages=True).value)
    failed = _failed(await _results(world.settings()))
    assert list(failed) == ["Channels"]
    # Discord takes Attach Files and Embed Links away with Send Messages.
    assert failed["Channels"].startswith(
        "#images (Guild) lacks Send Messages, Attach Files, Embed Links: grant them to the bot's role"
    )
    assert "#general" not in failed["Channels"]

    # With no channel allow-list, every text channel the bot can see counts; one it cannot see does not.
    hidden = discord.Permissions(view_channel=True).value
    world.fake.add_permission_overwrite(images, world.guild_id, deny=hidden)
    world.fake.add_permission_overwrite(images, bot_role, deny=hidden)
    results = await _results(world.settings(discord={"allowed_channel_ids": []}))
    assert results["Channels"].status is Status.OK
    assert results["Channels"].detail == "can read, answer and open threads in #general (Guild)"


async def test_an_allowed_channel_the_bot_does_not_have_is_named(world: World) -> None:
    failed = _failed(await _results(world.settings(discord={"allowed_channel_ids": [world.channels[0], 42]})))
    assert failed == {
        "Channels": "42 in discord.allowed_channel_ids is not a channel of the bot's allowed guilds: "
        "correct the list"
    }


async def test_a_bot_in_no_guild_skips_the_channels(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    fake = FakeDiscord(token=TOKEN)
    await fake.start()
    try:
        settings = tiny_settings(
            tiny_model_dir, tmp_path / "data", discord={"api_base_url": fake.api_base_url}
        )
        results = await _results(settings)
    finally:
        await fake.close()
    assert results["Guilds"].status is Status.FAILED
    assert "the bot is in no guild: invite it" in results["Guilds"].detail
    assert results["Channels"].detail == "skipped (needs the bot in a guild)"


async def test_unregistered_slash_commands_say_to_sync(world: World) -> None:
    world.fake.commands = [command for command in world.fake.commands if command["name"] != "history"]
    failed = _failed(await _results(world.settings()))
    assert failed == {"Slash commands": "not registered: history: run python -m bot sync-commands"}


async def test_a_database_behind_the_newest_schema_says_to_upgrade(world: World) -> None:
    settings = world.settings()
    engine = create_engine_for(settings.storage.resolved_database_url)
    with engine.begin() as connection:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    engine.dispose()
    failed = _failed(await _results(settings))
    assert list(failed) == ["Database"]
    assert failed["Database"].endswith("has no schema yet: run python -m bot db upgrade")

    database = world.tmp_path / "data" / "bot.sqlite3"
    database.unlink()
    failed = _failed(await _results(settings))
    assert failed["Database"].endswith("has no schema yet: run python -m bot db upgrade")
    assert not database.exists(), "the doctor creates no database"


async def test_a_media_directory_others_can_read_is_flagged(world: World) -> None:
    media = world.tmp_path / "data" / "media"
    media.chmod(0o755)
    assert _failed(await _results(world.settings())) == {
        "Media directory": f"{media} is open to other users (mode 755): chmod 700 {media}"
    }
    media.rmdir()
    assert "run python -m bot db upgrade" in _failed(await _results(world.settings()))["Media directory"]


async def test_model_files_are_found_without_loading_them(world: World) -> None:
    results = await _results(world.settings())
    weights = format_bytes((world.model_dir / "model.safetensors").stat().st_size)
    assert results["Model files"].detail == f"directory {world.model_dir}: {weights} of weights"

    missing = world.tmp_path / "no-model"
    failed = _failed(await _results(world.settings(model={"name_or_path": str(missing)})))
    assert failed["Model files"].startswith(f"model directory not found: {missing}")


async def test_a_hub_model_is_found_in_the_cache_when_the_hub_is_down(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a port nobody listens on: the hub is down
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    cache = world.tmp_path / "hub-cache"
    cache.mkdir()
    model = {
        "name_or_path": "Qwen/Qwen2.5-VL-3B-Instruct",
        "cache_dir": str(cache),
        "local_files_only": False,
    }

    failed = _failed(await _results(world.settings(model=model)))
    assert list(failed) == ["Model files"]
    assert failed["Model files"].startswith(f"cannot reach the Hugging Face hub at http://127.0.0.1:{port}")

    hub_cache(world.model_dir, cache, "Qwen/Qwen2.5-VL-3B-Instruct", "main")
    results = await _results(world.settings(model=model))
    assert results["Model files"].status is Status.OK
    assert f"'Qwen/Qwen2.5-VL-3B-Instruct' in model.cache_dir ({cache})" in results["Model files"].detail


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
async def test_without_cuda_the_cpu_is_fine_but_a_cuda_device_map_is_not(world: World) -> None:
    results = await _results(world.settings())
    assert results["GPU"].status is Status.OK
    assert results["GPU"].detail.startswith("none (torch sees no CUDA device): the model runs on the CPU")

    failed = _failed(await _results(world.settings(model={"device_map": "cuda"})))
    assert list(failed) == ["GPU"]
    assert "asks for a CUDA GPU, but torch sees none" in failed["GPU"]


async def test_a_listed_guild_the_bot_is_not_in_is_named(world: World) -> None:
    results = await _results(world.settings(discord={"allowed_guild_ids": [world.guild_id, 42]}))
    assert _failed(results) == {
        "Guilds": "the bot is not in 42, which discord.allowed_guild_ids lists: invite it there, or correct "
        "the list"
    }
    assert results["Channels"].detail == "skipped (needs the bot in a guild)"


async def test_an_unreachable_discord_is_one_failure(world: World) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api = f"http://127.0.0.1:{port}/api/v10"
    results = await _results(world.settings(discord={"api_base_url": api}))
    assert _failed(results) == {
        "Discord token": f"cannot reach Discord at {api} (ClientConnectorError); check the network, or "
        "discord.api_base_url"
    }
    assert [results[name].status for name in DISCORD_CHECKS[1:]] == [Status.SKIPPED] * 4
