"""The CLI: every stage listed; user errors are one clear line and exit code 2, before Ray."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from craft_ray.cli import app

runner = CliRunner()


def test_help_lists_the_stages():
    out = runner.invoke(app, ["--help"]).output
    for cmd in ["embed", "run", "report", "export-h5", "bench"]:
        assert cmd in out


def _cfg(tmp_path: Path, **embed: object) -> Path:
    (tmp_path / "a.txt").write_text("x" * 300)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "embed": {
        "corpora": [{"name": "t", "format": "text", "paths": [str(tmp_path / "a.txt")]}],
        **embed}}))
    return p


def test_bad_config_missing_model_and_missing_corpus_are_clear_errors(tmp_path: Path,
                                                                      monkeypatch):
    import craft_ray.runtime

    started: list[object] = []
    monkeypatch.setattr(craft_ray.runtime, "init_ray", lambda *a, **k: started.append(a))
    r = runner.invoke(app, ["embed", "--config", str(_cfg(tmp_path, batch_size=-1))])
    assert r.exit_code == 2 and "embed.batch_size" in r.output
    r = runner.invoke(app, ["embed", "--config", str(_cfg(tmp_path)),
                            "--set", "embed.model=./no/such/model"])
    assert r.exit_code == 2 and "does not exist" in r.output and "embed.model" in r.output
    r = runner.invoke(app, ["embed", "--config", str(_cfg(tmp_path)),
                            "--set", f"embed.corpora.0.paths=[{tmp_path / 'gone'}]"])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["run", "--config", str(_cfg(tmp_path)), "--from", "nope"])
    assert r.exit_code == 2 and "is not a stage" in r.output
    assert started == []  # every error came before Ray would start
    assert not (tmp_path / "run").exists()
