"""The README's set-up commands are the ones CI runs, and they pin the torch build; its systemd unit is the
shipped one."""

import re
from pathlib import Path

from bot.settings import EngineSettings

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(python3 -m venv .+)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_exactly_the_readme_test_command() -> None:
    _install_and_run, install_and_test = _readme_commands()
    assert install_and_test.endswith("python -m pytest")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci_lines


def test_both_commands_pin_torch_and_torchvision() -> None:
    for command in _readme_commands():
        assert "torch==2.14.1 torchvision==0.29.1" in command
    assert "python -m bot run" in _readme_commands()[0]


def test_the_readme_shows_the_shipped_systemd_unit_verbatim() -> None:
    section = (ROOT / "README.md").read_text().split("## Running as a service\n", 1)[1].split("\n## ", 1)[0]
    shown = re.search(r"```ini\n(.*?)```", section, re.DOTALL)
    unit = (ROOT / "deploy" / "qwen-vl-bot.service").read_text()
    assert shown is not None and shown.group(1) == unit
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0] != "#")
    # On SIGTERM answers get the grace period, then the engine gets it again for what is left.
    assert int(settings["TimeoutStopSec"]) > 2 * EngineSettings().shutdown_grace_seconds
    assert settings["ExecStart"].endswith(
        "/.venv/bin/python -m bot run --config /etc/qwen-vl-bot/config.toml"
    )
