"""report.html: built from stage outputs, static, rendered in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from craft_ray.report.html import build_report
from craft_ray.runtime import StageDir, StageStats

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def fake_run(run: Path) -> Path:
    """A run directory with the files each stage writes (small, made up here)."""
    from pydantic import BaseModel

    class Cfg(BaseModel):
        x: int = 1

    for name, rows_in, rows_out, rejects in [
        ("embed", 888, 885, {"too_short": 3}),
        ("retrieve", 885, 100, {}),
        ("generate", 100, 80, {"no_json_object": 15, "bad_answer_letter": 5}),
    ]:
        sd = StageDir(run, name)
        sd.begin(Cfg())
        st = StageStats(name, rows_in=rows_in, rows_out=rows_out)
        st.rejects.update(rejects)
        sd.finish(Cfg(), st)
    pq.write_table(pa.table({"corpus": ["stackexchange"] * 70 + ["wiki"] * 30,
                             "score": [0.3 + i / 300 for i in range(100)],
                             "text": ["x" * (200 + 7 * i) for i in range(100)]}),
                   run / "retrieve" / "corpus_samples.parquet")
    pq.write_table(pa.table({"sample_text": ["q" * (50 + i) for i in range(80)]}),
                   run / "generate" / "clean.parquet")
    trial = run / "train" / "S-seed1234"
    trial.mkdir(parents=True)
    trial.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 3.0 / (1 + s / 5)}) + "\n" for s in range(30)))
    ev = run / "evaluate" / "base"
    ev.mkdir(parents=True)
    ev.joinpath("results.json").write_text(json.dumps(
        {"accuracy": 0.25, "n": 40, "model": "tiny", "eval_set": "medqa"}))
    gen = run / "evaluate" / "tiny" / "cnn_dailymail"
    gen.mkdir(parents=True)
    gen.joinpath("results.json").write_text(json.dumps(
        {"metric": "rougeL_f1", "rougeL_f1": 0.1875, "n": 12, "model": "tiny",
         "eval_set": "cnn_dailymail"}))
    return run


def test_report_sections(tmp_path: Path):
    out = build_report(fake_run(tmp_path / "run"))
    page = out.read_text()
    for needle in ["Stages and throughput", "complete", "stackexchange", "70.0%",
                   "no_json_object", "Training loss", "0.250", "data:image/png;base64,",
                   "rougeL_f1", "0.188", "cnn_dailymail"]:
        assert needle in page, needle
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert page.count("<img") >= 4  # scores, 2 length histograms, loss curve


def test_report_on_empty_run_dir(tmp_path: Path):
    page = build_report(tmp_path).read_text()
    assert "No stage has run" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path: Path):
    out = build_report(fake_run(tmp_path / "run"))
    shot = tmp_path / "report.png"
    r = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
         f"--screenshot={shot}", "--window-size=1200,2400", out.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1200, 2400)
    # a rendered page, not a blank one: many distinct grey levels (text, tables, plots)
    assert len(set(img.getdata())) > 50
    shutil.copy(shot, Path("/tmp") / "craft_ray_report.png")
