"""`craft-ray config show` covers every key of every stage; `config validate` checks a file
without running anything."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from craft_ray.cli import app
from craft_ray.config.doc import describe, sections, show

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.mark.parametrize("stage", ["embed", "retrieve", "generate", "filter", "train", "sweep",
                                   "evaluate", "judge", "train-retriever"])
def test_show_lists_every_key_of_every_stage_with_a_description(stage: str):
    model, _ = sections()[stage]
    docs = {d.key: d for d in describe(model, f"{stage}.")}
    for name, field in model.model_fields.items():  # every top-level key of the section
        key = f"{stage}.{name}"
        assert key in docs, key
        assert docs[key].description == " ".join((field.description or "").split())
        assert docs[key].description, f"{key} has no description"
    for sub_key in [k for k in docs if k.count(".") > 1]:
        assert docs[sub_key].description, f"{sub_key} has no description"
    text = show(stage)
    assert text.startswith(f"# {stage}:") and all(f"\n{k}: " in text for k in docs)


def test_show_resolves_nested_models_defaults_and_required_keys():
    docs = {d.key: d for d in describe(sections()["embed"][0], "embed.")}
    assert docs["embed.corpora"].default == "required"
    assert docs["embed.corpora[].min_chars"].default == "200"
    assert docs["embed.corpora[].format"].type.startswith("one of 'c4'")
    gen = {d.key: d for d in describe(sections()["generate"][0], "generate.")}
    # A custom task (CustomTaskConfig) and its field list are documented under generate.task.
    assert "generate.task.meta_instruction" in gen and "generate.task.fields[].min_chars" in gen
    common = {d.key for d in describe(sections()["common"][0])}
    assert {"run_dir", "ray.address", "ray.num_cpus"} <= common


def test_cli_show_all_validate_and_help_pointer(tmp_path: Path):
    r = runner.invoke(app, ["config", "show"])
    assert r.exit_code == 0
    heads = re.findall(r"^# ([a-z-]+):", r.output, flags=re.M)
    assert heads == list(sections())
    r = runner.invoke(app, ["config", "show", "nope"])
    assert r.exit_code == 2 and "choose one of" in r.output
    r = runner.invoke(app, ["config", "validate", str(ROOT / "configs" / "demo.yaml")])
    assert r.exit_code == 0 and "stages it runs: embed, retrieve, generate" in r.output
    bad = tmp_path / "bad.yaml"
    demo = (ROOT / "configs" / "demo.yaml").read_text()
    bad.write_text(re.sub(r"(?m)^  k: \d+", "  k: -3", demo).replace("  mode: mixed",
                                                                     "  mdoe: mixed"))
    r = runner.invoke(app, ["config", "validate", str(bad)])
    assert r.exit_code == 2
    assert "retrieve.k: Input should be greater than or equal to 1" in r.output
    assert "retrieve.mdoe: unknown key (typo?); `craft-ray config show retrieve`" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "runs").exists()
    r = runner.invoke(app, ["config", "validate", str(ROOT / "configs" / "demo.yaml"),
                            "--set", "generate.backend=nope"])
    assert r.exit_code == 2 and "generate.backend" in r.output
    for stage in ["embed", "retrieve", "generate", "filter", "train", "sweep", "evaluate",
                  "judge"]:
        r = runner.invoke(app, [stage, "--help"])
        flat = " ".join(r.output.replace("\u2502", " ").split())  # rich's box edges out
        assert "`craft-ray config show STAGE`; check a file: `craft-ray config validate" in \
            flat, stage
