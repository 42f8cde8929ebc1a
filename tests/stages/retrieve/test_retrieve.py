"""Retrieval: exact top-k against a brute-force reference, the three modes, the leakage guard,
quotas, fetching texts back by id, and every bad input failing before work starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from craft_ray.stages.retrieve.actors import StoreSearcher, search_store
from craft_ray.stages.retrieve.config import (
    MEAN,
    RetrieveConfig,
    RetrieveError,
    RetrieveStageConfig,
)
from craft_ray.stages.retrieve.ranking import (
    Floors,
    Pool,
    _keep_topk_with_ties,
    block_entries,
    mode_budget,
    ranked_lists,
    split_quota,
)
from craft_ray.stages.retrieve.scan import ShardScanner, SimilarityScorer, iter_vectors
from craft_ray.stages.retrieve.select import select
from craft_ray.stages.retrieve.stage import prepare_retrieve, run_retrieve
from craft_ray.store.corpus import CorpusConfig, list_shards, read_shard
from craft_ray.store.vectors import ShardInfo, StoreInfo, embedding_array, write_info
from craft_ray.tasks.fewshots import FewShotConfig, FewShotError, embed_text, load_fewshots

DIM = 16


# --- helpers ------------------------------------------------------------------------------


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)


def write_data_file(store: Path, corpus: str, shard: str, vec: np.ndarray,
                    text_lens: list[int] | None = None, rows: list[int] | None = None) -> str:
    rows = rows if rows is not None else list(range(len(vec)))
    rel = f"data/{corpus}/{shard}.parquet"
    (store / rel).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "doc_id": pa.array([f"{corpus}/{shard}#{r}" for r in rows], pa.string()),
        "row": pa.array(rows, pa.int64()),
        "text_len": pa.array(text_lens or [0] * len(rows), pa.int32()),
        "embedding": embedding_array(vec),
    }), store / rel)
    return rel


def random_store(tmp: Path, sizes: list[int], seed: int = 0, dim: int = DIM,
                 ties: bool = True) -> tuple[Path, StoreInfo, dict[str, np.ndarray]]:
    """A store of random unit vectors in several shards (some vectors duplicated across
    shards, so exact score ties exist)."""
    rng = np.random.default_rng(seed)
    store = tmp / "store"
    shards, vecs = [], {}
    first = None
    for i, n in enumerate(sizes):
        v = unit(rng, n, dim)
        if ties and first is not None:
            v[: min(5, n)] = first[: min(5, n)]  # same vectors, different ids -> ties
        first = v if first is None else first
        name = f"s{i}"
        rel = write_data_file(store, "c", name, v)
        shards.append(ShardInfo(corpus="c", shard=name, file=rel, num_rows=n))
        vecs[name] = v
    info = StoreInfo(model="test-model", dim=dim, shards=shards)
    write_info(store, info)
    return store, info, vecs


def brute_force(vecs: dict[str, np.ndarray], queries: np.ndarray, k: int
                ) -> tuple[list[list[str]], list[str]]:
    """Reference: all scores in float32, sorted by (-score, doc id)."""
    ids = [f"c/{s}#{r}" for s, v in vecs.items() for r in range(len(v))]
    x = np.concatenate(list(vecs.values())).astype(np.float32)
    s = queries.astype(np.float32) @ x.T
    per = [[ids[j] for j in sorted(range(len(ids)), key=lambda j: (-s[i, j], ids[j]))[:k]]
           for i in range(len(queries))]
    m = s.mean(axis=0)
    mean = [ids[j] for j in sorted(range(len(ids)), key=lambda j: (-m[j], ids[j]))[:k]]
    return per, mean


def scan_all(store: Path, info: StoreInfo, queries: np.ndarray, k_shot: int, k_mean: int,
             chunk_rows: int, leakage: float | None = None) -> Pool:
    scanner = ShardScanner(queries.astype(np.float32), leakage, chunk_rows, query_block=2)
    pool = Pool()
    for sh in info.shards:
        res = scanner.scan(str(store / sh.file), k_shot, k_mean)
        pool = Pool.concat([pool, res["pool"]]).reduce(k_shot, k_mean)
    return pool


# --- pure functions -----------------------------------------------------------------------


def test_mode_budget_follows_craft() -> None:
    # CRAFT: mixed_k = int(k / 2 * 1.2); mean list mixed_k long, per-shot mixed_k // F.
    assert mode_budget("mixed", 1000, 8) == mode_budget("mixed", 1000, 8)
    b = mode_budget("mixed", 1000, 8)
    assert (b.k, b.k_mean, b.k_shot) == (1000, 600, 75)
    assert mode_budget("mean", 50, 8).k_shot == 0 and mode_budget("mean", 50, 8).k_mean == 50
    b = mode_budget("per_shot", 100, 32)
    assert (b.k_shot, b.k_mean) == (4, 0)  # ceil(100 * 1.2 / 32)


def test_split_quota_sums_to_k() -> None:
    assert split_quota(10, {"a": 0.5, "b": 0.5}) == {"a": 5, "b": 5}
    assert split_quota(10, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}) == {"a": 4, "b": 3, "c": 3}
    assert sum(split_quota(997, {"x": 0.7, "y": 0.2, "z": 0.1}).values()) == 997


def test_keep_topk_keeps_ties() -> None:
    q = np.array([0, 0, 0, 0, MEAN, MEAN], np.int32)
    s = np.array([0.9, 0.5, 0.5, 0.1, 0.3, 0.2], np.float32)
    keep = _keep_topk_with_ties(q, s, k_shot=2, k_mean=1)
    # k=2 for list 0: 0.9 and both 0.5 (tie at the cut) kept, 0.1 dropped; mean keeps 0.3.
    assert keep.tolist() == [True, True, True, False, True, False]


def test_select_modes_dedup_and_provenance() -> None:
    # doc indices: per-shot lists of two few-shots, and a mean list.
    per_shot = [np.array([10, 11, 12]), np.array([10, 13, 14])]
    mean = np.array([20, 11, 21, 22])
    got = select("per_shot", 4, per_shot, mean)
    assert [s.u for s in got] == [10, 11, 13, 12]  # round-robin by rank, 10 once
    assert got[0].shots == [0, 1] and got[0].shot_ranks == [1, 1]
    assert got[1].selected_by == "both" and got[1].mean_rank == 2  # 11 also in the mean list
    got = select("mean", 3, per_shot, mean)
    assert [s.u for s in got] == [20, 11, 21]
    assert got[0].selected_by == "mean" and got[0].shots == []
    got = select("mixed", 6, per_shot, mean)
    # alternate: shot stream (10, 10, 11, 13, 12, 14), mean stream (20, 11, 21, 22)
    assert [s.u for s in got] == [10, 20, 11, 21, 13, 22]
    assert len({s.u for s in got}) == 6
    by = {s.u: s.selected_by for s in got}
    assert by[10] == "per_shot" and by[20] == "mean" and by[11] == "both"
    # k larger than everything available: all distinct docs, no more
    assert len(select("mixed", 100, per_shot, mean)) == 8


# --- exact top-k against brute force ------------------------------------------------------


@pytest.mark.parametrize(("chunk_rows", "cast_rows"), [(7, 4096), (1000, 4096), (1000, 3)])
def test_scan_and_merge_match_brute_force(tmp_path: Path, chunk_rows: int, cast_rows: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # cast_rows=3: the CPU product converts float16 rows in blocks that do not divide chunks.
    monkeypatch.setattr("craft_ray.stages.retrieve.scan.CAST_ROWS", cast_rows)
    store, info, vecs = random_store(tmp_path, [60, 45, 1, 80])
    rng = np.random.default_rng(1)
    queries = unit(rng, 5).astype(np.float32)
    k = 12
    pool = scan_all(store, info, queries, k, k, chunk_rows)
    per, mean = ranked_lists(pool, 5, k, k)
    ref_per, ref_mean = brute_force(vecs, queries, k)
    assert [[str(pool.doc_id[u]) for u in lst] for lst in per] == ref_per
    assert [str(pool.doc_id[u]) for u in mean] == ref_mean


def test_ties_break_by_doc_id(tmp_path: Path) -> None:
    # Every vector identical: all scores tie, so the order is the doc id order.
    store = tmp_path / "store"
    v = np.tile(unit(np.random.default_rng(2), 1), (30, 1))
    shards = []
    for name in ("b", "a"):
        rel = write_data_file(store, "c", name, v[:15])
        shards.append(ShardInfo(corpus="c", shard=name, file=rel, num_rows=15))
    info = StoreInfo(model="m", dim=DIM, shards=shards)
    pool = scan_all(store, info, v[:1].astype(np.float32), 4, 0, chunk_rows=4)
    per, _ = ranked_lists(pool, 1, 4, 0)
    assert [str(pool.doc_id[u]) for u in per[0]] == ["c/a#0", "c/a#1", "c/a#10", "c/a#11"]


def test_leakage_guard_drops_near_copies(tmp_path: Path) -> None:
    store, info, vecs = random_store(tmp_path, [40, 40], ties=False)
    # Query 0 is stored document c/s1#7 itself.
    queries = np.stack([vecs["s1"][7], unit(np.random.default_rng(3), 1)[0]]).astype(np.float32)
    scanner = ShardScanner(queries, 0.98, 16, query_block=8)
    res = scanner.scan(str(store / info.shards[1].file), 5, 5)
    assert res["n_leaked"] == 1
    assert list(res["leaked_doc_id"]) == ["c/s1#7"] and int(res["leaked_shot"][0]) == 0
    assert res["leaked_sim"][0] >= 0.98
    assert "c/s1#7" not in set(res["pool"].doc_id.tolist())
    # Without the guard it is query 0's best match.
    off = ShardScanner(queries, None, 16, query_block=8).scan(
        str(store / info.shards[1].file), 5, 5)
    per, _ = ranked_lists(off["pool"], 2, 5, 5)
    assert str(off["pool"].doc_id[per[0][0]]) == "c/s1#7"


def test_leakage_reports_the_closest_few_shot_across_query_blocks(tmp_path: Path) -> None:
    store, info, vecs = random_store(tmp_path, [40], ties=False)
    rng = np.random.default_rng(4)
    # Few-shot 2 (in the third block of one query) is stored document c/s0#9 itself.
    queries = np.stack([unit(rng, 1)[0], unit(rng, 1)[0], vecs["s0"][9],
                        unit(rng, 1)[0]]).astype(np.float32)
    res = ShardScanner(queries, 0.98, 16, query_block=1).scan(
        str(store / info.shards[0].file), 5, 5)
    assert list(res["leaked_doc_id"]) == ["c/s0#9"]
    assert int(res["leaked_shot"][0]) == 2


def test_search_store_on_ray_matches_brute_force(ray_local, tmp_path: Path) -> None:
    # 12 shards: more pools than the driver lets wait, so it also merges part-way through.
    store, info, vecs = random_store(tmp_path, [50, 30, 70, 20] * 3)
    queries = unit(np.random.default_rng(4), 3).astype(np.float32)
    res = search_store(store, info, queries, {"*": (10, 10)}, chunk_rows=16, concurrency=2)
    assert res.num_rows == 510
    per, mean = ranked_lists(res.pools["*"], 3, 10, 10)
    ref_per, ref_mean = brute_force(vecs, queries, 10)
    assert [[str(res.pools["*"].doc_id[u]) for u in lst] for lst in per] == ref_per
    assert [str(res.pools["*"].doc_id[u]) for u in mean] == ref_mean


def test_store_searcher_reuses_its_actors_across_searches(ray_local, tmp_path: Path) -> None:
    # One searcher, three searches with other queries and list lengths (a rescan's longer
    # lists, a new task): each is exact, although the actors keep state between calls.
    store, info, vecs = random_store(tmp_path, [50, 30, 70, 20] * 2)
    rng = np.random.default_rng(8)
    with StoreSearcher(store, info, chunk_rows=16, concurrency=2, vector_cache=True) as s:
        pids = set()
        for queries, k in ((unit(rng, 3), 10), (unit(rng, 3), 20), (unit(rng, 5), 4)):
            q = queries.astype(np.float32)
            res = s.search(q, {"*": (k, k)})
            per, mean = ranked_lists(res.pools["*"], len(q), k, k)
            ref_per, ref_mean = brute_force(vecs, q, k)
            assert [[str(res.pools["*"].doc_id[u]) for u in lst] for lst in per] == ref_per
            assert [str(res.pools["*"].doc_id[u]) for u in mean] == ref_mean
            pids |= set(res.actor_peak_rss_mb)
        assert len(pids) == 2  # the same two actors served every search
    assert len(list((store / "_vector_cache").glob("*.f32.npy"))) == 8  # CPU: float32


# --- floors: later chunks and files skip what cannot enter a list -------------------------


def test_block_entries_with_floors() -> None:
    # rows x lists: list 0 scores rows 0..3 as 0.9 0.1 0.5 0.7, list 1 as 0.2 0.8 0.8 0.3
    s = np.array([[0.9, 0.2], [0.1, 0.8], [0.5, 0.8], [0.7, 0.3]], dtype=np.float32)
    ks = np.array([2, 2])

    def got(*args: object) -> list[tuple[int, int]]:
        q, r, _ = block_entries(s, 0, ks, *args)  # type: ignore[arg-type]
        return sorted(zip(q.tolist(), r.tolist()))

    assert got(None) == [(0, 0), (0, 3), (1, 1), (1, 2)]
    # Every list already holds 2 entries reaching its floor: only entries >= it pass.
    assert got(np.array([0.8, 0.8], np.float32)) == [(0, 0), (1, 1), (1, 2)]
    # A list without a floor yet still gets its own top 2.
    assert got(np.array([0.95, -np.inf], np.float32)) == [(1, 1), (1, 2)]
    # Excluded rows (the leakage guard) enter no list; the next best take their place.
    assert got(None, np.array([True, False, False, False])) == [(0, 2), (0, 3), (1, 1), (1, 2)]
    # List ids are offset by the block's first list; a list of length 0 gets nothing.
    q, r, _ = block_entries(s, 5, np.array([0, 4]), None)
    assert sorted(zip(q.tolist(), r.tolist())) == [(6, 0), (6, 1), (6, 2), (6, 3)]


def test_floors_are_the_kth_best_score_passed_on_per_list() -> None:
    rng = np.random.default_rng(11)
    fl = Floors(num_shots=3, k_shot=4, k_mean=2)
    assert np.isneginf(fl.values()).all()
    seen: dict[int, list[float]] = {0: [], 1: [], 2: [], MEAN: []}
    for _ in range(5):  # batches of entries with uneven lists (list 2 gets none at first)
        q = rng.choice([0, 1, MEAN] if not seen[0] else [0, 1, 2, MEAN], size=7)
        sc = rng.standard_normal(7).astype(np.float32)
        fl.update(q, sc)
        for a, b in zip(q.tolist(), sc.tolist()):
            seen[a].append(b)
        want = [sorted(seen[i], reverse=True)[k - 1] if len(seen[i]) >= k else -np.inf
                for i, k in ((0, 4), (1, 4), (2, 4), (MEAN, 2))]
        np.testing.assert_allclose(fl.values(), np.array(want, np.float32))


def test_floors_prune_later_files_without_losing_the_top_k(tmp_path: Path) -> None:
    store, info, vecs = random_store(tmp_path, [200, 200, 200], ties=False)
    queries = unit(np.random.default_rng(5), 3).astype(np.float32)
    paths = [str(store / s.file) for s in info.shards]
    fresh = [ShardScanner(queries, None, 32, 2).scan(p, 5, 5)["pool"] for p in paths]
    shared = ShardScanner(queries, None, 32, 2)
    pruned = [shared.scan(p, 5, 5)["pool"] for p in paths]
    assert len(pruned[0]) == len(fresh[0])
    assert len(pruned[2]) < len(fresh[2])  # the first files' floors skip entries
    pool = Pool.concat(pruned).reduce(5, 5)
    per, mean = ranked_lists(pool, 3, 5, 5)
    ref_per, ref_mean = brute_force(vecs, queries, 5)
    assert [[str(pool.doc_id[u]) for u in lst] for lst in per] == ref_per
    assert [str(pool.doc_id[u]) for u in mean] == ref_mean


def test_similarity_actor_starts_each_search_without_old_floors(tmp_path: Path) -> None:
    # The actor class, called directly: search 2's few-shots must not be pruned by the
    # floors search 1 left behind (they would drop most of its true top k).
    store, info, vecs = random_store(tmp_path, [80, 80])
    rng = np.random.default_rng(9)
    actor = SimilarityScorer(chunk_rows=32, query_block=4, use_gpu=False)
    for search_id, queries in ((1, unit(rng, 2)), (2, -unit(rng, 2))):
        q = queries.astype(np.float32)
        pool = Pool.concat([actor.scan_file(search_id, q, None, {"*": (6, 0)},
                                            str(store / sh.file), sh.corpus, sh.shard)["pool"]
                            for sh in info.shards]).reduce(6, 0)
        per, _ = ranked_lists(pool, 2, 6, 0)
        assert [[str(pool.doc_id[u]) for u in lst] for lst in per] == brute_force(vecs, q, 6)[0]


@pytest.mark.parametrize("cache_dtype", ["float32", "float16"])
def test_vector_cache_keeps_the_exact_top_k(tmp_path: Path, cache_dtype: str) -> None:
    store, info, vecs = random_store(tmp_path, [60, 45, 80])
    queries = unit(np.random.default_rng(2), 4).astype(np.float32)
    cache = str(store / "_vector_cache")
    for _ in range(2):  # the first pass writes the cache, the second memory-maps it
        scanner = ShardScanner(queries, 0.98, 16, 4, vector_cache=cache,
                               cache_dtype=cache_dtype)  # type: ignore[arg-type]
        pool = Pool.concat([scanner.scan(str(store / sh.file), 8, 8)["pool"]
                            for sh in info.shards]).reduce(8, 8)
        per, mean = ranked_lists(pool, 4, 8, 8)
        ref_per, ref_mean = brute_force(vecs, queries, 8)
        assert [[str(pool.doc_id[u]) for u in lst] for lst in per] == ref_per
        assert [str(pool.doc_id[u]) for u in mean] == ref_mean
    # the doc ids, rows and text lengths are cached beside the vectors, one file each
    assert len(list(Path(cache).glob("*.doc_id.npy"))) == len(info.shards)
    path = str(store / info.shards[0].file)
    first = next(iter_vectors(pq.ParquetFile(path), path, 16, DIM, cache, cache_dtype))
    assert first.dtype == np.dtype(cache_dtype)  # read from the cache, not Parquet
    np.testing.assert_array_equal(first, vecs["s0"][:16].astype(cache_dtype))


# --- the stage, end to end, with the real embedder ----------------------------------------

DOCS = {
    "bio": [
        "Cells transcribe DNA into messenger RNA, which ribosomes translate into proteins. "
        "Transcription is carried out by RNA polymerase and regulated by transcription factors.",
        "Mitochondria produce ATP through oxidative phosphorylation; the electron transport "
        "chain pumps protons across the inner membrane to drive ATP synthase.",
        "Enzymes lower the activation energy of reactions. Their activity depends on "
        "temperature, pH and the concentration of substrate and inhibitors.",
        "The immune system uses antibodies made by B cells to recognise antigens, while T "
        "cells kill infected cells and coordinate the immune response.",
        "Photosynthesis in chloroplasts converts light energy into chemical energy, fixing "
        "carbon dioxide into sugars in the Calvin cycle.",
        "Neurons transmit signals with action potentials; neurotransmitters cross the synapse "
        "and bind receptors on the next cell.",
    ],
    "misc": [
        "To brew espresso, grind the coffee finely, tamp it evenly and extract 30 ml in about "
        "25 seconds at nine bars of pressure for a balanced shot.",
        "Lagers ferment at cool temperatures with bottom-fermenting yeast, while ales use "
        "top-fermenting yeast at warmer temperatures, giving fruitier flavours.",
        "A sourdough starter is a culture of wild yeast and lactic acid bacteria; feed it "
        "flour and water daily and keep it at room temperature.",
        "Change the oil of a car engine every ten thousand kilometres and check the tyre "
        "pressure monthly to keep fuel consumption low.",
    ],
}


def _fewshot_file(path: Path, n: int = 3) -> Path:
    shots = [
        {"Text": "DNA is transcribed into RNA by RNA polymerase.",
         "Instruction": "What enzyme transcribes DNA?", "Output": "RNA polymerase."},
        {"Text": "ATP is made by ATP synthase in mitochondria.",
         "Instruction": "Where is most ATP made?", "Output": "In the mitochondria."},
        {"Text": "Antibodies are produced by B cells.",
         "Instruction": "Which cells make antibodies?", "Output": "B cells."},
    ][:n]
    path.write_text("".join(json.dumps(s) + "\n" for s in shots))
    return path


@pytest.fixture(scope="module")
def minilm():
    from craft_ray.models.embedder import load_sentence_transformer

    return load_sentence_transformer("sentence-transformers/all-MiniLM-L6-v2", "cpu", 256,
                                     False)


def build_text_store(tmp: Path, model, docs: dict[str, list[str]],
                     extra: dict[str, list[str]] | None = None) -> Path:
    """Write jsonl corpora, read them with the real readers, embed with MiniLM, write a
    store (data files + store.json with corpora and source paths)."""
    from craft_ray.models.embedder import encode_texts

    store = tmp / "store"
    shard_infos, corpora, shard_paths = [], [], {}
    for name, texts in docs.items():
        texts = texts + (extra or {}).get(name, [])
        src = tmp / "corpora" / name
        src.mkdir(parents=True, exist_ok=True)
        (src / "part-0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                   for t in texts))
        cfg = CorpusConfig(name=name, format="jsonl", paths=[str(src)], min_chars=20)
        corpora.append(cfg.model_dump(mode="json"))
        for shard in list_shards(cfg):
            recs = [r for r in read_shard(shard, cfg) if r["reject_reason"] is None]
            vec = encode_texts(model, [r["text"] for r in recs], 16)
            rel = write_data_file(store, name, shard.shard, vec,
                                  [r["text_len"] for r in recs], [r["row"] for r in recs])
            shard_infos.append(ShardInfo(corpus=name, shard=shard.shard, file=rel,
                                         num_rows=len(recs)))
            shard_paths[f"{name}/{shard.shard}"] = shard.path
    write_info(store, StoreInfo(model="sentence-transformers/all-MiniLM-L6-v2", dim=384,
                                shards=shard_infos, corpora=corpora, shard_paths=shard_paths))
    return store


def stage_cfg(tmp: Path, store: Path, fewshots: Path, **kw) -> RetrieveStageConfig:
    return RetrieveStageConfig(run_dir=str(tmp / "run"), retrieve=RetrieveConfig(
        fewshots=FewShotConfig(path=str(fewshots)), store=str(store), **kw))


def test_stage_end_to_end_with_leakage(ray_local, tmp_path: Path, minilm) -> None:
    fs = _fewshot_file(tmp_path / "shots.jsonl")
    shots = load_fewshots(FewShotConfig(path=str(fs)))
    # The first few-shot's exact embedding text is in the corpus: the guard must drop it.
    leaked_text = embed_text(shots[0])
    store = build_text_store(tmp_path, minilm, DOCS, extra={"bio": [leaked_text]})
    cfg = stage_cfg(tmp_path, store, fs, k=4, mode="mixed")
    stats = run_retrieve(cfg)
    out = Path(cfg.run_dir) / "retrieve"
    table = pq.read_table(out / "corpus_samples.parquet")
    assert table.column_names[:8] == ["doc_id", "corpus", "text", "metadata", "score",
                                      "fewshot_ids", "fewshot_ranks", "selected_by"]
    rows = table.to_pylist()
    assert len(rows) == 4 == stats["rows_out"]
    assert len({r["doc_id"] for r in rows}) == 4
    assert all(r["corpus"] == "bio" for r in rows), [r["doc_id"] for r in rows]
    assert all(r["text"] in DOCS["bio"] for r in rows)
    assert leaked_text not in {r["text"] for r in rows}
    leak = pq.read_table(out / "leakage.parquet").to_pylist()
    assert [(x["doc_id"], x["fewshot_id"]) for x in leak] == [("bio/part-0.jsonl#6", "shots:0")]
    assert stats["rejects"]["leakage"] == 1
    for r in rows:
        assert len(r["fewshot_ids"]) == len(r["fewshot_ranks"]) >= 1
        assert r["selected_by"] in {"per_shot", "mean", "both"}
        assert -1 <= r["score"] <= 1
    # DNA few-shot (shots:0) ranks the transcription document first among its own list.
    top_dna = [r for r in rows if "shots:0" in r["fewshot_ids"] and r["selected_by"] != "mean"]
    assert any(r["text"].startswith("Cells transcribe DNA") for r in top_dna)
    lines = (out / "corpus_samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["doc_id"] for x in lines] == [r["doc_id"] for r in rows]
    # A second run with the same config is skipped (success marker), same outputs.
    assert run_retrieve(cfg) == stats


def test_stage_quotas(ray_local, tmp_path: Path, minilm) -> None:
    from craft_ray.models.embedder import encode_texts

    fs = _fewshot_file(tmp_path / "shots.jsonl")
    store = build_text_store(tmp_path, minilm, DOCS)
    shots = load_fewshots(FewShotConfig(path=str(fs)))
    q = encode_texts(minilm, [embed_text(s) for s in shots], 8).astype(np.float32)
    cfg = stage_cfg(tmp_path, store, fs, k=4, mode="mean", quotas={"bio": 0.5, "misc": 0.5})
    stats = run_retrieve(cfg, prepared=prepare_retrieve(cfg, queries=q))
    rows = pq.read_table(Path(cfg.run_dir) / "retrieve" / "corpus_samples.parquet").to_pylist()
    # Without quotas every pick would be a biology document; the quota forces 2 + 2.
    assert stats["per_corpus"] == {"bio": 2, "misc": 2}
    assert {r["selected_by"] for r in rows} == {"mean"}
    assert all(r["fewshot_ids"] == ["shots:0", "shots:1", "shots:2"] for r in rows)


# --- bad inputs: one clear error before any work -----------------------------------------


def test_bad_inputs_fail_before_work(tmp_path: Path) -> None:
    store, info, _ = random_store(tmp_path, [10, 5])
    good = _fewshot_file(tmp_path / "shots.jsonl")
    q = np.zeros((3, DIM), np.float32)

    def prep(**kw):
        fs = kw.pop("fewshots", good)
        return prepare_retrieve(stage_cfg(tmp_path, store, fs, **kw), queries=q)

    assert prep(k=15).budgets["*"].k == 15
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(FewShotError, match="holds no few-shots"):
        prep(fewshots=empty)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"Text": "a", "Question": "b"}) + "\n")
    with pytest.raises(FewShotError, match=r"lacks string field\(s\) \['Instruction', 'Output'\]"):
        prep(fewshots=missing)
    with pytest.raises(RetrieveError, match="k=16 is larger than the corpus: the store holds 15"):
        prep(k=16)
    with pytest.raises(RetrieveError, match="embedded with model 'test-model'"):
        prep(k=5, model="sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(RetrieveError, match="holds 16-dim vectors but retrieve.dim is 384"):
        prep(k=5, dim=384)
    with pytest.raises(RetrieveError, match="quotas name corpora \\['web'\\]"):
        prep(k=5, quotas={"c": 0.5, "web": 0.5})
    # A data file whose vectors do not match store.json (a store from another model).
    write_data_file(store, "c", "s1", unit(np.random.default_rng(0), 5, 8))
    with pytest.raises(RetrieveError, match="has 8-dim vectors but store.json says 16"):
        prep(k=5)
    with pytest.raises(Exception, match="quotas must sum to 1"):
        RetrieveConfig(fewshots=FewShotConfig(path="x"), quotas={"a": 0.5})


def test_cli_reports_bad_input(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from craft_ray.cli import app

    store, _, _ = random_store(tmp_path, [4])
    cfgf = tmp_path / "c.yaml"
    cfgf.write_text(f"run_dir: {tmp_path}/run\nretrieve:\n  store: {store}\n  k: 5\n"
                    f"  fewshots: {{path: {_fewshot_file(tmp_path / 's.jsonl')}}}\n")
    res = CliRunner().invoke(app, ["retrieve", "--config", str(cfgf)])
    assert res.exit_code == 2
    assert "k=5 is larger than the corpus" in res.output
    assert not (tmp_path / "run" / "retrieve").exists()  # nothing started


# --- optional FAISS index -----------------------------------------------------------------


def test_faiss_flat_index_matches_brute_force_and_guards_leakage(tmp_path: Path) -> None:
    from craft_ray.stages.retrieve.config import IndexConfig
    from craft_ray.stages.retrieve.faiss_index import index_path, search_faiss

    store, info, vecs = random_store(tmp_path, [40, 25, 30], ties=False)
    rng = np.random.default_rng(5)
    queries = unit(rng, 4).astype(np.float32)
    cfg = IndexConfig(kind="flat")
    res = search_faiss(store, info, cfg, queries, 8, 8, None)
    assert index_path(store, cfg).is_file()
    per, mean = ranked_lists(res.pools["*"], 4, 8, 8)
    ref_per, ref_mean = brute_force(vecs, queries, 8)
    pool = res.pools["*"]
    assert [[str(pool.doc_id[u]) for u in lst] for lst in per] == ref_per
    assert [str(pool.doc_id[u]) for u in mean] == ref_mean
    # A query equal to a stored vector: the guard removes that document, the list stays full.
    queries[0] = vecs["s2"][3].astype(np.float32)
    res = search_faiss(store, info, cfg, queries, 8, 8, 0.98)
    assert res.n_leaked == 1 and res.leaked[0]["doc_id"] == "c/s2#3"
    per, _ = ranked_lists(res.pools["*"], 4, 8, 8)
    assert "c/s2#3" not in {str(res.pools["*"].doc_id[u]) for u in per[0]}
    assert len(per[0]) == 8
    # IVF (approximate) on the same store: built, searched, top hit found.
    ivf = search_faiss(store, info, IndexConfig(kind="ivf", nlist=2, nprobe=2), queries[1:],
                       5, 0, None)
    per, _ = ranked_lists(ivf.pools["*"], 3, 5, 0)
    assert [str(ivf.pools["*"].doc_id[lst[0]]) for lst in per] == [r[0] for r in ref_per[1:]]


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")
def test_gpu_scanner_matches_cpu(tmp_path: Path) -> None:
    store, info, vecs = random_store(tmp_path, [300], ties=False, dim=64)
    queries = unit(np.random.default_rng(6), 4, 64).astype(np.float32)
    path = str(store / info.shards[0].file)
    cpu = ShardScanner(queries, None, 64, 4).scan(path, 10, 10)["pool"]
    gpu = ShardScanner(queries, None, 64, 4, device="cuda").scan(path, 10, 10)["pool"]
    per_c, _ = ranked_lists(cpu, 4, 10, 10)
    per_g, _ = ranked_lists(gpu, 4, 10, 10)
    # fp16 products can swap near-ties; the sets must agree almost entirely.
    overlap = np.mean([len(set(cpu.doc_id[a]) & set(gpu.doc_id[b])) / 10
                       for a, b in zip(per_c, per_g)])
    assert overlap >= 0.9
