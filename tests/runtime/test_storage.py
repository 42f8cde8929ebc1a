"""The storage layer on local paths and on a real S3-compatible server (moto's server mode)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from craft_ray.config import ConfigError, StrictModel, load_config
from craft_ray.runtime import StageDir, StageStats, storage


class _Cfg(StrictModel):
    run_dir: str = "runs/x"
    n: int = 1


def test_local_paths_write_through_a_rename_and_list(tmp_path: Path):
    out = tmp_path / "a" / "b.json"
    storage.write_json(out, {"x": 1})
    assert json.loads(out.read_text()) == {"x": 1}
    with pytest.raises(RuntimeError), storage.write_once(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert not (tmp_path / "c.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left behind
    assert storage.list_files(tmp_path, recursive=True) == [str(out)]
    assert storage.join(tmp_path, "a") == str(tmp_path / "a")
    storage.remove(tmp_path / "a")
    assert not storage.exists(tmp_path / "a")


def test_a_uri_mangled_by_path_is_refused_not_written_locally(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(storage.StorageError, match="turned into a local path"):
        StageDir(Path("s3://bucket/run") / "train", "S-seed1")
    assert list(tmp_path.iterdir()) == []


def test_credentials_in_a_uri_are_refused_and_never_printed(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": "s3://AKIAXX:sEcReT@bucket/run"}))
    with pytest.raises(ConfigError, match="must not carry credentials") as err:
        load_config(_Cfg, cfg)
    assert "sEcReT" not in str(err.value) and "AKIAXX" not in str(err.value)
    with pytest.raises(ConfigError, match="must not carry credentials"):
        load_config(_Cfg, None, ["run_dir=s3://bucket/run?secret_key=abc"])
    assert storage.redact("s3://k:s@bucket/p?x=1") == "s3://bucket/p"


def test_files_json_listing_and_removal_on_s3(s3_bucket: str):
    run = f"{s3_bucket}/run"
    storage.write_json(f"{run}/a/stats.json", {"rows": 3})
    storage.write_text(f"{run}/a/b/c.txt", "hello")
    assert storage.read_json(f"{run}/a/stats.json") == {"rows": 3}
    assert storage.is_file(f"{run}/a/b/c.txt") and not storage.is_file(f"{run}/a/b")
    assert storage.exists(f"{run}/a/b") and not storage.exists(f"{run}/nope")
    assert storage.list_files(f"{run}/a") == [f"{run}/a/stats.json"]
    assert storage.list_files(f"{run}/a", ".txt", recursive=True) == [f"{run}/a/b/c.txt"]
    storage.remove(f"{run}/a/b")
    assert storage.list_files(run, recursive=True) == [f"{run}/a/stats.json"]
    storage.remove(f"{run}/a/stats.json")
    assert storage.list_files(run, recursive=True) == []


def test_write_once_uploads_whole_or_nothing_and_local_copy_downloads(s3_bucket: str):
    table = pa.table({"x": [1, 2, 3]})
    with storage.write_once(f"{s3_bucket}/t.parquet") as tmp:
        pq.write_table(table, tmp)
    assert storage.read_table(f"{s3_bucket}/t.parquet").equals(table)
    with pytest.raises(RuntimeError), storage.write_once(f"{s3_bucket}/u.parquet") as tmp:
        pq.write_table(table, tmp)
        raise RuntimeError("killed before the upload")
    assert not storage.exists(f"{s3_bucket}/u.parquet")

    with storage.write_once(f"{s3_bucket}/adapter") as tmp:  # a folder: each file one PUT
        (tmp / "sub").mkdir(parents=True)
        (tmp / "adapter_config.json").write_text("{}")
        (tmp / "sub" / "w.bin").write_bytes(b"\0" * 10)
    local = storage.local_copy(f"{s3_bucket}/adapter")
    assert (local / "adapter_config.json").read_text() == "{}"
    assert (local / "sub" / "w.bin").stat().st_size == 10
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.local_copy(f"{s3_bucket}/no-adapter")


def test_write_parquet_locally_and_on_s3(tmp_path: Path, s3_bucket: str):
    """One Parquet file, written whole, read back the same from a local folder and a bucket."""
    table = pa.table({"doc_id": ["a", "b"], "score": [0.5, 1.0]})
    for where in (str(tmp_path / "out" / "t.parquet"), f"{s3_bucket}/out/t.parquet"):
        storage.write_parquet(where, table)
        assert storage.read_table(where).equals(table), where
        assert storage.list_files(storage.parent(where)) == [where]  # no temporary left


def test_stage_dir_markers_and_rerun_skip_on_s3(s3_bucket: str):
    cfg = _Cfg()
    sd = StageDir(f"{s3_bucket}/run", "embed")
    assert not sd.exists() and not sd.is_complete(cfg)
    sd.begin(cfg)
    assert storage.is_file(sd.file("config.yaml")) and not sd.has_marker()
    stats = StageStats("embed", rows_in=2, rows_out=2)
    sd.finish(cfg, stats)
    assert sd.is_complete(cfg) and sd.read_stats()["rows_out"] == 2
    assert not sd.is_complete(_Cfg(n=2)) and sd.has_marker()  # a changed config is stale
    with pytest.raises(storage.StorageError, match="cannot write to object storage yet"):
        _ = sd.path


def test_missing_bucket_and_unreachable_store_are_one_clear_error(s3_env, monkeypatch):
    with pytest.raises(storage.StorageError, match=r"bucket 'no-such-bucket' does not exist"):
        storage.check_location("s3://no-such-bucket/run")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    storage.clear_cache()
    with pytest.raises(storage.StorageError, match="s3://b/run") as err:
        storage.check_location("s3://b/run")
    assert "AWS_ENDPOINT_URL" in str(err.value)


def test_a_filesystem_shipped_to_ray_workers_carries_no_secret(s3_env, monkeypatch):
    import pickle

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-only-in-the-env")
    storage.clear_cache()
    fs, path = storage.filesystem("s3://bucket/run/embed")
    assert path == "bucket/run/embed"
    # Ray pickles the filesystem into tasks (Ray Data, Ray Train's storage_filesystem): the
    # workers must find their credentials in their own environment, never in the pickle.
    assert b"s3cr3t-only-in-the-env" not in pickle.dumps(fs)
