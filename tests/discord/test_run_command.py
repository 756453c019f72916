"""`python -m bot run` as users start it: a separate process that migrates, loads the model and connects.

The fake Discord runs in the test; the bot runs as a subprocess with the token in its environment, serves its
health endpoints, answers an image question, and exits cleanly on SIGTERM without ever printing the token.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp

from bot.errors import EngineStopped
from tests.discord.harness import TOKEN, png_bytes
from tests.fakediscord.server import FakeDiscord
from tests.inference.server import free_port
from tests.tiny_settings import write_tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _replies_to(message: dict, question: dict) -> bool:
    reference = message.get("message_reference") or {}
    return int(reference.get("message_id", 0)) == int(question["id"])


async def _get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


async def test_run_command_connects_answers_and_stops_cleanly(tiny_model_dir: Path, tmp_path: Path) -> None:
    fake = FakeDiscord(token=TOKEN)
    guild_id, (channel,), _ = fake.add_guild("Guild", ["general"], ())
    alice = fake.add_user("alice")
    await fake.start()
    health_port = free_port()
    config = write_tiny_config(
        tmp_path / "config.toml",
        tiny_model_dir,
        tmp_path / "data",
        discord={"api_base_url": fake.api_base_url, "stream_edit_interval_seconds": 1.0},
        media={"allowed_hosts": ["127.0.0.1"]},
        metrics={"enabled": True, "port": health_port},
    )
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
    terminated = False  # a second SIGTERM would make it exit at once
    try:
        await fake.wait_connected(timeout=120)
        await fake.wait_for_request(lambda request: request.method == "PUT", timeout=30)  # commands synced
        async with asyncio.timeout(30):  # ready once the guilds are in (discord.py waits for them briefly)
            while (await _get(health_port, "/readyz"))[0] != 200:
                await asyncio.sleep(0.1)
        status, metrics = await _get(health_port, "/metrics")
        assert status == 200 and "qwenbot_model_load_seconds " in metrics
        data = png_bytes()
        slow = fake.add_file("cat.png", data, "image/png", delay=2.0)
        attachment = fake.attachment(slow, "cat.png", len(data), "image/png")
        question = await fake.send_message(
            channel, alice, f"{fake.bot.mention} what is this?", attachments=[attachment]
        )
        await fake.wait_for_request(lambda request: request.path.endswith(f"/channels/{channel}/typing"))
        # Stopped while that answer waits for its image: it is still delivered before the bot disconnects,
        # and a question arriving meanwhile is told to come back.
        process.send_signal(signal.SIGTERM)
        terminated = True
        await asyncio.sleep(0.5)
        await fake.send_message(channel, alice, f"{fake.bot.mention} still there?")
        told = await fake.wait_for_message(channel, lambda m: m["content"] == EngineStopped.user_message)
        reply = await fake.wait_for_message(
            channel,
            lambda m: _replies_to(m, question) and m["content"] != EngineStopped.user_message,
            timeout=60,
        )
        assert reply["content"].strip() and told["id"] != reply["id"]
        assert (tmp_path / "data" / "bot.sqlite3").is_file()
    finally:
        if process.returncode is None and not terminated:
            process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        await fake.close()
    log = output.decode()
    assert process.returncode == 0, log[-3000:]
    assert "applying database migrations" in log
    assert "finishing 1 answers in progress" in log
    # The first question came while the guild was still being cached: it is still a guild message, not a DM.
    assert f"in discord:{guild_id}:{channel}:{channel}" in log and "in discord:0:" not in log
    assert TOKEN not in log
    assert f"serving /metrics, /healthz and /readyz on http://127.0.0.1:{health_port}" in log
    try:
        await _get(health_port, "/healthz")
    except aiohttp.ClientConnectionError:
        pass  # stopped with the bot
    else:
        raise AssertionError("the health endpoints outlived the bot")


async def _run(config: Path, token: str, *args: str) -> tuple[int, str]:
    """`python -m bot ARGS... --config FILE` (the option after the command, as users type it)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        *args,
        "--config",
        str(config),
        cwd=ROOT,
        env={**os.environ, "DISCORD_TOKEN": token},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    return process.returncode or 0, output.decode()


