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
from collections.abc import Callable, Sequence
from typing import Any

from craft_ray.backends import run_backend
from craft_ray.models.chat import chat_messages, render_chat
from craft_ray.models.tokenizers import local_ref
from craft_ray.stages.judge.config import JudgeConfig, JudgeModelConfig, JudgeStageConfig
from craft_ray.stages.judge.pairwise import judge_outputs


def judge_rows(prompts: Sequence[str], cfg: JudgeModelConfig, tokenizer: Any | None
               ) -> list[dict[str, Any]]:
    """Prompt rows in the generation backends' input columns (see craft_ray.backends)."""
    rows = []
    for i, p in enumerate(prompts):
        messages = chat_messages(p, cfg.system_prompt)
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            text, ids = render_chat(tokenizer, messages)
        elif tokenizer is not None:
            text = p
            ids = list(tokenizer(text)["input_ids"])
        else:
            text, ids = p, []
        rows.append({"sample_id": f"judge-{i:08d}", "prompt": text, "prompt_token_ids": ids,
                     "messages": json.dumps(messages), "schema": "",
                     "max_new_tokens": cfg.max_new_tokens})
    return rows


def backend_generate(cfg: JudgeModelConfig, seed: int = 0) -> Callable[[list[str]], list[str]]:
    """A ``prompts -> answers`` function running the judge on a generation backend (greedy).

    Ray must be initialised. A failed request yields "" (an unparsable judgement).
    """
    def run(prompts: list[str]) -> list[str]:
        import ray.data
        from transformers import AutoTokenizer

        tok_name = cfg.tokenizer or (None if cfg.backend == "openai" else cfg.model)
        tok = AutoTokenizer.from_pretrained(local_ref(tok_name)) if tok_name else None
        ds = ray.data.from_items(judge_rows(prompts, cfg, tok))
        sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "seed": seed,
                    "guided": False}
        model = cfg.model if cfg.backend == "openai" else local_ref(cfg.model)
        out = run_backend(ds, cfg.backend, model, getattr(cfg, cfg.backend), sampling,
                          tokenizer=local_ref(cfg.tokenizer), key=f"judge.judge.{cfg.backend}")
        got = {str(r["sample_id"]): str(r.get("text") or "") for r in out.take_all()}
        return [got.get(f"judge-{i:08d}", "") for i in range(len(prompts))]

    return run


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
    stats.rejects.update({"tie": summary["ties"], "unparsable": summary["unparsable"]})
    stats.extra.update({k: summary[k] for k in ("win_rate", "win_rate_decided",
                                                 "win_rate_ties_half", "rougeL_f1")})
    stats.extra["outputs"] = str(stage.path)
    return stage.finish(cfg, stats)
