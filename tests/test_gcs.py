"""gs:// on a GCS emulator (gcp-storage-emulator, see ``gcs_server`` in conftest): the same
storage module as s3:// with another pyarrow filesystem, so the demo pipeline runs with
everything in a gs:// bucket, and a missing bucket is one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from craft_ray.cli import app
from craft_ray.runtime import storage
from tests.test_s3 import _cli, check_demo_in_bucket, demo_in_bucket


def test_gs_files_round_trip_through_the_storage_module(gcs_bucket: str, tmp_path: Path):
    storage.write_text(f"{gcs_bucket}/a/b.txt", "hello")
    assert storage.read_text(f"{gcs_bucket}/a/b.txt") == "hello"
    assert storage.is_file(f"{gcs_bucket}/a/b.txt") and not storage.exists(f"{gcs_bucket}/x")
    storage.append_text(f"{gcs_bucket}/a/b.txt", " world")
    assert storage.read_text(f"{gcs_bucket}/a/b.txt") == "hello world"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.json").write_text("{}")
    storage.upload(tmp_path / "d", f"{gcs_bucket}/up")
    assert storage.list_files(gcs_bucket, recursive=True) == [
        f"{gcs_bucket}/a/b.txt", f"{gcs_bucket}/up/f.json"]
    storage.remove(f"{gcs_bucket}/a")
    assert not storage.exists(f"{gcs_bucket}/a/b.txt")


def test_missing_gcs_bucket_is_one_clear_error_before_ray(gcs_bucket: str, tmp_path: Path,
                                                          monkeypatch):
    import craft_ray.runtime

    started: list[object] = []
    monkeypatch.setattr(craft_ray.runtime, "init_ray", lambda *a, **k: started.append(a))
    r = CliRunner().invoke(app, ["run", "--config", "configs/demo.yaml",
                                 "--set", "run_dir=gs://no-such-bucket-xyz/run"])
    assert r.exit_code == 2, r.output
    assert "gs://no-such-bucket-xyz/run" in r.output and "does not exist" in r.output
    assert started == []


@pytest.mark.slow
def test_demo_pipeline_with_everything_on_gcs(gcs_bucket: str, tiny_causal_lm: Path):
    """`craft-ray run --config configs/demo.yaml --set run_dir=gs://...` with its corpus,
    few-shots, eval set, LM (the tiny random one in place of SmolLM2) and embedder in the
    bucket too: every stage's outputs land in the bucket."""
    from craft_ray.models.embedder import resolve_model

    storage.upload(resolve_model("all-MiniLM-L6-v2"), f"{gcs_bucket}/models/minilm")
    sets = [*demo_in_bucket(gcs_bucket, str(tiny_causal_lm)),
            f"embed.model={gcs_bucket}/models/minilm"]
    proc = _cli(["run", "--config", "configs/demo.yaml", *[a for s in sets for a in ("--set", s)]])
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-6000:]
    check_demo_in_bucket(f"{gcs_bucket}/run")
