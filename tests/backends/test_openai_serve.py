"""The openai backend against a real OpenAI-compatible server: ``transformers serve`` with
SmolLM2-135M-Instruct on 127.0.0.1 (see conftest.py). Generate and the judge end to end, the
preflight's view of a real model list, and the server killed mid-run (retries, then rejects
with their reason; nothing lost). Few rows, short outputs."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from craft_ray.backends import ERR_CONNECTION
from craft_ray.backends.openai_compat import OpenAIBackendConfig, preflight
from craft_ray.config import ConfigError, load_config
from craft_ray.stages.generate.config import GenerateStageConfig
from craft_ray.stages.generate.stage import run_generate
from tests.conftest import FIXTURES

GEN = FIXTURES / "generate"
FEWSHOTS = Path(__file__).resolve().parents[2] / "data" / "fewshots" / "medqa.jsonl"


def _generate_config(tmp_path: Path, srv, n_docs: int, *extra: str) -> GenerateStageConfig:
    docs = [json.loads(ln) for ln in (GEN / "corpus_samples.jsonl").read_text().splitlines()]
    docs = [dict(d, text=d["text"][:400]) for d in docs if (d.get("text") or "").strip()]
    assert len(docs) >= n_docs
    path = tmp_path / "corpus_samples.parquet"
    pq.write_table(pa.Table.from_pylist(docs[:n_docs]), path)
    return load_config(GenerateStageConfig, None, [
        f"run_dir={tmp_path / 'run'}", "generate.task=medqa", "generate.backend=openai",
        f"generate.model={srv.model}", f"generate.fewshots.path={FEWSHOTS}",
        "generate.fewshots.limit=4", "generate.fewshot_text_max_chars=200",
        f"generate.input_path={path}", "generate.num_shots=1", "generate.max_new_tokens=16",
        f"generate.openai.base_url={srv.url}",
        "generate.openai.send_top_k=false",  # transformers serve answers 422 to top_k
        *extra])


def _outputs(tmp_path: Path) -> tuple[list[dict], list[dict], list[dict]]:
    out = tmp_path / "run" / "generate"
    return tuple(pq.read_table(out / f"{name}.parquet").to_pylist()
                 for name in ("raw", "clean", "rejects"))


def test_preflight_reads_the_real_model_list(transformers_serve, caplog):
    srv = transformers_serve
    cfg = OpenAIBackendConfig(base_url=srv.url)
    assert preflight(cfg, srv.model) == [srv.model]  # served under its folder path
    caplog.set_level("WARNING")
    preflight(cfg, "SmolLM2")
    assert any("generate.model='SmolLM2' is not among the models" in r.message
               for r in caplog.records)
    with pytest.raises(ConfigError, match="answered HTTP 404; .*ending in /v1"):
        preflight(OpenAIBackendConfig(base_url=srv.url[:-3]), srv.model)


def test_generate_with_openai_backend_against_transformers_serve(ray_local, transformers_serve,
                                                                  tmp_path):
    stats = run_generate(_generate_config(tmp_path, transformers_serve, 2))
    raw, clean, rejects = _outputs(tmp_path)
    assert stats["generations"] == len(raw) == 2 == len(clean) + len(rejects)
    assert stats["backend_errors"] == 0
    for r in raw:
        assert r["finish_reason"] in ("stop", "length") and r["text"].strip(), r
        assert r["tokens_in"] > 0 and 0 < r["tokens_out"] <= 16  # the server's usage counts
    assert all(r["reject_reason"] for r in rejects)  # every reject carries its reason
    assert stats["tokens_out"] == sum(r["tokens_out"] for r in raw)


def test_judge_with_openai_backend_against_transformers_serve(ray_local, transformers_serve,
                                                              tmp_path):
    from craft_ray.stages.judge import run_judge
    from craft_ray.stages.judge.config import JudgeStageConfig

    items = [{"instruction": "Name the enzyme that turns starch into maltose during mashing.",
              "reference": "Beta-amylase.", "prediction": "Yeast."},
             {"instruction": "How long does cold brew coffee steep?",
              "reference": "Twelve to eighteen hours.", "prediction": "About half a day."}]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    cfg = JudgeStageConfig.model_validate({"run_dir": str(tmp_path / "run"), "judge": {
        "input_path": str(path), "judge": {
            "backend": "openai", "model": transformers_serve.model, "max_new_tokens": 16,
            "openai": {"base_url": transformers_serve.url, "send_top_k": False}}}})
    stats = run_judge(cfg)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "evaluate" / "judge" / "judge" /
                                      "judgements.jsonl").read_text().splitlines()]
    assert stats["rows_in"] == len(rows) == 2
    for r in rows:
        assert r["judge_answer"], r  # the server answered every judge prompt
        assert (r["verdict"] in ("1", "2", "tie")) == (r["outcome"] != "unparsable")
    results = json.loads((tmp_path / "run" / "evaluate" / "judge" / "judge" /
                          "results.json").read_text())
    assert sum(results[k] for k in ("wins", "losses", "ties", "unparsable")) == 2


def test_server_killed_mid_run_gives_rejects_with_reason(ray_local, start_serve, tmp_path):
    """One request at a time, 2 per second: the server is SIGKILLed once it has answered its
    first; the rest are retried, then rejected as connection failures; raw = clean + rejects."""
    srv = start_serve()
    cfg = _generate_config(tmp_path, srv, 6, "generate.num_shots=0", "generate.openai.qps=2",
                           "generate.openai.max_concurrent_requests=1",
                           "generate.openai.max_retries=1", "generate.openai.backoff_s=0.1",
                           "generate.openai.timeout_s=300", "generate.max_error_rate=1.0")
    answered_before_kill: list[int] = []

    def kill_after_first_answer() -> None:
        deadline = time.monotonic() + 300  # a loaded machine: the first answer can be slow
        while srv.completed_requests() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        srv.kill()
        answered_before_kill.append(srv.completed_requests())

    killer = threading.Thread(target=kill_after_first_answer, daemon=True)
    killer.start()
    stats = run_generate(cfg)
    killer.join(timeout=300)
    raw, clean, rejects = _outputs(tmp_path)
    assert answered_before_kill and 1 <= answered_before_kill[0] < 6
    assert len(raw) == 6 == len(clean) + len(rejects)  # nothing lost
    answered = [r for r in raw if r["finish_reason"] != "error"]
    failed = [r for r in rejects if r["reject_reason"] == ERR_CONNECTION]
    assert len(answered) >= 1 and len(failed) >= 1
    assert len(answered) + len(failed) == 6
    for r in failed:
        assert "2 attempts" in r["error_detail"], r["error_detail"]  # retried once, then gave up
    assert stats["backend_errors"] == len(failed)
    assert stats["generation_rejects"][ERR_CONNECTION] == len(failed)
