"""The console: quiet library logs, one progress line per stage, a closing table, summary.json
(stdout JSON only with --json), user errors without a traceback."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from craft_ray import console
from craft_ray.cli import app

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def _record(msg: str, name: str = console.PROGRESS_LOGGER) -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, msg, None, None)


def test_progress_line_keeps_only_the_total_named_after_the_stage():
    f = console.ProgressLine()
    console.ProgressLine.begin("generate")
    console.ProgressLine.started -= 100  # the stage has run for 100 s
    assert not f.filter(_record("======= Running Dataset: ds_1 ======="))
    assert not f.filter(_record("MapBatches(HFGenerator): 0/1"))
    rec = _record("Total Progress: 50/250")
    assert f.filter(rec)
    assert not f.filter(_record("Total Progress: 51/250"))  # at most one line per 20 s
    msg = rec.getMessage()
    # ~100 s elapsed (a little more: reading the counters takes a moment)
    assert re.match(r"generate: 50/250 done \(20%\), 0\.(5|49\d)/s, ETA 6m[34]\ds, ", msg), msg
    assert msg.endswith("elapsed")
    assert console.progress_text("embed", 0, None, 62) == "embed: running, 1m02s elapsed"
    assert console.progress_text("embed", 1, 2, 600).startswith("embed: 1/2 done (50%), 0.1/min")


def test_progress_text_takes_the_stages_own_counts():
    # the stage counts its items itself: they replace Ray Data's 0/1 of a single big batch
    line = console.progress_text("generate", 0, 1, 100.0,
                                 {"done": 30, "total": 120, "unit": "generations",
                                  "tokens": 5400, "rejects": 3})
    assert line == ("generate: 30/120 generations (25%), 0.3/s, ETA 5m00s, 54 tok/s, "
                    "3 rejects so far, 1m40s elapsed")
    # counted items without a total (embed's documents) beside Ray Data's shards
    assert console.progress_text("embed", 2, 8, 10.0, {"done": 500, "unit": "docs"}) == (
        "embed: 2/8 done (25%), 0.2/s, ETA 30s, 500 docs (50/s), 10s elapsed")
    assert console.progress_text("embed", 0, None, 10.0, {"done": 500, "unit": "docs"}) == (
        "embed: 500 docs (50/s), 10s elapsed")
    # the first batch of generations still running: tokens/s, no rate of items yet
    assert console.progress_text("generate", 0, 1, 60.0,
                                 {"total": 12, "unit": "generations", "tokens": 600}) == (
        "generate: 0/12 generations (0%), 10 tok/s, 1m00s elapsed")
    # nothing done yet, but rejects already: a heartbeat that says so
    assert console.progress_text("embed", 0, None, 5.0, {"rejects": 2}) == (
        "embed: running, 2 rejects so far, 5s elapsed")


def test_noise_filter_drops_known_harmless_warnings_only():
    f = console.NoiseFilter()
    assert not f.filter(_record("Failed to query Ray Train Controller actor state. State API"))
    assert not f.filter(_record("Token authentication is enabled for this Ray cluster. Set"))
    assert f.filter(_record("filter: 3 clean samples"))


def test_summary_json_merges_stages_and_the_table_rows(tmp_path: Path):
    console.write_summary(tmp_path, {"embed": {"stage": "embed", "rows_in": 10, "rows_out": 9,
                                               "rejects_total": 1, "seconds": 2.5,
                                               "store": "/x/store"}})
    path = console.write_summary(tmp_path, {"retrieve": {"skipped": True},
                                            "report": "/x/report.html"})
    data = json.loads(Path(path).read_text())
    assert set(data["stages"]) == {"embed", "retrieve"} and data["report"] == "/x/report.html"
    rows = console.stage_rows(data["stages"], tmp_path)
    assert rows[0] == ["embed", "10", "9", "1", "2.5", "/x/store"]
    assert rows[1][:2] == ["retrieve", "-"] and rows[1][4] == "skipped"


def test_global_flags_anywhere_and_errors_without_traceback(tmp_path: Path):
    runner = CliRunner()
    r = runner.invoke(app, ["config", "show", "common", "--verbose"])
    assert r.exit_code == 0 and "run_dir:" in r.output
    # An unreachable cluster: the message and exit 2, no traceback (and no Ray started).
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nembed:\n  corpora:\n"
                   f"    - {{name: se, format: stackexchange, paths: [{DATA / 'stackexchange'}]}}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "craft_ray", "embed", "--config", str(cfg),
                        "--address", "127.0.0.1:1"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: cannot reach a Ray cluster")
    assert "Traceback" not in p.stderr and p.stdout == ""


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, tiny_causal_lm):
    """A small whole-pipeline run through the real CLI: 40 documents, 2 few-shots, the tiny
    LM as generator (embed, retrieve, generate, filter)."""
    tmp = tmp_path_factory.mktemp("quick")
    import xml.etree.ElementTree as ET

    rows = ET.parse(DATA / "stackexchange" / "coffee.stackexchange.com" / "Posts.xml").getroot()
    docs = [r.get("Body", "") for r in rows if len(r.get("Body", "")) > 300][:40]
    (tmp / "corpus").mkdir()
    (tmp / "corpus" / "part0.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in docs))
    shots = DATA / "fewshots" / "medqa.jsonl"
    (tmp / "quick.yaml").write_text(f"""\
