"""Sweep: a 2 x 2 seed x size grid on Ray Tune finishes, writes its table, resumes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from craft_ray.stages.sweep.config import SweepStageConfig
from craft_ray.stages.sweep.stage import build_table, format_table, trial_stage_config
from tests.conftest import shared_data, write_task_dataset


def test_table_mean_and_sample_std():
    rows = [{"size": "S", "seed": s, "status": "finished", "adapter": f"/a/{s}",
             "eval_loss": v, "train_loss": 1.0} for s, v in ((1, 2.0), (2, 4.0))]
    rows.append({"size": "M", "seed": 1, "status": "failed", "adapter": None})
    table = build_table(rows, ["S", "M"])
    assert table[0]["eval_loss"] == {"mean": 3.0, "std": pytest.approx(2 ** 0.5), "n": 2}
    assert table[0]["adapters"] == {"1": "/a/1", "2": "/a/2"}
    assert table[1]["n"] == 0 and table[1]["failed"] == 1
    md = format_table(table)
    assert "3.0000 ± 1.4142 (n=2)" in md and "| M | - | - | - | 1 |" in md


def test_trial_config_fills_size_and_seed():
    stage = SweepStageConfig.model_validate({
        "run_dir": "r", "train": {"base_model": "m", "dataset_path": "/d/{size}/hf"},
        "sweep": {"seeds": [1, 2], "sizes": ["S", "M"]}})
    t = trial_stage_config(stage, "M", 2).train
    assert (t.seed, t.dataset_size, t.dataset_path, t.name()) == (2, "M", "/d/M/hf", "M-seed2")
    with pytest.raises(ValueError, match="unique"):
        SweepStageConfig.model_validate({"train": {"base_model": "m"},
                                         "sweep": {"seeds": [1, 1]}})


def fails_once(config):
    """Tune function for the test: the first attempt of trial M-seed2 raises (a marker file
    in the run dir remembers it), every other attempt is the real sweep_trial."""
    from craft_ray.stages.sweep.stage import sweep_trial

    marker = Path(config["stage"]["run_dir"]) / "injected-failure-M-seed2"
    if (config["size"], int(config["seed"])) == ("M", 2) and not marker.exists():
        marker.write_text("first attempt of M-seed2 raised\n")
        raise RuntimeError("injected failure of M-seed2's first attempt")
    sweep_trial(config)


def test_two_by_two_sweep_writes_table_and_resumes(ray_local, tiny_lm, tmp_path):
    """Also: a trial whose first attempt raises is retried (sweep.max_failures=1)."""
    from craft_ray.stages.sweep.stage import run_sweep

    run_dir = tmp_path / "run"
    shots = shared_data("craft-fewshots/csqa.jsonl")
    write_task_dataset(run_dir, "S", "csqa", shots, limit=12)
    write_task_dataset(run_dir, "M", "csqa", shots, limit=24)
    cfg = SweepStageConfig.model_validate({
        "run_dir": str(run_dir),
        # half a CPU per worker: two trials train at once on the 2 test CPUs
        "train": {"base_model": str(tiny_lm), "task": "csqa", "num_workers": 1,
                  "cpus_per_worker": 0.5, "torch_threads": 1,
                  "per_device_batch_size": 4, "batch_size": 4, "epochs": 1,
                  "learning_rate": 2e-3, "eval_fraction": 0.25, "lora": {"r": 8}},
        "sweep": {"seeds": [1, 2], "sizes": ["S", "M"], "max_concurrent_trials": 2,
                  "verbose": 0}})
    assert cfg.sweep.max_failures == 1
    stats = run_sweep(cfg, trial_fn=fails_once)
    assert (run_dir / "injected-failure-M-seed2").is_file()  # the first attempt did raise
    assert stats["rows_out"] == 4 and stats["trials_run"] == 4  # ... and the retry finished
    sweep_dir = run_dir / "sweep"
    assert (sweep_dir / "_SUCCESS").is_file()
    table = json.loads((sweep_dir / "table.json").read_text())
    assert [e["size"] for e in table] == ["S", "M"]
    for e in table:
        assert e["n"] == 2 and e["eval_loss"]["n"] == 2 and e["eval_loss"]["std"] > 0
        for seed, adapter in e["adapters"].items():
            assert Path(adapter) == (run_dir / "train" / f"{e['size']}-seed{seed}" /
                                     "adapter").resolve()
            assert (Path(adapter) / "adapter_model.safetensors").is_file()
    # the seeds really trained differently
    s_runs = [json.loads((run_dir / "train" / f"S-seed{s}" / "stats.json").read_text())
              for s in (1, 2)]
    assert s_runs[0]["eval_loss"] != s_runs[1]["eval_loss"]
    results = [json.loads(x) for x in (sweep_dir / "results.jsonl").read_text().splitlines()]
    retried = next(r for r in results if r["trial"] == "M-seed2")
    assert retried["status"] == "finished" and retried["error"] is None
    assert "± " in (sweep_dir / "table.md").read_text()

    weights = sorted((run_dir / "train").glob("*/adapter/adapter_model.safetensors"))
    mtimes = [os.path.getmtime(p) for p in weights]
    again = run_sweep(cfg)
    assert again["trials_skipped_as_complete"] == 4 and again["trials_run"] == 0
    assert [os.path.getmtime(p) for p in weights] == mtimes
    assert json.loads((sweep_dir / "table.json").read_text()) == table
