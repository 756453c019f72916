"""The README's set-up commands are the ones CI runs, and they pin the torch build."""

import re
from pathlib import Path

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
