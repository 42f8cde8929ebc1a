"""Win rate of generated outputs against references with an LLM judge, plus ROUGE-L.

CRAFT's protocol (``run_eval_winrate.py``): reference is "Output (1)", the model's output
"Output (2)"; for a seeded random half of the items the two are swapped, so a judge that
prefers a position cannot fake a win rate; greedy judge with a short answer. A win is the
judge preferring the model's output, wherever it was placed.

CRAFT counted ties and unparsable judgements as losses. Here both are counted separately and
the win rate is reported both ways: ``win_rate`` (CRAFT: wins / all items) and
``win_rate_decided`` (wins / (wins + losses)), plus ``win_rate_ties_half``.

The judge is any text generator ``list[prompt] -> list[text]`` (see :func:`judge_outputs`),
so any generation backend can serve it. Its input and outputs may be local paths or
object-store URIs (``s3://``, ``gs://``), through :mod:`craft_ray.runtime.storage`.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from typing import Any

from craft_ray.judging import backend_generate, judge_outputs, warn_judge_errors
from craft_ray.runtime import StageDir, StageStats, storage
from craft_ray.stages.judge.config import JudgeConfig, JudgeStageConfig


def read_predictions(cfg: JudgeConfig) -> tuple[list[str], list[str], list[str]]:
    """(instructions, references, predictions) from the input file; missing columns fail."""
    path = cfg.input_path
    shown = storage.redact(path)
    if not storage.is_file(path):
        raise FileNotFoundError(f"judge input {shown} does not exist (a .jsonl/.parquet of "
                                "instruction / prediction / reference per item)")
    if str(path).endswith(".parquet"):
        rows = storage.read_table(path).to_pylist()
    else:
        rows = [json.loads(ln) for ln in storage.read_text(path).splitlines() if ln.strip()]
    fields = (cfg.instruction_field, cfg.reference_field, cfg.prediction_field)
    for i, r in enumerate(rows):
        missing = [f for f in fields if f not in r]
        if missing:
            raise ValueError(f"judge input {shown} row {i} lacks {missing}; set "
                             "instruction_field / prediction_field / reference_field")
    rows = rows[: cfg.limit] if cfg.limit else rows
    return ([str(r[cfg.instruction_field]) for r in rows],
            [str(r[cfg.reference_field]) for r in rows],
            [str(r[cfg.prediction_field] or "") for r in rows])


def run_judge(stage_cfg: JudgeStageConfig, *, force: bool = False,
              generate: Callable[[list[str]], list[str]] | None = None) -> dict[str, Any]:
    """Judge the input's predictions; writes judgements.jsonl and results.json.

    ``generate`` replaces the configured backend (tests, custom judges).
    """
    cfg = stage_cfg.judge
    root = cfg.output_dir or storage.join(stage_cfg.run_dir, "evaluate", "judge")
    stage = StageDir(root, cfg.name)
    if not force and stage.is_complete(cfg):
        return stage.read_stats()
    instructions, references, predictions = read_predictions(cfg)
    stage.begin(cfg)
    gen = generate or backend_generate(cfg.judge, cfg.seed)
    summary, rows = judge_outputs(instructions, references, predictions, gen, cfg.seed,
                                  cfg.template)
    storage.write_text(stage.file("judgements.jsonl"),
                       "".join(json.dumps(r) + "\n" for r in rows))
    result = {"model": cfg.name, "eval_set": posixpath.splitext(storage.name(cfg.input_path))[0],
              "judge_model": cfg.judge.model, **summary}
    storage.write_json(stage.file("results.json"), result)
    stats = StageStats("judge", rows_in=len(rows), rows_out=len(rows))
    failed = sum(summary["judge_errors"].values())
    warn_judge_errors(f"judge: {cfg.name}", rows)
    stats.rejects.update({"tie": summary["ties"], "unparsable": summary["unparsable"] - failed})
    stats.rejects.update({f"judge_backend_error: {k}": v
                          for k, v in summary["judge_errors"].items()})
    stats.extra.update({k: summary[k] for k in ("win_rate", "win_rate_decided",
                                                 "win_rate_ties_half", "rougeL_f1")})
    stats.extra["outputs"] = storage.redact(stage.location)
    return stage.finish(cfg, stats)
