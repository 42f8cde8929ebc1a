"""Every shipped YAML config loads and validates; each starts with its launch command."""

from __future__ import annotations

from pathlib import Path

import pytest

from craft_ray.config import load_config
from craft_ray.pipeline import PipelineConfig, plan

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_is_a_config_per_craft_task():
    names = {p.stem for p in CONFIGS}
    assert {"bioqa", "csqa", "medqa", "recipegen", "summarization", "demo"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates_and_names_its_command(path: Path, tmp_path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("craft-ray" in first or "ray job submit" in first)
    cfg = load_config(PipelineConfig, path)
    if path.stem in {"bioqa", "csqa", "medqa", "recipegen", "summarization"}:
        # cluster configs keep their data in object storage by default (docs/cluster.md)
        assert cfg.run_dir.startswith("s3://")
        assert all(p.startswith("s3://") for c in cfg.embed.corpora for p in c.paths)
    # plan() reads the stages' markers: a local run directory keeps this test offline
    cfg = cfg.model_copy(update={"run_dir": str(tmp_path)})
    stages = [st.name for st, _, _ in plan(cfg)]
    assert stages, f"{path.name} runs no stage"
    if path.stem in {"bioqa", "csqa", "medqa", "recipegen", "summarization"}:
        assert stages[:4] == ["embed", "retrieve", "generate", "filter"] and "sweep" in stages
        assert cfg.generate.backend == "vllm"
        assert cfg.generate.model == "mistralai/Mistral-7B-Instruct-v0.2"
        assert cfg.train.base_model == "mistralai/Mistral-7B-v0.1"
        assert {c.name for c in cfg.embed.corpora} == {"c4", "wikipedia", "wikihow",
                                                        "stackexchange"}
        assert cfg.generate.task == path.stem
