"""Scoring: letter log-probabilities, predictions, confidence intervals (pure numpy)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from craft_ray.evalsets.base import LETTERS
from craft_ray.stages.evaluate.config import GenerationConfig

NEG_INF = float("-inf")

# --- letter scoring (pure functions) ---------------------------------------------------------


def letter_token_ids(tokenizer: Any, letters: Sequence[str] = LETTERS,
                     prefixes: Sequence[str] = ("", " ")) -> dict[str, list[int]]:
    """Token ids that spell each letter as one token (``prefix + letter``, e.g. 'A', ' A').

    Only single-token encodings count: a letter that never is one token cannot be the one
    greedy token CRAFT's method reads. Raises ``ValueError`` for a letter with no such token.
    """
    out: dict[str, list[int]] = {}
    for letter in letters:
        ids: list[int] = []
        for p in prefixes:
            enc = tokenizer.encode(p + letter, add_special_tokens=False)
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(int(enc[0]))
        # SentencePiece tokenizers encode 'A' as '▁A'; the bare piece is another surface form.
        bare = tokenizer.convert_tokens_to_ids(letter)
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(bare, int) and bare >= 0 and bare != unk and bare not in ids:
            ids.append(bare)
        if not ids:
            raise ValueError(f"tokenizer has no single token for letter {letter!r} "
                             f"(tried prefixes {list(prefixes)})")
        out[letter] = ids
    shared = Counter(i for ids in out.values() for i in ids)
    clash = [i for i, n in shared.items() if n > 1]
    if clash:
        raise ValueError(f"token ids {clash} stand for more than one letter")
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (float64)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def scores_from_logprobs(logprobs: np.ndarray | Mapping[Any, Any], letters: Sequence[str],
                         letter_ids: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Each letter's score: the best log-prob among its token ids.

    ``logprobs`` is either a full-vocabulary vector (hf) or a sparse top-k map token id ->
    log-prob (vLLM; ids may be ints or strings, values floats or ``{"logprob": x}``). An id
    absent from a sparse map, or a non-finite value, is -inf.
    """
    out: dict[str, float] = {}
    if isinstance(logprobs, np.ndarray):
        vocab = logprobs.shape[-1]
        for letter in letters:
            vals = [float(logprobs[i]) for i in letter_ids[letter] if 0 <= i < vocab]
            vals = [v for v in vals if math.isfinite(v)]
            out[letter] = max(vals) if vals else NEG_INF
        return out
    sparse = _normalise_sparse(logprobs)
    for letter in letters:
        vals = [sparse[i] for i in letter_ids[letter] if i in sparse]
        vals = [v for v in vals if math.isfinite(v)]
        out[letter] = max(vals) if vals else NEG_INF
    return out


def _normalise_sparse(logprobs: Mapping[Any, Any]) -> dict[int, float]:
    out: dict[int, float] = {}
    for k, v in logprobs.items():
        if v is None:
            continue
        try:
            key = int(k)
        except (TypeError, ValueError):
            continue
        if isinstance(v, Mapping):
            v = v.get("logprob")
        elif hasattr(v, "logprob"):
            v = v.logprob
        try:
            out[key] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def predict_letter(scores: Mapping[str, float], letters: Sequence[str]) -> str | None:
    """Argmax over the item's ``letters`` (others are ignored); None when none is finite.

    Ties go to the earliest letter in ``letters`` (what CRAFT's ``list.index(max)`` does).
    """
    best: str | None = None
    best_val = NEG_INF
    for letter in letters:
        v = scores.get(letter, NEG_INF)
        if v is None or not math.isfinite(v):
            continue
        if best is None or v > best_val:
            best, best_val = letter, v
    return best


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (0, 0 when n == 0), from scipy."""
    if n == 0:
        return 0.0, 0.0
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


def score_columns(scores: list[dict[str, float]], letters_col: Sequence[Any]
                  ) -> dict[str, np.ndarray]:
    """Per-letter score columns (NaN for letters the item lacks) and the prediction.

    ``letters_col`` holds each item's letters as a string ("ABCD") or a list.
    """
    cols: dict[str, np.ndarray] = {}
    item_letters = [list(x) for x in letters_col]
    for letter in LETTERS:
        cols[f"score_{letter}"] = np.array(
            [s[letter] if letter in ls else np.nan for s, ls in zip(scores, item_letters)],
            dtype=np.float64)
    preds = [predict_letter(s, ls) for s, ls in zip(scores, item_letters)]
    cols["prediction"] = np.array([p or "" for p in preds], dtype=object)
    return cols

# --- generative sets: the evaluated model answers, then ROUGE-L and the judge ---------------


def trim_at_eos(tokens: Sequence[int], eos_ids: set[int], limit: int
                ) -> tuple[list[int], bool]:
    """Generated tokens up to (not including) the first EOS, at most ``limit``; (tokens,
    stopped): stopped is True when the model ended the answer itself."""
    out: list[int] = []
    for t in list(tokens)[:limit]:
        if t in eos_ids:
            return out, True
        out.append(int(t))
    return out, False


def sampling_of(gen: GenerationConfig) -> dict[str, Any]:
    """The generation backends' sampling dict (craft_ray.backends) for ``gen``."""
    return {"temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k,
            "seed": gen.seed, "guided": False}


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): normal-approximation CI of a mean (sample std), clipped to [0, 1]."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0, 0.0
    mean = float(np.mean(values))
    sem = float(np.std(values, ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    if sem == 0.0:  # scipy's normal needs a positive scale; no spread, no interval
        return mean, mean, mean
    from scipy.stats import norm

    low, high = norm.interval(level, loc=mean, scale=sem)
    return mean, max(0.0, float(low)), min(1.0, float(high))


def summarise_generative(rows: list[dict[str, Any]], level: float,
                         judged: dict[str, Any] | None) -> dict[str, Any]:
    """ROUGE-L (mean, CI) always; with a judge summary, the win rates (both ways) and their
    Wilson CIs, the win rate (CRAFT's: ties and unparsable as losses) being the metric."""
    n = len(rows)
    mean, lo, hi = mean_ci([r["rougeL_f1"] for r in rows], level)
    out: dict[str, Any] = {
        "metric": "rougeL_f1", "rougeL_f1": mean, "n": n, "ci_low": lo, "ci_high": hi,
        "ci_level": level, "ci_method": "normal", "rougeL_ci_low": lo, "rougeL_ci_high": hi,
        "empty_predictions": sum(1 for r in rows if not r["prediction"]),
        "truncated": sum(1 for r in rows if r.get("truncated")),
        "finish_reasons": dict(sorted(Counter(r["finish_reason"] for r in rows).items())),
    }
    if judged is not None:
        w, d = judged["wins"], judged["wins"] + judged["losses"]
        lo_w, hi_w = wilson_interval(w, n, level)
        lo_d, hi_d = wilson_interval(w, d, level)
        out.update({k: judged[k] for k in ("wins", "losses", "ties", "unparsable", "win_rate",
                                           "win_rate_decided", "win_rate_ties_half",
                                           "swapped")})
        out["judge_errors"] = judged.get("judge_errors", {})
        out.update(metric="win_rate", ci_low=lo_w, ci_high=hi_w, ci_method="wilson",
                   win_rate_decided_ci_low=lo_d, win_rate_decided_ci_high=hi_d,
                   judge_seed=judged["seed"])
    return out
