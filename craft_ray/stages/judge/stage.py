"""Win rate of generated outputs against references with an LLM judge, plus ROUGE-L.

CRAFT's protocol (``run_eval_winrate.py``): reference is "Output (1)", the model's output
"Output (2)"; for a seeded random half of the items the two are swapped, so a judge that
prefers a position cannot fake a win rate; greedy judge with a short answer. A win is the
judge preferring the model's output, wherever it was placed.

CRAFT counted ties and unparsable judgements as losses. Here both are counted separately and
the win rate is reported both ways: ``win_rate`` (CRAFT: wins / all items) and
``win_rate_decided`` (wins / (wins + losses)), plus ``win_rate_ties_half``.

The judge is any text generator ``list[prompt] -> list[text]`` (see :func:`judge_outputs`),
so any generation backend can serve it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from craft_ray.judging import backend_generate, judge_outputs, warn_judge_errors
from craft_ray.stages.judge.config import JudgeConfig, JudgeStageConfig


def read_predictions(cfg: JudgeConfig) -> tuple[list[str], list[str], list[str]]:
    """(instructions, references, predictions) from the input file; missing columns fail."""
    from pathlib import Path

    path = Path(cfg.input_path)
    if not path.is_file():
        raise FileNotFoundError(f"judge input {path} does not exist (a .jsonl/.parquet of "
                                "instruction / prediction / reference per item)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()
                if ln.strip()]
    fields = (cfg.instruction_field, cfg.reference_field, cfg.prediction_field)
    for i, r in enumerate(rows):
        missing = [f for f in fields if f not in r]
        if missing:
            raise ValueError(f"judge input {path} row {i} lacks {missing}; set "
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
    from pathlib import Path

    from craft_ray.runtime import StageDir, StageStats, atomic_write_json, atomic_write_text

    cfg = stage_cfg.judge
    root = Path(cfg.output_dir) if cfg.output_dir else (
        Path(stage_cfg.run_dir) / "evaluate" / "judge")
    stage = StageDir(root, cfg.name)
    if not force and stage.is_complete(cfg):
        return json.loads((stage.path / "stats.json").read_text())
    instructions, references, predictions = read_predictions(cfg)
    stage.begin(cfg)
    gen = generate or backend_generate(cfg.judge, cfg.seed)
    summary, rows = judge_outputs(instructions, references, predictions, gen, cfg.seed,
                                  cfg.template)
    atomic_write_text(stage.path / "judgements.jsonl",
                      "".join(json.dumps(r) + "\n" for r in rows))
    result = {"model": cfg.name, "eval_set": Path(cfg.input_path).stem,
              "judge_model": cfg.judge.model, **summary}
    atomic_write_json(stage.path / "results.json", result)
    stats = StageStats("judge", rows_in=len(rows), rows_out=len(rows))
    failed = sum(summary["judge_errors"].values())
    warn_judge_errors(f"judge: {cfg.name}", rows)
    stats.rejects.update({"tie": summary["ties"], "unparsable": summary["unparsable"] - failed})
    stats.rejects.update({f"judge_backend_error: {k}": v
                          for k, v in summary["judge_errors"].items()})
    stats.extra.update({k: summary[k] for k in ("win_rate", "win_rate_decided",
                                                 "win_rate_ties_half", "rougeL_f1")})
    stats.extra["outputs"] = str(stage.path)
    return stage.finish(cfg, stats)
