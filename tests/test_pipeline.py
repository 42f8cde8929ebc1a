"""Whole-pipeline resume rules, on real stage markers (no stage is run here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from craft_ray.config import ConfigError, load_config
from craft_ray.pipeline import PipelineConfig, plan, stage_config
from craft_ray.runtime import StageStats

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _cfg(tmp_path: Path, *sets: str) -> PipelineConfig:
    return load_config(PipelineConfig, DEMO, [f"run_dir={tmp_path}", *sets])


def _mark_done(cfg: PipelineConfig) -> None:
    """Write every planned stage's _SUCCESS as the stage itself would."""
    for st, scfg, _ in plan(cfg):
        sdir, hashed = st.marker(scfg)
        sdir.begin(hashed)
        sdir.finish(hashed, StageStats(st.name))


def test_fresh_run_runs_every_configured_stage(tmp_path: Path):
    decisions = {st.name: d for st, _, d in plan(_cfg(tmp_path))}
    assert decisions == {s: "run" for s in
                         ["embed", "retrieve", "generate", "filter", "train", "evaluate"]}


def test_finished_stages_are_skipped_and_a_changed_one_invalidates_the_rest(tmp_path: Path):
    cfg = _cfg(tmp_path)
    _mark_done(cfg)
    assert {d for _, _, d in plan(cfg)} == {"skip"}
    changed = _cfg(tmp_path, "generate.temperature=0.5")
    decisions = [(st.name, d) for st, _, d in plan(changed)]
    assert decisions[:2] == [("embed", "skip"), ("retrieve", "skip")]
    assert decisions[2] == ("generate", "rerun: config of generate changed")
    assert all(d == "rerun: config of generate changed" for _, d in decisions[3:])


def test_from_stage_reruns_it_and_later_stages(tmp_path: Path):
    cfg = _cfg(tmp_path)
    _mark_done(cfg)
    decisions = {st.name: d for st, _, d in plan(cfg, "filter")}
    assert decisions["generate"] == "skip"
    assert decisions["filter"] == decisions["train"] == decisions["evaluate"] == \
        "rerun: --from filter"
    with pytest.raises(ConfigError, match="not a stage"):
        plan(cfg, "nonsense")


def test_sweep_replaces_single_training_and_needs_a_train_section(tmp_path: Path):
    cfg = _cfg(tmp_path, "sweep.seeds=[1, 2]", "sweep.sizes=[S, M]")
    names = [st.name for st, _, _ in plan(cfg)]
    assert "sweep" in names and "train" not in names
    with pytest.raises(ConfigError, match="needs a train section"):
        load_config(PipelineConfig, DEMO, [f"run_dir={tmp_path}", "train=", "sweep.seeds=[1]"])


def test_the_demo_evaluates_the_adapter_of_its_own_run_dir(tmp_path: Path):
    from craft_ray.pipeline import stages

    for run_dir in (str(tmp_path / "elsewhere"), "s3://bucket/runs/demo"):
        cfg = load_config(PipelineConfig, DEMO, [f"run_dir={run_dir}"])
        evaluate = next(st for st in stages() if st.name == "evaluate")
        scfg = stage_config(cfg, evaluate)
        adapters = [m.adapter for m in scfg.evaluate.models if m.adapter]
        assert adapters == [f"{run_dir}/train/S-seed1234/adapter"]
