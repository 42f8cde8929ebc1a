"""The judge stage: results from a custom judge, and the CLI on the hf backend."""

from __future__ import annotations

import pytest

INS = [f"Summarise text {i}." for i in range(200)]
REF = [f"reference summary {i}" for i in range(200)]
CAND = [f"MODEL summary {i}" for i in range(200)]


def _write_preds(path, n=6):
    import json

    path.write_text("".join(json.dumps({"instruction": INS[i], "reference": REF[i],
                                        "prediction": CAND[i]}) + "\n" for i in range(n)))


def test_run_judge_writes_results_with_a_custom_judge(tmp_path):
    import json

    from craft_ray.stages.judge.config import JudgeConfig, JudgeStageConfig
    from craft_ray.stages.judge.stage import run_judge

    _write_preds(tmp_path / "preds.jsonl", n=20)
    cfg = JudgeStageConfig(run_dir=str(tmp_path / "run"), judge=JudgeConfig(
        input_path=str(tmp_path / "preds.jsonl"), judge={"model": "unused"}))
    stats = run_judge(cfg, generate=lambda ps: ["Output (2)"] * len(ps))
    res = json.loads((tmp_path / "run/evaluate/judge/judge/results.json").read_text())
    rows = (tmp_path / "run/evaluate/judge/judge/judgements.jsonl").read_text().splitlines()
    assert len(rows) == 20 and res["n"] == 20
    assert res["wins"] == 20 - res["swapped"] and stats["win_rate"] == res["win_rate"]
    with pytest.raises(ValueError, match="lacks"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"instruction": "x"}\n')
        run_judge(cfg.model_copy(update={"judge": cfg.judge.model_copy(
            update={"input_path": str(bad), "name": "bad"})}))


def test_judge_cli_on_the_hf_backend(ray_local, tmp_path):
    """The judge served by the generate stage's hf backend (a tiny random LM: its answers are
    noise, so this checks the wiring: one answer per item, every item accounted for)."""
    import json

    from typer.testing import CliRunner

    from craft_ray.cli import app
    from craft_ray.models.tiny import build_tiny_causal_lm

    build_tiny_causal_lm(tmp_path / "judge_lm")
    _write_preds(tmp_path / "preds.jsonl", n=4)
    cfg = {"run_dir": str(tmp_path / "run"), "judge": {
        "input_path": str(tmp_path / "preds.jsonl"), "name": "tiny",
        "judge": {"backend": "hf", "model": str(tmp_path / "judge_lm"), "max_new_tokens": 4,
                  "hf": {"batch_size": 4, "generate_batch_size": 4}}}}
    (tmp_path / "j.yaml").write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["judge", "--config", str(tmp_path / "j.yaml")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "run/evaluate/judge/tiny/results.json").read_text())
    assert out["n"] == 4
    assert out["wins"] + out["losses"] + out["ties"] + out["unparsable"] == 4
    rows = [json.loads(x) for x in
            (tmp_path / "run/evaluate/judge/tiny/judgements.jsonl").read_text().splitlines()]
    assert all(isinstance(r["judge_answer"], str) for r in rows)
    assert any(r["judge_answer"] for r in rows)  # the backend really generated text


def test_failed_judge_requests_keep_the_backends_reason(ray_local, tmp_path):
    """An openai judge whose server is gone (the check before work turned off): every request
    fails; each judgement row and the stats say why, instead of a bare 'unparsable'."""
    import json
    import socket

    from craft_ray.stages.judge.config import JudgeStageConfig
    from craft_ray.stages.judge.stage import run_judge

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _write_preds(tmp_path / "preds.jsonl", n=3)
    cfg = JudgeStageConfig.model_validate({"run_dir": str(tmp_path / "run"), "judge": {
        "input_path": str(tmp_path / "preds.jsonl"), "name": "gone", "judge": {
            "backend": "openai", "model": "m", "max_new_tokens": 4, "openai": {
                "base_url": f"http://127.0.0.1:{port}/v1", "preflight": False,
                "max_retries": 1, "backoff_s": 0.01, "timeout_s": 5}}}})
    stats = run_judge(cfg)
    rows = [json.loads(x) for x in
            (tmp_path / "run/evaluate/judge/gone/judgements.jsonl").read_text().splitlines()]
    assert [r["judge_error"] for r in rows] == ["Connection failed after retries."] * 3
    assert all("attempts" in r["judge_error_detail"] for r in rows)
    res = json.loads((tmp_path / "run/evaluate/judge/gone/results.json").read_text())
    assert res["judge_errors"] == {"Connection failed after retries.": 3}
    assert stats["rejects"] == {"judge_backend_error: Connection failed after retries.": 3,
                                "tie": 0, "unparsable": 0}
