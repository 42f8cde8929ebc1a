"""`ray job submit` of the job entrypoints against a real local head (`ray start --head`).

Ray 2.60 turns token authentication on for such a head; the job CLI sends the token when
RAY_AUTH_MODE=token is set. The head is stopped by killing its process group, never with
`ray stop` (that would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import shared_data

ROOT = Path(__file__).resolve().parents[1]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are chosen (a port
    freed at once can be handed out again by the next bind; that once gave two Ray
    components the same port)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    return env


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real head node on free ports; yields the job (dashboard) address."""
    tmp = tmp_path_factory.mktemp("rayhead")
    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port",
             "node-manager-port", "object-manager-port")
    gcs, dash, *agent_ports = _free_ports(2 + len(flags))
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
           f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
           "--num-cpus=2", f"--temp-dir={tmp}", "--disable-usage-stats",
           # Every agent on its own free port: the defaults (e.g. 52365) clash with any other
           # Ray on the machine, such as the test session's own.
           *(f"--{flag}={port}" for flag, port in zip(flags, agent_ports))]
    log = (tmp / "head.log").open("w")
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited: {(tmp / 'head.log').read_text()[-3000:]}")
            r = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list",
                                "--address", address], env=_env(), capture_output=True,
                               text=True)
            if r.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail("the local head did not come up in 120 s")
        yield address
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the head already exited (its log is in the failure)
            pass
        proc.wait(timeout=30)
        log.close()


def submit(address: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir .` from the project root; waits for the job.

    A submission whose connection drops before a job was created (the dashboard's job agent
    can lag behind `ray job list` on a loaded machine) is tried again, at most 5 times.
    """
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
           "--working-dir", ".", "--", "python", *args]
    for attempt in range(5):
        r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=timeout)
        out = r.stdout + r.stderr
        transient = "ConnectionError" in out or "No available agent" in out
        if r.returncode == 0 or not transient or "raysubmit_" in out:
            return r
        time.sleep(10 * (attempt + 1))
    return r


def test_submit_embed_job(ray_head: str, tmp_path: Path):
    coffee = shared_data("stackexchange/coffee.stackexchange.com")
    cfg = tmp_path / "embed.yaml"
    cfg.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"),
        "embed": {"corpora": [{"name": "stackexchange", "format": "stackexchange",
                               "paths": [str(coffee)]}],
                  "max_seq_length": 64},
    }))
    r = submit(ray_head, "jobs/embed.py", "--config", str(cfg))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "succeeded" in r.stdout + r.stderr
    stats = json.loads((tmp_path / "run" / "embed" / "stats.json").read_text())
    assert stats["rows_out"] == 224 and stats["rejects"] == {"too_short": 1}
    assert (tmp_path / "run" / "embed" / "_SUCCESS").is_file()
    assert (tmp_path / "run" / "embed" / "embeddings.h5").is_file()


def test_unreachable_address_is_one_clear_error(tmp_path: Path):
    cfg = tmp_path / "embed.yaml"
    cfg.write_text(yaml.safe_dump({"embed": {"corpora": [
        {"name": "x", "format": "text", "paths": [str(tmp_path)]}]}}))
    (tmp_path / "a.txt").write_text("x" * 300)
    r = subprocess.run([sys.executable, "-m", "craft_ray", "embed", "--config", str(cfg),
                        "--address", f"127.0.0.1:{_free_ports(1)[0]}"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "cannot reach a Ray cluster" in r.stderr


@pytest.mark.slow
def test_submit_demo_job(ray_head: str, tmp_path: Path):
    """The whole offline demo as a Ray job: every stage finishes, outputs and report exist."""
    run = tmp_path / "demo"
    r = submit(ray_head, "jobs/demo.py", "--set", f"run_dir={run}", timeout=1500)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    for stage in ["embed", "retrieve", "generate", "filter", "evaluate"]:
        assert (run / stage / "_SUCCESS").is_file(), stage
    assert (run / "train" / "S-seed1234" / "adapter" / "adapter_config.json").is_file()
    assert (run / "filter" / "datasets" / "S" / "hf").is_dir()
    results = json.loads((run / "evaluate" / "stats.json").read_text())
    assert results["rows_out"] == 80  # 2 models x 40 bundled MedQA questions
    assert "Demo finished" in r.stdout + r.stderr
    assert (run / "report.html").is_file()
