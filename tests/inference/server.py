"""A real OpenAI-compatible inference server for tests: `transformers serve` on the tiny model, on 127.0.0.1.

It runs vision requests one at a time, takes images as `data:` URLs and streams on the CPU. The model is
named by its directory, which is also the id `GET /v1/models` lists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT_SECONDS = 180.0


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class InferenceServer:
    """A running `transformers serve`; `base_url` ends in /v1."""

    process: subprocess.Popen[bytes]
    base_url: str
    model: str
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _serve_command() -> list[str]:
    executable = Path(sys.executable).with_name("transformers")
    if executable.exists():
        return [str(executable), "serve"]
    found = shutil.which("transformers")
    if found is None:
        raise RuntimeError("`transformers` CLI not found: install the dev extra (transformers[serving])")
    return [found, "serve"]


def start_inference_server(model_dir: Path, log_path: Path) -> InferenceServer:
    """Start `transformers serve` on `model_dir` (CPU, float32, offline) and wait until it lists the model."""
    port = free_port()
    command = [
        *_serve_command(),
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = log_path.open("wb")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
    )
    server = InferenceServer(process, f"http://127.0.0.1:{port}/v1", str(model_dir), log_path)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"transformers serve exited with {process.returncode}: {log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{server.base_url}/models", timeout=2) as response:
                listed = [entry["id"] for entry in json.load(response)["data"]]
            if server.model in listed:
                return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(
                f"transformers serve not ready in {READY_TIMEOUT_SECONDS:.0f}s: {log_path.read_text()}"
            )
        time.sleep(0.1)
