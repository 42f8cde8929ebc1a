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
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from craft_ray.backends.hf import HFBackendConfig
from craft_ray.backends.openai_compat import OpenAIBackendConfig
from craft_ray.backends.vllm import VLLMBackendConfig
from craft_ray.config import RayConfig, StrictModel
from craft_ray.models.gguf import resolve_model_path

Verdict = Literal["1", "2", "tie"]
Outcome = Literal["win", "loss", "tie", "unparsable"]

JUDGE_TEMPLATE = """\
You are a careful, impartial judge. Compare two responses to the same instruction and decide \
which one follows the instruction better: more accurate, more complete, more helpful, and \
closer to what a skilled human would write. Ignore response length unless it hurts quality, \
and ignore the order in which the responses are shown.

## Instruction
{instruction}

## Output (1)
{output_1}

## Output (2)
{output_2}

Answer with exactly one of: "Output (1)", "Output (2)" or "Tie". Do not explain.
"""


@dataclass(frozen=True)
class JudgePair:
    """One judged comparison. ``swapped``: the model's output is shown as Output (1)."""

    index: int
    instruction: str
    output_1: str
    output_2: str
    swapped: bool


def build_pairs(instructions: Sequence[str], references: Sequence[str],
                candidates: Sequence[str], seed: int = 1234) -> list[JudgePair]:
    """Pairs with the reference as Output (1) except on a seeded random half (swapped)."""
    if not (len(instructions) == len(references) == len(candidates)):
        raise ValueError(f"lengths differ: {len(instructions)} instructions, "
                         f"{len(references)} references, {len(candidates)} candidates")
    swap = np.random.default_rng(seed).random(len(instructions)) < 0.5
    pairs = []
    for i, (ins, ref, cand) in enumerate(zip(instructions, references, candidates)):
        s = bool(swap[i])
        pairs.append(JudgePair(i, ins, cand if s else ref, ref if s else cand, s))
    return pairs


def judge_prompt(pair: JudgePair, template: str = JUDGE_TEMPLATE) -> str:
    """The judge's prompt for one pair."""
    return template.format(instruction=pair.instruction.strip(), output_1=pair.output_1.strip(),
                           output_2=pair.output_2.strip())


_VERDICT_RE = re.compile(r"output\s*[\(\[]?\s*([12])\s*[\)\]]?|\b(tie)\b", re.IGNORECASE)


def parse_verdict(text: str | None) -> Verdict | None:
    """'1', '2' or 'tie' from a judge's answer; None when it names neither.

    The first verdict named counts ("Output (2) is better than Output (1)" -> '2'). A bare
    "1" / "2" / "(2)" answer is accepted too.
    """
    if not text:
        return None
    t = text.strip()
    bare = re.fullmatch(r"[\(\[]?\s*([12])\s*[\)\]]?\.?", t)
    if bare:
        return bare.group(1)  # type: ignore[return-value]
    m = _VERDICT_RE.search(t)
    if not m:
        return None
    return "tie" if m.group(2) else m.group(1)  # type: ignore[return-value]


def outcome(verdict: Verdict | None, swapped: bool) -> Outcome:
    """The model's result on one pair given the judge's verdict and the pair's order."""
    if verdict is None:
        return "unparsable"
    if verdict == "tie":
        return "tie"
    model_pos = "1" if swapped else "2"
    return "win" if verdict == model_pos else "loss"


