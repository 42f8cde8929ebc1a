"""Config loading: YAML + dotted overrides, one clear error naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from craft_ray.config import ConfigError, apply_overrides, config_hash, load_config
from craft_ray.stages.embed.config import EmbedStageConfig


def test_overrides_set_nested_keys_and_list_items():
    data = {"embed": {"corpora": [{"name": "a", "paths": ["x"]}], "batch_size": 1}}
    out = apply_overrides(data, ["embed.batch_size=256", "embed.corpora.0.paths=[y, z]",
                                 "ray.address=auto", "embed.fp16=false"])
    assert out["embed"]["batch_size"] == 256 and out["embed"]["fp16"] is False
    assert out["embed"]["corpora"][0]["paths"] == ["y", "z"]
    assert out["ray"] == {"address": "auto"}
    assert data["embed"]["batch_size"] == 1  # input untouched
    for bad, msg in [("embed.batch_size", "key=value"), ("embed..x=1", "empty key"),
                     ("embed.corpora.5.name=b", "not an index"),
                     ("embed.batch_size.x=1", "not a mapping")]:
        with pytest.raises(ConfigError, match=msg):
            apply_overrides(data, [bad])


def test_load_validates_and_names_every_bad_key(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("run_dir: r\nembed:\n  corpora: [{name: se, format: stackexchange, paths: [d]}]\n"
                 "  batch_size: 0\n  modle: x\n")
    with pytest.raises(ConfigError) as exc:
        load_config(EmbedStageConfig, p)
    msg = str(exc.value)
    assert "embed.batch_size: Input should be greater than or equal to 1 (got 0)" in msg
    assert "embed.modle: unknown key" in msg
    p.write_text(p.read_text().replace("  modle: x\n", ""))
    cfg = load_config(EmbedStageConfig, p, ["embed.batch_size=8"])
    assert cfg.embed.batch_size == 8 and cfg.run_dir == "r"


def test_missing_or_non_mapping_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(EmbedStageConfig, tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(EmbedStageConfig, tmp_path / "list.yaml")


def test_config_hash_is_stable_and_sensitive(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("embed:\n  corpora: [{name: se, format: stackexchange, paths: [d]}]\n")
    a = load_config(EmbedStageConfig, p)
    b = load_config(EmbedStageConfig, p)
    c = load_config(EmbedStageConfig, p, ["embed.batch_size=7"])
    assert config_hash(a.embed) == config_hash(b.embed) != config_hash(c.embed)


def test_a_stage_reads_its_section_of_a_whole_pipeline_yaml(tmp_path: Path):
    from craft_ray.stages.retrieve.config import RetrieveStageConfig

    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    cfg = load_config(RetrieveStageConfig, demo)
    assert cfg.retrieve.k == 16 and cfg.run_dir == "runs/demo"
    assert load_config(EmbedStageConfig, demo).embed.max_seq_length == 128
    bad = demo.read_text().replace("retrieve:", "retreive:")
    p = tmp_path / "bad.yaml"
    p.write_text(bad)
    with pytest.raises(ConfigError, match="retreive: unknown key"):
        load_config(EmbedStageConfig, p)
