"""Pairwise judging: prompts, verdict parsing, win rates, ROUGE-L (pure)."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

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


class JudgeReply(str):
    """A judge's answer (the text itself); a failed request is an empty reply whose ``error``
    (a fixed reason, e.g. "Connection failed after retries.") and ``detail`` say why, so the
    failure reaches the judgements and stats instead of passing for an unparsable answer."""

    error: str
    detail: str

    def __new__(cls, text: str, error: str = "", detail: str = "") -> JudgeReply:
        obj = super().__new__(cls, text)
        obj.error, obj.detail = error, detail
        return obj


def reply_error(answer: str) -> tuple[str, str]:
    """``(error, detail)`` of a judge answer: empty for a plain string or a successful reply."""
    return getattr(answer, "error", ""), getattr(answer, "detail", "")


def warn_judge_errors(where: str, rows: Sequence[dict[str, Any]]) -> None:
    """Log how many judge requests failed, by reason, with the first failure's detail (they
    count as unparsable judgements, i.e. losses in CRAFT's win rate)."""
    failed = [r for r in rows if r.get("judge_error")]
    if failed:
        by_reason = dict(Counter(r["judge_error"] for r in failed))
        logger.warning("%s: %d of %d judge requests failed %s (counted as unparsable); first: "
                       "%s", where, len(failed), len(rows), by_reason,
                       failed[0].get("judge_error_detail", "")[:300])


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
    errors = [reply_error(a) for a in answers]
    rouge = rouge_l(candidates, references)
    rows = [{"index": p.index, "instruction": p.instruction, "reference": references[i],
             "prediction": candidates[i], "swapped": p.swapped, "judge_answer": str(a),
             "verdict": v, "outcome": o, "judge_error": err, "judge_error_detail": detail,
             "rougeL_f1": rouge["per_item"][i]}
            for i, (p, a, v, o, (err, detail)) in enumerate(zip(pairs, answers, verdicts, outs,
                                                                errors))]
    summary = {**win_rates(outs), "rougeL_f1": rouge["rougeL_f1"], "seed": seed,
               "swapped": int(sum(p.swapped for p in pairs)),
               "judge_errors": dict(sorted(Counter(e for e, _ in errors if e).items()))}
    return summary, rows
