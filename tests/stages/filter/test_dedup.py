"""Dedup: exact hash, MinHash-LSH, semantic; plain functions and their Ray Data plans."""

from __future__ import annotations

import random

import numpy as np

from craft_ray.stages.filter.dedup import (
    FuzzyDedupConfig,
    SemanticDedupConfig,
    components_keep_min,
    exact_duplicates,
    fuzzy_duplicates,
    jaccard_estimate,
    lsh_band_keys,
    lsh_edges,
    minhash_signatures,
    normalize_text,
    normalized_hash,
    semantic_edges,
    shingle_hashes,
)
from craft_ray.stages.filter.dedup_dataset import (
    exact_duplicates_dataset,
    fuzzy_duplicates_dataset,
    semantic_duplicates_dataset,
)

WORDS = [f"w{i}" for i in range(3000)]


def random_texts(n: int, length: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(length)) for _ in range(n)]


def edit(text: str, k: int, seed: int) -> str:
    """Replace k words at random positions (a near-duplicate)."""
    rng = random.Random(seed)
    words = text.split()
    for pos in rng.sample(range(len(words)), k):
        words[pos] = "zz" + words[pos]
    return " ".join(words)


def test_normalisation_ignores_case_punctuation_and_spacing():
    a = "What is  the capital of France?\nA. Paris"
    b = "what is the capital of france a paris"
    assert normalize_text(a) == b
    assert normalized_hash(a) == normalized_hash(b)
    assert normalized_hash(a) != normalized_hash(a + " B. Lyon")


def test_exact_dedup_keeps_smallest_id_and_never_two_identical():
    rng = random.Random(3)
    base = random_texts(50, 12, seed=1)
    ids, texts = [], []
    for i in range(400):  # many copies, with case/punctuation variants
        t = rng.choice(base)
        t = t.upper() if rng.random() < 0.3 else t + ("!" if rng.random() < 0.3 else "")
        ids.append(f"s{i:04d}")
        texts.append(t)
    drops = exact_duplicates(ids, texts)
    kept = [(i, t) for i, t in zip(ids, texts) if i not in drops]
    norms = [normalize_text(t) for _, t in kept]
    assert len(norms) == len(set(norms)) == len({normalize_text(t) for t in texts})
    for dup, keep in drops.items():
        assert keep < dup and keep not in drops
        assert normalize_text(texts[ids.index(dup)]) == normalize_text(texts[ids.index(keep)])


def test_minhash_estimates_jaccard():
    a = random_texts(1, 200, seed=5)[0]
    b = edit(a, 30, seed=1)
    sa, sb = set(map(int, shingle_hashes(a, 2))), set(map(int, shingle_hashes(b, 2)))
    true_j = len(sa & sb) / len(sa | sb)
    sig = minhash_signatures([a, b], 256, 2, seed=7)
    assert 0.3 < true_j < 0.9
    assert abs(jaccard_estimate(sig[0], sig[1]) - true_j) < 0.1
    # Deterministic and independent of the batch it is computed in.
    again = minhash_signatures(["other text here", b, a], 256, 2, seed=7)
    assert np.array_equal(again[2], sig[0]) and np.array_equal(again[1], sig[1])


def test_lsh_edges_form_stars_to_the_smallest_member():
    keys = np.array([[1, 7], [1, 8], [2, 8], [3, 9]], dtype=np.int64)
    a, b = lsh_edges(["d", "b", "a", "c"], keys)
    assert sorted(zip(a.tolist(), b.tolist())) == [("b", "a"), ("d", "b")]


def test_components_keep_min_is_transitive():
    drops = components_keep_min(["c", "e", "b"], ["b", "d", "a"])
    assert drops == {"b": "a", "c": "a", "e": "d"}
    assert components_keep_min([], []) == {}


def test_fuzzy_dedup_finds_planted_near_duplicates_only():
    base = random_texts(300, 40, seed=2)
    ids = [f"b{i:03d}" for i in range(len(base))]
    texts = list(base)
    planted = {}
    for j, src in enumerate(range(0, 60, 2)):
        ids.append(f"a{j:03d}")  # sorts before b..., so the copy is the one kept
        texts.append(edit(base[src], 3, seed=j))
        planted[ids[src]] = ids[-1]
    cfg = FuzzyDedupConfig()
    drops = fuzzy_duplicates(ids, texts, cfg)
    assert drops == planted
    # The result does not depend on the order of the input.
    order = list(range(len(ids)))
    random.Random(0).shuffle(order)
    assert fuzzy_duplicates([ids[i] for i in order], [texts[i] for i in order], cfg) == drops


def test_band_keys_differ_per_band():
    sig = np.zeros((1, 8), dtype=np.uint32)  # identical values in every band
    keys = lsh_band_keys(sig, 4, 2)
    assert len(set(keys[0].tolist())) == 4


def test_semantic_edges_threshold():
    v = np.array([[1, 0, 0], [0.99, 0.1411, 0], [0, 1, 0]], dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert semantic_edges(["x", "y", "z"], v, 0.95) == (["x"], ["y"])
    assert semantic_edges(["x", "y", "z"], v, 0.999) == ([], [])


def test_ray_dedup_plans_match_plain_functions(ray_local):
    import ray.data

    base = random_texts(200, 30, seed=4)
    ids = [f"s{i:04d}" for i in range(len(base))]
    texts = list(base)
    for j in range(20):  # exact and near copies
        ids.append(f"t{j:04d}")
        texts.append(base[j].upper() if j % 2 else edit(base[j], 2, seed=j))
    ds = ray.data.from_items([{"sample_id": i, "sample_text": t} for i, t in zip(ids, texts)],
                             override_num_blocks=4)
    cfg = FuzzyDedupConfig(batch_size=64)
    exact = exact_duplicates_dataset(ds)
    assert exact == exact_duplicates(ids, texts)
    assert len(exact) == 10
    fuzzy = fuzzy_duplicates_dataset(ds, cfg)
    assert fuzzy == fuzzy_duplicates(ids, texts, cfg)
    assert set(fuzzy) == {f"t{j:04d}" for j in range(20)}


def test_semantic_dedup_with_the_embed_model(ray_local):
    """k-means path (2 clusters); the single-cluster path runs in the stage test."""
    import ray.data

    texts = [
        "How do I descale my espresso machine with citric acid?",
        "How do I descale my espresso machine using citric acid?",
        "Which hops give an IPA a strong citrus aroma?",
        "What temperature should a lager ferment at?",
        "Is a burr grinder better than a blade grinder for pour-over coffee?",
        "Why does my French press coffee taste bitter?",
    ]
    ds = ray.data.from_items([{"sample_id": f"s{i}", "sample_text": t}
                              for i, t in enumerate(texts)])
    cfg = SemanticDedupConfig(threshold=0.95, num_clusters=2, batch_size=4)
    assert semantic_duplicates_dataset(ds, cfg) == {"s1": "s0"}
