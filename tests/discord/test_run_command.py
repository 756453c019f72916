"""`python -m bot run` as users start it: a separate process that migrates, loads the model and connects.

The fake Discord runs in the test; the bot runs as a subprocess with the token in its environment, answers an
image question, and exits cleanly on SIGTERM without ever printing the token.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from tests.discord.harness import TOKEN, png_bytes
from tests.fakediscord.server import FakeDiscord

ROOT = Path(__file__).resolve().parents[2]


def _config(path: Path, fake: FakeDiscord, model_dir: Path, data_dir: Path) -> Path:
    path.write_text(
        f"""
[discord]
api_base_url = "{fake.api_base_url}"
stream_edit_interval_seconds = 1.0

[model]
name_or_path = "{model_dir.as_posix()}"
device_map = "cpu"
dtype = "float32"
local_files_only = true

[generation]
max_new_tokens = 6
do_sample = false

[storage]
data_dir = "{data_dir.as_posix()}"

[media]
allowed_hosts = ["127.0.0.1"]
"""
    )
    return path


async def test_run_command_connects_answers_and_stops_cleanly(tiny_model_dir: Path, tmp_path: Path) -> None:
    fake = FakeDiscord(token=TOKEN)
    _guild, (channel,), _ = fake.add_guild("Guild", ["general"], ())
    alice = fake.add_user("alice")
    await fake.start()
    config = _config(tmp_path / "config.toml", fake, tiny_model_dir, tmp_path / "data")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "--config",
        str(config),
        "-v",
        "run",
        cwd=ROOT,
        env={**os.environ, "DISCORD_TOKEN": TOKEN},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await fake.wait_connected(timeout=120)
        await fake.wait_for_request(lambda request: request.method == "PUT", timeout=30)  # commands synced
        data = png_bytes()
        attachment = fake.attachment(
            fake.add_file("cat.png", data, "image/png"), "cat.png", len(data), "image/png"
        )
        await fake.send_message(channel, alice, f"{fake.bot.mention} what is this?", attachments=[attachment])
        reply = await fake.wait_for_message(
            channel, lambda message: bool(message["content"].strip()), timeout=60
        )
        assert reply["message_reference"]["message_id"]
        assert (tmp_path / "data" / "bot.sqlite3").is_file()
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        await fake.close()
    log = output.decode()
    assert process.returncode == 0, log[-3000:]
    assert "applying database migrations" in log
    assert TOKEN not in log
