"""Sweep aggregation (mean ± std per size and series), Markdown table, plot, CLI."""

from __future__ import annotations

import json
import math

import pytest

from craft_ray.report.plots import aggregate, load_results, markdown_table, plot_vs_size, size_value


def res(model, group, size, seed, acc, eval_set="medqa", n=100):
    return {"model": model, "group": group, "size": size, "seed": seed, "eval_set": eval_set,
            "metric": "accuracy", "accuracy": acc, "n": n, "ci_low": acc - 0.1,
            "ci_high": acc + 0.1}


RESULTS = [
    res("base", "base", None, None, 0.30),
    res("fewshot-s1", "fewshot", None, 1, 0.40), res("fewshot-s2", "fewshot", None, 2, 0.44),
    res("craft-S-1", "craft", "S", 1, 0.50), res("craft-S-2", "craft", "S", 2, 0.70),
    res("craft-XL-1", "craft", "XL", 1, 0.60), res("craft-XL-2", "craft", "XL", 2, 0.62),
    res("craft-M-1", "craft", "M", 1, 0.55),
]


def test_aggregate_mean_std_per_series_and_size():
    rows = aggregate(RESULTS)
    key = {(r["group"], r["size"]): r for r in rows}
    assert set(key) == {("base", None), ("fewshot", None), ("craft", "S"), ("craft", "M"),
                        ("craft", "XL")}
    s = key[("craft", "S")]
    assert s["mean"] == pytest.approx(0.60) and s["runs"] == 2
    assert s["std"] == pytest.approx(math.sqrt(((0.5 - 0.6) ** 2 + (0.7 - 0.6) ** 2) / 1))
    assert key[("craft", "M")]["std"] == 0.0
    assert key[("fewshot", None)]["mean"] == pytest.approx(0.42)
    # sizes in S < M < XL order after the unsized baselines
    assert [r["size"] for r in rows] == [None, None, "S", "M", "XL"]
    table = markdown_table(rows)
    assert "| medqa | craft | S | accuracy | 60.00 ± 14.14 | 2 | 100 |" in table


def test_size_values():
    assert size_value("25k") == 25000 and size_value(500) == 500 and size_value("XL") is None


@pytest.mark.parametrize("sizes", [("S", "XL"), ("100", "25k")])
def test_plot_writes_a_png(tmp_path, sizes):
    rs = [res("base", "base", None, None, 0.3, eval_set=e) for e in ("medqa", "csqa")]
    for sz, acc in zip(sizes, (0.4, 0.6)):
        rs += [res(f"c{sz}{k}", "craft", sz, k, acc + 0.01 * k, eval_set="medqa")
               for k in range(3)]
    png = plot_vs_size(aggregate(rs), tmp_path / "p.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_aggregate_cli_over_result_folders(tmp_path):
    from typer.testing import CliRunner

    from craft_ray.cli import app

    for r in RESULTS:
        d = tmp_path / "runs" / r["model"] / r["eval_set"]
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(r))
    (tmp_path / "runs" / "results.json").write_text(json.dumps(RESULTS))  # summary list: skipped
    assert len(load_results([tmp_path / "runs"])) == len(RESULTS)
    out = tmp_path / "agg"
    res_ = CliRunner().invoke(app, ["aggregate", str(tmp_path / "runs"), "--out", str(out)])
    assert res_.exit_code == 0, res_.output
    assert json.loads(res_.output.strip().splitlines()[-1])["rows"] == 5
    report = (out / "report.md").read_text()
    assert "![metric vs training set size](accuracy.png)" in report
    assert "60.00 ± 14.14" in report and (out / "accuracy.png").is_file()
    res_ = CliRunner().invoke(app, ["aggregate", str(tmp_path / "empty"), "--out", str(out)])
    assert res_.exit_code == 2


def test_aggregate_of_a_run_dir_takes_sizes_from_its_sweep(tmp_path):
    """Results of adapters listed by hand (no size/seed) get them from the sweep's table."""
    from craft_ray.report.plots import run_aggregate
    from tests.stages.evaluate.test_evaluate import fake_sweep

    run = tmp_path / "run"
    fake_sweep(run)
    for trial, acc in (("S-seed1", 0.5), ("S-seed2", 0.7), ("M-seed1", 0.6)):
        d = run / "evaluate" / trial / "medqa"
        d.mkdir(parents=True)
        r = res(trial, "adapter", None, None, acc)
        r["adapter"] = str(run / "train" / trial / "adapter")
        (d / "results.json").write_text(json.dumps(r))
    d = run / "evaluate" / "base" / "medqa"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(res("base", "base", None, None, 0.3)))
    out = run_aggregate([run], tmp_path / "agg")
    assert out["annotated_from_sweep"] == 3 and out["results"] == 4
    rows = {(r["group"], r["size"]): r for r in json.loads(
        (tmp_path / "agg" / "aggregate.json").read_text())}
    assert set(rows) == {("base", None), ("craft", "S"), ("craft", "M")}
    assert rows[("craft", "S")]["mean"] == pytest.approx(0.6) and rows[("craft", "S")][
        "runs"] == 2
