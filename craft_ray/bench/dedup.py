"""``craft-ray bench dedup``: MinHash-LSH dedup vs CRAFT's pairwise dedup, on planted duplicates.

Samples are QA-shaped like CRAFT's generated samples (two real sentences as the question, four
short real phrases as options, an answer letter), built from the real StackExchange dumps;
each sample draws its own random sentences, so unplanted samples are distinct texts. Into them
we plant

- exact duplicates (case, punctuation and spacing changed; 5%), and
- near duplicates (10%): 1-4 words substituted, deleted or inserted in the question, options
  shuffled (answer letter moved with its option), sometimes a shortened option.

Each timed side runs ``repeats`` times interleaved after a warm-up (median and min-max;
:mod:`craft_ray.bench.measure`). Measured: exact + fuzzy dedup time at ``n`` and ``4n``
(near-linear is the target), the Ray Data plan at ``n``, CRAFT's algorithm (every sample
against every kept one, ``token_set_ratio >= 85``; here with rapidfuzz in one process) on a
subset, extrapolated quadratically to ``n``; precision and recall on the planted
near-duplicates for both methods on the same subset and for ours at ``n``. The last output
line is one JSON object.
"""

from __future__ import annotations

import logging
import random
import re
import time
from pathlib import Path
from typing import Any

from craft_ray.bench.measure import conditions, interleave, load_average, paired_ratio, summary
from craft_ray.stages.filter.dedup import (
    FuzzyDedupConfig,
    exact_duplicates,
    fuzzy_duplicates,
    normalize_text,
)

logger = logging.getLogger(__name__)

_SENT = re.compile(r"(?<=[.?!])\s+")


def load_sentences(data: Path, min_words: int = 6, max_words: int = 30) -> list[str]:
    """Distinct real sentences of every post (questions and answers) of the dumps."""
    import xml.etree.ElementTree as ET

    from craft_ray.store.stackexchange import html_to_text

    files = sorted(Path(data).glob("*/Posts.xml")) + sorted(Path(data).glob("Posts.xml"))
    if not files:
        raise FileNotFoundError(f"no StackExchange Posts.xml under {data} (pass --data)")
    seen: set[str] = set()
    out: list[str] = []
    for f in files:
        for _ev, el in ET.iterparse(f, events=("end",)):
            if el.tag != "row":
                continue
            body = html_to_text(el.get("Body", ""))
            for s in _SENT.split(body.replace("\n", " ")):
                s = " ".join(s.split())
                if min_words <= len(s.split()) <= max_words and normalize_text(s) not in seen:
                    seen.add(normalize_text(s))
                    out.append(s)
            el.clear()
    return out


def _sample(rng: random.Random, sents: list[str]) -> dict[str, Any]:
    q = f"{rng.choice(sents)} {rng.choice(sents)}"
    opts = []
    for _ in range(4):
        w = rng.choice(sents).split()
        k = rng.randint(2, 5)
        s = rng.randint(0, max(0, len(w) - k))
        opts.append(" ".join(w[s:s + k]).strip(".,?!"))
    return {"question": q, "options": opts, "answer": rng.randrange(4)}


def render(s: dict[str, Any]) -> str:
    """The sample's one-string form (as Task.sample_text renders multiple-choice QA)."""
    letters = "ABCD"
    opts = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(s["options"]))
    return f"{s['question']}\n{opts}\nAnswer: {letters[s['answer']]}"


def _near_variant(rng: random.Random, s: dict[str, Any], vocab: list[str]) -> dict[str, Any]:
    words = s["question"].split()
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        pos = rng.randrange(len(words))
        if op < 0.4:
            words[pos] = rng.choice(vocab)
        elif op < 0.7 and len(words) > 5:
            del words[pos]
        else:
            words.insert(pos, rng.choice(vocab))
    order = list(range(4))
    rng.shuffle(order)
    opts = [s["options"][i] for i in order]
    if rng.random() < 0.3:  # one option reworded by dropping a word
        j = rng.randrange(4)
        ow = opts[j].split()
        if len(ow) > 2:
            del ow[rng.randrange(len(ow))]
            opts[j] = " ".join(ow)
    return {"question": " ".join(words), "options": opts, "answer": order.index(s["answer"])}


def _exact_variant(rng: random.Random, text: str) -> str:
    t = text.upper() if rng.random() < 0.5 else text.lower()
    return t.replace(". ", ".  ").replace("?", " ?") + rng.choice(["", "!", " ."])