async def test_a_wrong_token_is_told_before_the_model_loads(tmp_path: Path) -> None:
    fake = FakeDiscord(token=TOKEN)
    await fake.start()
    try:
        # No model there: loading it would fail with another error, and take long with a real one.
        config = write_tiny_config(
            tmp_path / "config.toml",
            tmp_path / "no-model-here",
            tmp_path / "data",
            discord={"api_base_url": fake.api_base_url},
        )
        status, output = await _run(config, "not-the-token", "run")
    finally:
        await fake.close()
    assert status == 2, output
    assert "Configuration error: Discord rejected the bot token: check DISCORD_TOKEN" in output
    assert "loading model" not in output and "Traceback" not in output
    assert "not-the-token" not in output


async def test_a_health_port_in_use_is_told_before_the_model_loads(tmp_path: Path) -> None:
    fake = FakeDiscord(token=TOKEN)
    await fake.start()
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            config = write_tiny_config(
                tmp_path / "config.toml",
                tmp_path / "no-model-here",
                tmp_path / "data",
                discord={"api_base_url": fake.api_base_url},
                metrics={"enabled": True, "port": port},
            )
            status, output = await _run(config, TOKEN, "run")
    finally:
        await fake.close()
    assert status == 2, output
    assert f"Configuration error: metrics: cannot listen on 127.0.0.1:{port}: " in output
    assert "loading model" not in output and "Traceback" not in output


async def test_an_unreachable_discord_is_one_sentence(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_tiny_config(
        tmp_path / "config.toml",
        tmp_path / "no-model-here",
        tmp_path / "data",
        discord={"api_base_url": f"http://127.0.0.1:{port}/api/v10"},
    )
    for command in ("run", "sync-commands"):
        status, output = await _run(config, TOKEN, command)
        errors = [line for line in output.splitlines() if line.startswith("Error:")]
        assert status == 1, output
        assert len(errors) == 1 and f"cannot reach Discord at http://127.0.0.1:{port}/api/v10" in errors[0]
        assert "Traceback" not in output and "loading model" not in output


async def _start_bot(config: Path, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as output:
        return await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bot", "--config", str(config), "run"),
            cwd=ROOT,
            env={**os.environ, "DISCORD_TOKEN": TOKEN},
            stdout=output,
            stderr=output,
        )


async def test_a_second_signal_exits_at_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    fake = FakeDiscord(token=TOKEN)
    _guild, (channel,), _ = fake.add_guild("Guild", ["general"], ())
    alice = fake.add_user("alice")
    await fake.start()
    config = write_tiny_config(
        tmp_path / "config.toml",
        tiny_model_dir,
        tmp_path / "data",
        discord={"api_base_url": fake.api_base_url, "sync_commands_on_start": False},
        media={"allowed_hosts": ["127.0.0.1"]},
        engine={"shutdown_grace_seconds": 600.0},
    )
    log = tmp_path / "bot.log"
    process = await _start_bot(config, log)
    try:
        await fake.wait_connected(timeout=120)
        data = png_bytes()
        slow = fake.add_file("cat.png", data, "image/png", delay=15)  # the answer outlasts the test
        attachment = fake.attachment(slow, "cat.png", len(data), "image/png")
        await fake.send_message(channel, alice, f"{fake.bot.mention} what is this?", attachments=[attachment])
        await fake.wait_for_request(lambda request: request.path.endswith(f"/channels/{channel}/typing"))
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):  # the first signal is handled: the shutdown waits for that answer
            while "received SIGTERM; finishing 1 answers" not in log.read_text():
                await asyncio.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(process.wait(), timeout=60)
        await fake.close()
    assert status == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert "received SIGTERM again; exiting now" in log.read_text()


async def test_a_shutdown_while_discord_is_unreachable_does_not_wait_for_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    fake = FakeDiscord(token=TOKEN)
    fake.add_guild("Guild", ["general"], ())
    await fake.start()
    config = write_tiny_config(
        tmp_path / "config.toml",
        tiny_model_dir,
        tmp_path / "data",
        discord={"api_base_url": fake.api_base_url, "sync_commands_on_start": False},
        engine={"shutdown_grace_seconds": 2.0},
    )
    log = tmp_path / "bot.log"
    process = await _start_bot(config, log)
    try:
        await fake.wait_connected(timeout=120)
    finally:
        await fake.close()  # gateway and REST gone: discord.py backs off and reconnects, up to minutes apart
    async with asyncio.timeout(60):
        while "Attempting a reconnect" not in log.read_text():
            await asyncio.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), timeout=60) == 0, log.read_text()[-3000:]
    assert "disconnected from Discord" in log.read_text()