def win_rates(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Counts and win rates: CRAFT's (ties/unparsable = losses), decided-only, ties as half."""
    c = Counter(outcomes)
    n = len(outcomes)
    wins, losses, ties, bad = c["win"], c["loss"], c["tie"], c["unparsable"]
    decided = wins + losses
    parsed = n - bad
    return {
        "metric": "win_rate", "n": n, "wins": wins, "losses": losses, "ties": ties,
        "unparsable": bad,
        "win_rate": wins / n if n else 0.0,
        "win_rate_decided": wins / decided if decided else 0.0,
        "win_rate_ties_half": (wins + 0.5 * ties) / parsed if parsed else 0.0,
    }


def rouge_l(predictions: Sequence[str], references: Sequence[str],
            use_stemmer: bool = True) -> dict[str, Any]:
    """ROUGE-L F1 per item and its mean (Google's ``rouge-score``)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("ROUGE-L needs `pip install rouge-score`") from exc
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions vs {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    f1 = [scorer.score(ref, pred)["rougeL"].fmeasure
          for pred, ref in zip(predictions, references)]
    return {"rougeL_f1": float(np.mean(f1)) if f1 else 0.0, "per_item": f1}


def judge_outputs(instructions: Sequence[str], references: Sequence[str],
                  candidates: Sequence[str], generate: Callable[[list[str]], list[str]],
                  seed: int = 1234, template: str = JUDGE_TEMPLATE
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Judge candidates against references with ``generate``; (summary, per-item rows).

    ``generate`` maps judge prompts to the judge's answers in order (greedy decoding and a
    short ``max_tokens`` are the caller's backend settings).
    """
    return judge_groups([(instructions, references, candidates)], generate, seed, template)[0]


def judge_groups(groups: Sequence[tuple[Sequence[str], Sequence[str], Sequence[str]]],
                 generate: Callable[[list[str]], list[str]], seed: int = 1234,
                 template: str = JUDGE_TEMPLATE
                 ) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Several ``(instructions, references, candidates)`` groups (e.g. one per model and eval
    set) judged with a single ``generate`` call, so the judge model is loaded once.

    Each group gets the same seeded order swap it would get judged alone, so a group's
    result does not depend on which other groups share the call.
    """
    all_pairs = [build_pairs(ins, refs, cands, seed) for ins, refs, cands in groups]
    prompts = [judge_prompt(p, template) for pairs in all_pairs for p in pairs]
    answers = generate(prompts) if prompts else []
    if len(answers) != len(prompts):
        raise ValueError(f"judge returned {len(answers)} answers for {len(prompts)} prompts")
    out = []
    start = 0
    for (_ins, references, candidates), pairs in zip(groups, all_pairs):
        mine = answers[start:start + len(pairs)]
        start += len(pairs)
        out.append(_judged(pairs, references, candidates, mine, seed))
    return out


def _judged(pairs: list[JudgePair], references: Sequence[str], candidates: Sequence[str],
            answers: Sequence[str], seed: int
            ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    verdicts = [parse_verdict(a) for a in answers]
    outs = [outcome(v, p.swapped) for v, p in zip(verdicts, pairs)]
    rouge = rouge_l(candidates, references)
    rows = [{"index": p.index, "instruction": p.instruction, "reference": references[i],
             "prediction": candidates[i], "swapped": p.swapped, "judge_answer": a,
             "verdict": v, "outcome": o, "rougeL_f1": rouge["per_item"][i]}
            for i, (p, a, v, o) in enumerate(zip(pairs, answers, verdicts, outs))]
    summary = {**win_rates(outs), "rougeL_f1": rouge["rougeL_f1"], "seed": seed,
               "swapped": int(sum(p.swapped for p in pairs))}
    return summary, rows


# --- the judge stage: any generation backend -------------------------------------------------


class JudgeModelConfig(StrictModel):
    """The judge model and the generation backend serving it (greedy, short answers)."""

    backend: Literal["hf", "openai", "vllm"] = Field(
        default="hf", description="Generation backend (craft_ray.backends): hf, openai, vllm."
    )
    model: str = Field(min_length=1, description="Judge model: HF id or local path (hf, vllm); "
                       "the served name (openai). CRAFT: Llama-3-70B-Instruct.")
    tokenizer: str | None = Field(
        default=None, description="Tokenizer rendering the chat prompt (default: the model; "
        "none for openai chat).")
    system_prompt: str | None = Field(default=None, description="Optional system turn.")
    max_new_tokens: int = Field(default=50, ge=1, le=4096,
                                description="Judge answer budget (CRAFT: 50).")
    hf: HFBackendConfig = Field(default_factory=lambda: HFBackendConfig(),
                                description="hf backend settings.")
    openai: OpenAIBackendConfig = Field(default_factory=lambda: OpenAIBackendConfig(),
                                        description="openai backend settings.")
    vllm: VLLMBackendConfig = Field(default_factory=lambda: VLLMBackendConfig(),
                                    description="vllm backend settings.")


class JudgeConfig(StrictModel):
    """Config of ``craft-ray judge``: win rate of predictions against references."""

    name: str = Field(default="judge", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Output folder name under RUN_DIR/evaluate/judge.")
    input_path: str = Field(
        min_length=1,
        description="Per-item predictions (.jsonl or .parquet) with an instruction, the model's "
        "prediction and the reference (CRAFT's evaluation output format).")
    instruction_field: str = Field(default="instruction", min_length=1,
                                   description="Column of the instruction.")
    prediction_field: str = Field(default="prediction", min_length=1,
                                  description="Column of the model's output.")
    reference_field: str = Field(default="reference", min_length=1,
                                 description="Column of the reference output.")
    limit: int | None = Field(default=None, ge=1, description="Judge only the first N items.")
    seed: int = Field(default=1234, ge=0, le=2**31 - 1,
                      description="Seed of the random order swap (CRAFT: 1234).")
    template: str = Field(default=JUDGE_TEMPLATE, min_length=1,
                          description="Judge prompt with {instruction}, {output_1}, {output_2}.")
    judge: JudgeModelConfig = Field(description="The judge model and its backend.")
    output_dir: str | None = Field(default=None, description="Default RUN_DIR/evaluate/judge.")


class JudgeStageConfig(StrictModel):
    """A YAML file for ``craft-ray judge``: common keys plus the ``judge`` section."""

    run_dir: str = Field(default="runs/default", description="Run directory.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    judge: JudgeConfig


def judge_rows(prompts: Sequence[str], cfg: JudgeModelConfig, tokenizer: Any | None
               ) -> list[dict[str, Any]]:
    """Prompt rows in the generation backends' input columns (see craft_ray.backends)."""
    rows = []
    for i, p in enumerate(prompts):
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt
                    else []) + [{"role": "user", "content": p}]
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
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
        tok = AutoTokenizer.from_pretrained(resolve_model_path(tok_name)) if tok_name else None
        ds = ray.data.from_items(judge_rows(prompts, cfg, tok))
        sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "seed": seed,
                    "guided": False}
        model = cfg.model if cfg.backend == "openai" else resolve_model_path(cfg.model)
        if cfg.backend == "hf":
            from craft_ray.backends.hf import hf_generate

            tok_path = resolve_model_path(cfg.tokenizer) if cfg.tokenizer else None
            out = hf_generate(ds, model, tok_path, cfg.hf, sampling)
        elif cfg.backend == "openai":
            from craft_ray.backends.openai_compat import openai_generate

            out = openai_generate(ds, cfg.model, cfg.openai, sampling)
        else:
            from craft_ray.backends.vllm import vllm_generate

            out = vllm_generate(ds, model, cfg.vllm, sampling)
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