def make_corpus(sents: list[str], n: int, seed: int = 0, exact_frac: float = 0.05,
                near_frac: float = 0.10) -> tuple[list[str], list[str], dict[str, str]]:
    """``n`` samples: ids, texts, and ``{planted_id: origin_id}`` (kinds in the id prefix)."""
    rng = random.Random(seed)
    n_exact, n_near = int(n * exact_frac), int(n * near_frac)
    n_base = n - n_exact - n_near
    vocab = sorted({w for s in sents[:5000] for w in s.split()})
    base = [_sample(rng, sents) for _ in range(n_base)]
    ids = [f"b{i:08d}" for i in range(n_base)]
    texts = [render(s) for s in base]
    origin: dict[str, str] = {}
    for j in range(n_near):
        src = rng.randrange(n_base)
        ids.append(f"n{j:08d}")
        texts.append(render(_near_variant(rng, base[src], vocab)))
        origin[ids[-1]] = ids[src]
    for j in range(n_exact):
        src = rng.randrange(n_base)
        ids.append(f"e{j:08d}")
        texts.append(_exact_variant(rng, texts[src]))
        origin[ids[-1]] = ids[src]
    order = list(range(len(ids)))
    rng.shuffle(order)  # duplicates are not next to their origin
    return [ids[i] for i in order], [texts[i] for i in order], origin


def craft_pairwise(ids: list[str], texts: list[str], ratio: float = 85.0) -> set[str]:
    """CRAFT's ``deduplicate`` (code/utils/ts_creation.py) re-implemented with rapidfuzz in one
    process: each sample is compared with every kept one; a string already kept is skipped
    (and so kept again: CRAFT's exact-duplicate leak). Returns the dropped ids."""
    from rapidfuzz import fuzz, process, utils

    seen: list[str] = []
    seen_set: set[str] = set()
    dropped: set[str] = set()
    for sid, t in zip(ids, texts):
        if t in seen_set:
            continue
        hit = process.extractOne(t, seen, scorer=fuzz.token_set_ratio,
                                 processor=utils.default_process, score_cutoff=ratio) \
            if seen else None
        if hit is not None:
            dropped.add(sid)
        else:
            seen.append(t)
            seen_set.add(t)
    return dropped


def score(ids: list[str], dropped: set[str], origin: dict[str, str]) -> dict[str, Any]:
    """Recall on planted near- and exact duplicates and precision of the drops.

    A planted pair counts as found when not both of its samples survive. A drop is correct
    when the dropped sample belongs to a planted pair (as the copy or as the origin).
    """
    present = set(ids)
    near = {k: v for k, v in origin.items() if k.startswith("n") and v in present}
    exact = {k: v for k, v in origin.items() if k.startswith("e") and v in present}
    related = set(origin) | set(origin.values())

    def rec(pairs: dict[str, str]) -> float | None:
        if not pairs:
            return None
        return round(sum(1 for k, v in pairs.items() if k in dropped or v in dropped)
                     / len(pairs), 4)

    ok = sum(1 for d in dropped if d in related)
    return {"dropped": len(dropped), "recall_near": rec(near), "recall_exact": rec(exact),
            "precision": round(ok / len(dropped), 4) if dropped else None,
            "false_drops": len(dropped) - ok}


def ours(ids: list[str], texts: list[str], cfg: FuzzyDedupConfig
         ) -> tuple[dict[str, str], float]:
    """Exact then fuzzy dedup in process (what each Ray batch/group runs):
    ``{dropped: kept}`` and seconds."""
    t0 = time.perf_counter()
    ex = exact_duplicates(ids, texts)
    keep = [(i, t) for i, t in zip(ids, texts) if i not in ex]
    fz = fuzzy_duplicates([i for i, _ in keep], [t for _, t in keep], cfg)
    return {**ex, **fz}, time.perf_counter() - t0


def unplanted_drops_meeting_craft(drops: dict[str, str], texts: dict[str, str],
                                  origin: dict[str, str]) -> dict[str, Any]:
    """Drops outside the planted pairs: how many CRAFT's own criterion would also call
    duplicates (token_set_ratio >= 85 with the sample kept in their place)."""
    from rapidfuzz import fuzz, utils

    related = set(origin) | set(origin.values())
    other = [(d, k) for d, k in drops.items() if d not in related]
    meet = sum(1 for d, k in other if fuzz.token_set_ratio(
        texts[d], texts[k], processor=utils.default_process) >= 85)
    return {"unplanted_drops": len(other), "unplanted_drops_meeting_craft_ratio85": meet}


def ray_plan_seconds(ids: list[str], texts: list[str], cfg: FuzzyDedupConfig
                     ) -> tuple[set[str], float]:
    """The Ray Data plans (exact, then fuzzy) on a local Ray; dropped ids and seconds."""
    import ray
    import ray.data

    from craft_ray.stages.filter.dedup_dataset import (
        exact_duplicates_dataset,
        fuzzy_duplicates_dataset,
    )

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items([{"sample_id": i, "sample_text": t} for i, t in zip(ids, texts)],
                             override_num_blocks=8).materialize()
    t0 = time.perf_counter()
    ex = exact_duplicates_dataset(ds)
    rest = ds.filter(lambda r: r["sample_id"] not in ex).materialize()
    fz = fuzzy_duplicates_dataset(rest, cfg)
    return set(ex) | set(fz), time.perf_counter() - t0


