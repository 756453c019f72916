"""Regenerate constraints.txt from pyproject.toml with pip's own resolver.

Resolves the project with every extra (dev, postgres) plus the torch pins `.ci/run` installs, and writes
every resolved package at its exact version, so the file holds what the project needs and nothing else.
By default the current pins are kept where they still fit (`-c constraints.txt`); `--upgrade` takes the newest
releases the ranges in pyproject.toml allow. Needs network access to the package index (or its local mirror).

    python scripts/update_constraints.py [--upgrade]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
PROJECT = "qwen-vl-discord-bot"
HEADER = (
    "# Exact versions CI installs (pip -c constraints.txt), resolved from pyproject.toml;\n"
    "# regenerate with: python scripts/update_constraints.py [--upgrade]\n"
)


def torch_pins() -> list[str]:
    """The torch and torchvision pins `.ci/run` (and README) install."""
    pins = re.findall(r"\b(torch(?:vision)?==[\w.+]+)", (ROOT / ".ci" / "run").read_text())
    if len(set(pins)) != 2:
        raise SystemExit(f"expected the torch and torchvision pins in .ci/run, found {pins}")
    return sorted(set(pins))


def resolve(upgrade: bool) -> dict[str, str]:
    """Package name → version, as pip resolves the project with all its extras."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        command = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
            "--report", str(report), *torch_pins(), "-e", ".[dev,postgres]",
        ]  # fmt: skip
        if not upgrade and CONSTRAINTS.is_file():
            command += ["-c", str(CONSTRAINTS)]
        subprocess.run(command, cwd=ROOT, check=True)
        installs = json.loads(report.read_text())["install"]
    return {
        item["metadata"]["name"]: item["metadata"]["version"]
        for item in installs
        if item["metadata"]["name"] != PROJECT
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrade", action="store_true", help="ignore the current pins")
    args = parser.parse_args()
    versions = resolve(args.upgrade)
    lines = [f"{name}=={version}" for name, version in sorted(versions.items(), key=lambda kv: kv[0].lower())]
    CONSTRAINTS.write_text(HEADER + "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pins to {CONSTRAINTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