run_dir: runs/quick
ray: {{num_cpus: 2}}
embed:
  corpora: [{{name: coffee, format: jsonl, paths: [{tmp / 'corpus'}]}}]
  max_seq_length: 64
retrieve:
  fewshots: {{path: {shots}, limit: 2}}
  k: 3
generate:
  task: medqa
  fewshots: {{path: {shots}, limit: 2}}
  backend: hf
  model: {tiny_causal_lm}
  num_shots: 1
  fewshot_text_max_chars: 300
  max_prompt_tokens: 1000
  max_new_tokens: 160
  guided_decoding: true
  guided_max_string_chars: 60
filter:
  task: medqa
  fewshots: {{path: {shots}, limit: 2}}
  datasets: {{sizes: {{S: 4}}}}
""")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "craft_ray", "run", "--config", "quick.yaml"],
                       cwd=tmp, capture_output=True, text=True, env=env, timeout=1800)
    return tmp, p, env


@pytest.mark.slow  # ~6 min on a loaded 2-core machine (Ray start, embed, tiny-LM generation)
def test_quick_pipeline_output_is_short_and_ends_with_the_stage_table(quick_run):
    tmp, p, _ = quick_run
    assert p.returncode == 0, p.stderr[-3000:]
    lines = (p.stdout + p.stderr).splitlines()
    assert len(lines) <= 150, "\n".join(lines)
    assert max(len(line) for line in lines) <= 400
    assert "Traceback" not in p.stderr
    assert p.stdout == ""  # the JSON summary only with --json
    tail = p.stderr.splitlines()
    table = [t for t in tail if t.split()[:1] and t.split()[0] in
             ("embed", "retrieve", "generate", "filter")]
    assert [t.split()[0] for t in table] == ["embed", "retrieve", "generate", "filter"]
    assert any(t.startswith("summary: ") for t in tail)
    assert any(t.startswith("report: ") and t.endswith("report.html") for t in tail)
    summary = json.loads((tmp / "runs" / "quick" / "summary.json").read_text())
    assert set(summary["stages"]) == {"embed", "retrieve", "generate", "filter"}
    assert summary["stages"]["embed"]["rows_out"] == 40


@pytest.mark.slow
def test_rerun_with_json_prints_the_summary_on_stdout(quick_run):
    tmp, _, env = quick_run
    p = subprocess.run([sys.executable, "-m", "craft_ray", "run", "--config", "quick.yaml",
                        "--json"], cwd=tmp, capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert out["embed"] == {"skipped": True} and out["report"].endswith("report.html")


def test_a_user_error_is_found_behind_wrappers_and_other_errors_are_one_line(tmp_path: Path):
    from craft_ray.cli import user_error_in
    from craft_ray.store.corpus import CorpusError

    user = CorpusError("1 of 2 records were malformed (50.0% > max_error_rate=0.1)")
    try:
        try:
            raise user
        except CorpusError as exc:
            raise RuntimeError("task failed") from exc
    except RuntimeError as wrapped:
        assert user_error_in(wrapped) is user

    class TaskError(Exception):  # like ray.exceptions.RayTaskError: the cause in .cause
        cause = user
    assert user_error_in(TaskError()) is user
    assert user_error_in(ValueError("a bug")) is None
    line = console.error_line(KeyError("doc_id"), tmp_path)
    assert line.startswith("error: KeyError: 'doc_id' (full traceback in ")
    assert (tmp_path / "error.log").read_text().startswith("KeyError")
    assert "\n" not in line