def _subset(ids: list[str], origin: dict[str, str], size: int) -> list[str]:
    """The subset both methods run on, with planted pairs kept whole (a plain prefix of the
    shuffled samples would hold almost no complete pair): ~7.5% near and ~2.5% exact copies
    with their origins, the rest unplanted samples."""
    near_keys = sorted(k for k in origin if k.startswith("n"))[: int(size * 0.075)]
    exact_keys = sorted(k for k in origin if k.startswith("e"))[: int(size * 0.025)]
    sub = {x for k in near_keys + exact_keys for x in (k, origin[k])}
    related = set(origin) | set(origin.values())
    for i in ids:
        if len(sub) >= size:
            break
        if i not in related:
            sub.add(i)
    return [i for i in ids if i in sub]


def _time_sides(corpora: dict[str, tuple[list[str], list[str]]], cfg: FuzzyDedupConfig,
                repeats: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Ours at n, at 4n and on the subset, and the pairwise baseline on the subset, each
    ``repeats`` times interleaved after a warm-up; their seconds, and each side's drops."""
    drops: dict[str, Any] = {}

    def ours_side(name: str) -> float:
        drops[name], took = ours(*corpora[name], cfg)
        return took

    def baseline_side() -> float:
        t0 = time.perf_counter()
        drops["baseline"] = craft_pairwise(*corpora["subset"])
        return time.perf_counter() - t0

    times = interleave({"ours_n": lambda: ours_side("n"), "ours_4n": lambda: ours_side("4n"),
                        "ours_subset": lambda: ours_side("subset"),
                        "baseline_subset": baseline_side}, repeats=repeats)
    return times, drops


def run_bench_dedup(data: Path, n: int = 20_000, baseline_n: int = 2_000, seed: int = 0,
                    ray_path: bool = True, repeats: int = 3) -> dict[str, Any]:
    """Run the benchmark; returns the figures (also logged)."""
    from rapidfuzz import fuzz, utils

    load_before = load_average()
    cfg = FuzzyDedupConfig()
    sents = load_sentences(data)
    logger.info("bench dedup: %d distinct real sentences from %s", len(sents), data)
    ids, texts, origin = make_corpus(sents, n, seed)
    ids4, texts4, _ = make_corpus(sents, 4 * n, seed + 1)
    by_id = dict(zip(ids, texts))
    near_pairs = [(k, v) for k, v in origin.items() if k.startswith("n")]
    craft_like = sum(
        1 for k, v in near_pairs
        if fuzz.token_set_ratio(by_id[k], by_id[v], processor=utils.default_process) >= 85)
    sub_ids = _subset(ids, origin, baseline_n)
    sub_origin = {k: v for k, v in origin.items() if k in sub_ids and v in sub_ids}
    times, drops = _time_sides({"n": (ids, texts), "4n": (ids4, texts4),
                                "subset": (sub_ids, [by_id[i] for i in sub_ids])},
                               cfg, repeats)
    t_n, t_base = summary(times["ours_n"]), summary(times["baseline_subset"])
    scale = (n / len(sub_ids)) ** 2  # the pairwise baseline is quadratic
    result: dict[str, Any] = {
        "bench": "dedup", "n": n, "n4": 4 * n, "repeats": repeats,
        "real_sentences": len(sents), "planted_near": len(near_pairs),
        "planted_exact": sum(1 for k in origin if k.startswith("e")),
        "planted_near_meeting_craft_ratio85": round(craft_like / max(1, len(near_pairs)), 4),
        "config": {"ngram": cfg.ngram, "bands": cfg.bands, "rows": cfg.rows,
                   "min_band_matches": cfg.min_band_matches,
                   "lsh_threshold": round(cfg.threshold, 3)},
        "ours_seconds_n": t_n, "ours_seconds_4n": summary(times["ours_4n"]),
        "scaling_4n_over_n": paired_ratio(times["ours_4n"], times["ours_n"]),
        "ours_at_n": {**score(ids, set(drops["n"]), origin),
                      **unplanted_drops_meeting_craft(drops["n"], by_id, origin)},
        "subset_n": len(sub_ids),
        "subset_planted_near": sum(1 for k in sub_origin if k.startswith("n")),
        "baseline_seconds_subset": t_base,
        "ours_seconds_subset": summary(times["ours_subset"]),
        "baseline_seconds_extrapolated_n": round(t_base["median"] * scale, 1),
        "ratio": round(t_base["median"] * scale / t_n["median"], 1),
        "speedup_at_n_extrapolated": summary(
            [b * scale / o for b, o in zip(times["baseline_subset"], times["ours_n"])], 1),
        "baseline_subset": score(sub_ids, drops["baseline"], sub_origin),
        "ours_subset": score(sub_ids, set(drops["subset"]), sub_origin),
    }
    if ray_path:
        ray_dropped, t_ray = ray_plan_seconds(ids, texts, cfg)
        result["ray_plan_seconds_n"] = round(t_ray, 3)
        result["ray_plan_same_result"] = ray_dropped == set(drops["n"])
    result.update(conditions(load_before))
    logger.info("bench dedup: %s", result)
    return result
