"""torch and transformers load only with the in-process engine: the CLI's other commands and a bot on the
server backend never import them. Each command runs as users run it, in a subprocess; at exit the process
reports which heavy modules it had imported.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from tests.discord.harness import TOKEN
from tests.fakediscord.server import FakeDiscord
from tests.inference.server import InferenceServer, free_port
from tests.tiny_settings import write_tiny_config

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "qwen_vl_utils", "torchvision")
MARKER = "HEAVY-MODULES:"
# Runs `python -m bot ARGS...` and, at exit, prints which heavy modules were imported.
REPORTING_LAUNCHER = f"""
import atexit, runpy, sys
atexit.register(lambda: print({MARKER!r}, sorted(m for m in {HEAVY!r} if m in sys.modules), flush=True))
sys.argv = ["bot", *sys.argv[1:]]
runpy.run_module("bot", run_name="__main__", alter_sys=True)
"""


async def launch(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        REPORTING_LAUNCHER,
        *args,
        cwd=ROOT,
        env={**os.environ, "DISCORD_TOKEN": TOKEN},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def finish(process: asyncio.subprocess.Process, timeout: float = 60) -> tuple[int, str, list[str]]:
    """Exit status, output, and the heavy modules the process had imported."""
    output = (await asyncio.wait_for(process.communicate(), timeout))[0].decode()
    reports = [line for line in output.splitlines() if line.startswith(MARKER)]
    assert reports, output[-3000:]
    return process.returncode or 0, output, eval(reports[-1].removeprefix(MARKER))


def server_config(tmp_path: Path, model_dir: Path, fake: FakeDiscord, base_url: str, model: str) -> Path:
    return write_tiny_config(
        tmp_path / "config.toml",
        model_dir,
        tmp_path / "data",
        discord={"api_base_url": fake.api_base_url},
        media={"allowed_hosts": ["127.0.0.1"]},
        engine={"backend": "server"},
        server={"base_url": base_url, "model": model, "connect_timeout_seconds": 1.0},
    )


async def test_help_and_database_commands_never_import_torch(tmp_path: Path) -> None:
    config = write_tiny_config(tmp_path / "config.toml", tmp_path / "no-model", tmp_path / "data")
    for args in (
        ["--help"],
        ["--config", str(config), "db", "upgrade"],
        ["--config", str(config), "db", "purge"],
    ):
        status, output, heavy = await finish(await launch(*args))
        assert status == 0, output
        assert heavy == [], f"{args} imported {heavy}"


async def test_sync_commands_never_imports_torch(tmp_path: Path) -> None:
    fake = FakeDiscord(token=TOKEN)
    await fake.start()
    try:
        config = write_tiny_config(
            tmp_path / "config.toml",
            tmp_path / "no-model",
            tmp_path / "data",
            discord={"api_base_url": fake.api_base_url},
        )
        status, output, heavy = await finish(await launch("--config", str(config), "sync-commands"))
    finally:
        await fake.close()
    assert status == 0 and "Synced 4 commands" in output, output
    assert heavy == []


async def test_a_bot_on_the_server_backend_answers_without_importing_torch(
    tmp_path: Path, tiny_model_dir: Path, inference_server: InferenceServer
) -> None:
    fake = FakeDiscord(token=TOKEN)
    _guild, (channel,), _ = fake.add_guild("Guild", ["general"], ())
    alice = fake.add_user("alice")
    await fake.start()
    config = server_config(tmp_path, tiny_model_dir, fake, inference_server.base_url, inference_server.model)
    process = await launch("--config", str(config), "run")
    answered = False
    try:
        await fake.wait_connected(timeout=60)
        question = await fake.send_message(channel, alice, f"{fake.bot.mention} hello there")
        await fake.wait_for_message(
            channel,
            lambda m: (
                int((m.get("message_reference") or {}).get("message_id", 0)) == int(question["id"])
                and m["content"].strip()
                and not m["content"].startswith(("⏳", "✍️"))
            ),
            timeout=60,
        )
        answered = True
    except TimeoutError:
        answered = False
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        status, output, heavy = await finish(process)
        await fake.close()
    assert answered and status == 0, output[-3000:]
    assert "answering through" in output and heavy == []
    assert TOKEN not in output
    assert "voice will NOT be supported" not in output, "no noise about voice, which the bot never uses"


async def test_run_fails_in_one_sentence_within_seconds_when_the_server_is_never_up(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    fake = FakeDiscord(token=TOKEN)
    await fake.start()
    try:
        config = server_config(tmp_path, tiny_model_dir, fake, f"http://127.0.0.1:{free_port()}/v1", "qwen")
        started = time.monotonic()
        status, output, heavy = await finish(await launch("--config", str(config), "run"))
    finally:
        await fake.close()
    assert status == 1
    assert time.monotonic() - started < 20
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "cannot reach the inference server at http://127.0.0.1:" in errors[0], output
    assert "Traceback" not in output
    assert heavy == []


async def test_doctor_on_the_server_backend_checks_the_server_without_importing_torch(
    tmp_path: Path, tiny_model_dir: Path, inference_server: InferenceServer
) -> None:
    fake = FakeDiscord(token=TOKEN)
    await fake.start()
    try:
        config = server_config(
            tmp_path, tiny_model_dir, fake, inference_server.base_url, inference_server.model
        )
        _status, output, heavy = await finish(await launch("--config", str(config), "doctor"))
    finally:
        await fake.close()
    served = f"✓ Inference server: {inference_server.base_url} serves {inference_server.model!r}"
    assert served in output.splitlines(), output
    assert "Model files" not in output and "GPU" not in output
    assert heavy == []


async def test_doctor_says_when_the_inference_server_is_unreachable(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    fake = FakeDiscord(token=TOKEN)
    await fake.start()
    try:
        base_url = f"http://127.0.0.1:{free_port()}/v1"
        config = server_config(tmp_path, tiny_model_dir, fake, base_url, "qwen")
        started = time.monotonic()
        status, output, heavy = await finish(await launch("--config", str(config), "doctor"))
    finally:
        await fake.close()
    assert status == 1 and time.monotonic() - started < 20
    failed = [line for line in output.splitlines() if line.startswith("✗ Inference server:")]
    assert len(failed) == 1 and f"cannot reach the inference server at {base_url}" in failed[0], output
    assert failed[0].endswith("start it, or fix server.base_url")
    assert heavy == [] and TOKEN not in output
