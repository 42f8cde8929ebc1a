"""What every generation strategy shares: prompt rows, one backend pass per step, JSON steps
validated against their schema, few-shot draws, store vectors, the embedder, the outputs.

A strategy is a short sequence of *steps* (CST: questions, then answers; multihop:
decomposition, long answers, final answer; rag_answer: questions, evaluation, answers).
A step is a list of prompt rows sent through the configured backend (:func:`run_step`, the
same hf / openai / vllm code and guided decoding as the craft strategy), and every output is
parsed and validated against the step's JSON schema (:class:`StepTask` through
:func:`craft_ray.stages.generate.parse.parse_row`): an output that fails becomes a reject
with its reason, never an exception. Each step's prompts and outputs are kept in
``RUN_DIR/generate/steps/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from craft_ray.runtime import storage
from craft_ray.tasks import Task, TaskValidationError
from craft_ray.tasks.fewshots import FewShot

logger = logging.getLogger(__name__)

DROP_TOO_LONG = "Prompt longer than max_prompt_tokens."

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class StepTask(Task):
    """One step's JSON answer as a task: validated with ``jsonschema`` against the same schema
    guided decoding used, so an unguided backend is held to the same contract."""

    def __init__(self, name: str, schema: dict[str, Any]) -> None:
        self.name = name
        self.schema = schema
        self.record_fields = list(schema.get("properties", {}))

    def validate(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        import jsonschema

        err = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(self.schema).iter_errors(dict(obj)))
        if err is not None:
            where = "/".join(str(p) for p in err.absolute_path) or "answer"
            raise TaskValidationError(f"{self.name}: '{where}' breaks the schema "
                                      f"({err.validator}).")
        out = {k: obj[k] for k in self.record_fields if k in obj}
        for k, v in out.items():  # guided decoding can satisfy minLength with whitespace only
            if isinstance(v, str) and not v.strip() and self.schema["properties"][k].get(
                    "minLength", 0) > 0:
                raise TaskValidationError(f"{self.name}: '{k}' is blank.")
        return {k: v.strip() if isinstance(v, str) else v for k, v in out.items()}


def obj_schema(props: dict[str, Any]) -> dict[str, Any]:
    """A closed JSON object schema with every property required."""
    return {"type": "object", "properties": props, "required": list(props),
            "additionalProperties": False}


def text_prop(min_chars: int = 1) -> dict[str, Any]:
    return {"type": "string", "minLength": min_chars}


def shorten(text: str, max_chars: int | None) -> str:
    """``text`` cut to about ``max_chars`` at a word boundary (None: unchanged)."""
    from craft_ray.stages.generate.prompts import shorten as _shorten

    return _shorten(text.strip(), max_chars)


def sentence_cuts(text: str) -> list[int]:
    """Character offsets where a sentence ends (after its whitespace), inside ``text``."""
    return [m.end() for m in _SENTENCE_END.finditer(text) if 0 < m.end() < len(text)]


def token_cuts(text: str) -> list[int]:
    """Character offsets where a whitespace-separated token starts, inside ``text``."""
    return [m.end() for m in re.finditer(r"\s+", text) if 0 < m.end() < len(text)]


@dataclass
class StepContext:
    """Everything a strategy's steps need from the generate config (built in the driver)."""

    cfg: Any  # GenerateConfig (not imported: generate imports this package lazily)
    tokenizer: Any | None
    budget: int | None
    stage_path: str  # the stage's folder: a local path or an object-store URI
    shots: list[FewShot]
    seed: int
    sampling: dict[str, Any]
    guided_cap: int | None
    step_stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    def draw_shots(self, key: str) -> list[FewShot]:
        """``num_shots`` few-shots for an item (seeded by the item's key: rerun-stable)."""
        k = min(self.cfg.num_shots, len(self.shots))
        rng = random.Random(f"{self.seed}:{key}")
        return [self.shots[i] for i in sorted(rng.sample(range(len(self.shots)), k))]

    def shot_text(self, shot: FewShot) -> str:
        return shorten(shot.text, self.cfg.fewshot_text_max_chars)


def prompt_row(ctx: StepContext, sample_id: str, messages: list[dict[str, str]],
               schema: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """A prompt row in the backends' input columns; ``drop_reason`` set when it is too long."""
    from craft_ray.backends import cap_string_lengths

    row: dict[str, Any] = {
        "sample_id": sample_id, "prompt": "", "prompt_token_ids": [],
        "messages": json.dumps(messages, ensure_ascii=False),
        "schema": json.dumps(cap_string_lengths(schema, ctx.guided_cap)),
        "max_new_tokens": int(max_new_tokens), "prompt_tokens": -1, "drop_reason": "",
    }
    if ctx.tokenizer is not None:
        text = ctx.tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        ids = list(ctx.tokenizer(text, add_special_tokens=False)["input_ids"])
        row.update(prompt=text, prompt_token_ids=ids, prompt_tokens=len(ids))
        if ctx.budget is not None and len(ids) > ctx.budget:
            row["drop_reason"] = DROP_TOO_LONG
    row["prompt_hash"] = hashlib.sha256(
        (row["prompt"] or row["messages"]).encode()).hexdigest()[:16]
    return row


def final_results(results: dict[str, dict[str, Any]], by_id: dict[str, Any], step: str
                  ) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """The last step's results, item by item: each item gets its prompt hash; an unparsed
    result rejects it (reason from the step); the parsed ones are yielded as
    ``(sample_id, item, result)`` for the strategy to build its record."""
    for sid, res in results.items():
        it = by_id[sid]
        it.prompt_hash = res["prompt_hash"]
        if res["obj"] is None:
            it.reject(step, res["reason"], res["detail"], res["text"])
            continue
        yield sid, it, res


def run_step(ctx: StepContext, name: str, rows: list[dict[str, Any]], schema: dict[str, Any],
             sampling: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Generate every kept row through the configured backend and parse it.

    Returns ``sample_id -> {"obj", "reason", "detail", "text", "prompt_hash"}``: ``obj`` is the
    validated JSON answer or None (then ``reason`` says why: a prompt drop, a backend error, a
    truncation or a schema violation). Ray must be initialised.
    """
    import pyarrow as pa
    import ray.data

    from craft_ray.stages.generate.parse import parse_row
    from craft_ray.stages.generate.stage import backend_dataset

    step_task = StepTask(name, schema)
    out: dict[str, dict[str, Any]] = {}
    kept = [r for r in rows if not r["drop_reason"]]
    for r in rows:
        if r["drop_reason"]:
            out[r["sample_id"]] = {"obj": None, "reason": r["drop_reason"], "text": "",
                                   "detail": f"{r['prompt_tokens']} tokens > {ctx.budget}",
                                   "prompt_hash": r["prompt_hash"]}
    gens: list[dict[str, Any]] = []
    if kept:
        cols = ["sample_id", "prompt", "prompt_token_ids", "messages", "schema",
                "max_new_tokens", "prompt_hash"]
        ds = ray.data.from_items([{c: r[c] for c in cols} for r in kept])
        gens = backend_dataset(ds, ctx.cfg, sampling or ctx.sampling).take_all()
    reasons: Counter[str] = Counter()
    for g in gens:
        obj, reason, detail = parse_row(step_task, str(g.get("text") or ""),
                                        str(g.get("finish_reason") or ""),
                                        str(g.get("error") or ""))
        reasons[reason or "ok"] += 1
        out[str(g["sample_id"])] = {"obj": obj, "reason": reason,
                                    "detail": detail or str(g.get("error_detail") or ""),
                                    "text": str(g.get("text") or ""),
                                    "prompt_hash": str(g["prompt_hash"])}
    step_rows = [{"sample_id": r["sample_id"], "prompt_hash": r["prompt_hash"],
                  "messages": r["messages"], "text": out[r["sample_id"]]["text"],
                  "reason": out[r["sample_id"]]["reason"]} for r in rows]
    storage.write_parquet(storage.join(ctx.stage_path, "steps", f"{name}.parquet"),
                          pa.Table.from_pylist(step_rows, schema=pa.schema(
                              [(c, pa.string()) for c in ("sample_id", "prompt_hash", "messages",
                                                          "text", "reason")])))
    ctx.step_stats[name] = {"prompts": len(rows), "generated": len(gens),
                            "outcomes": dict(sorted(reasons.items()))}
    logger.info("generate[%s]: %d prompts, %d generated, %s", name, len(rows), len(gens),
                dict(reasons))
    return out


# --- documents and vectors -----------------------------------------------------------------


def read_docs(path: str | Path, limit: int | None) -> list[dict[str, Any]]:
    """Corpus-sample rows (doc_id, text, corpus, fewshot_ids) read in the driver."""
    import pyarrow.json as pjson

    table = (pjson.read_json(storage.local_copy(path)) if str(path).endswith((".jsonl", ".json"))
             else storage.read_table(path))
    keep = [c for c in ("doc_id", "corpus", "text", "fewshot_ids") if c in table.column_names]
    rows = table.select(keep).to_pylist()
    rows = rows[:limit] if limit else rows
    for r in rows:
        r["doc_id"] = str(r["doc_id"])
        r["text"] = str(r.get("text") or "")
        r["corpus"] = str(r.get("corpus") or r["doc_id"].split("/", 1)[0])
        r["fewshot_ids"] = [str(x) for x in (r.get("fewshot_ids") or [])]
    return rows


def store_vectors(store: str | Path, doc_ids: Sequence[str]) -> np.ndarray:
    """The store's unit vectors of ``doc_ids`` (float32 [n, dim], in the given order).

    Reuses the embed stage's store (the vectors the retrieve stage searched), so pairing and
    noise follow the same geometry as retrieval. A missing doc id is a ``KeyError``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from craft_ray.store.vectors import read_info, read_shard_table, vectors_of

    info = read_info(store)
    wanted = pa.array(list(doc_ids), type=pa.string())
    found: dict[str, np.ndarray] = {}
    for shard in info.shards:
        t = read_shard_table(store, shard, ["doc_id", "embedding"])
        t = t.filter(pc.is_in(t.column("doc_id"), value_set=wanted))
        if t.num_rows:
            vecs = vectors_of(t).astype(np.float32)
            found.update(zip(t.column("doc_id").to_pylist(), vecs))
    missing = [d for d in doc_ids if d not in found]
    if missing:
        raise KeyError(f"{len(missing)} document(s) not in the store {store} (e.g. "
                       f"{missing[0]!r}); was the store rebuilt after retrieval?")
    return np.stack([found[d] for d in doc_ids]) if doc_ids else np.zeros((0, info.dim))


def store_path(setting: str | None, run_dir: str | Path) -> str:
    """The configured store, else ``RUN_DIR/embed/store`` (local or object storage); a clear
    error when absent."""
    from craft_ray.config import ConfigError

    p = setting or storage.join(run_dir, "embed", "store")
    if not storage.is_file(storage.join(p, "store.json")):
        raise ConfigError(f"embedding store {storage.redact(p)} not found: run `craft-ray "
                          "embed` first or set the strategy's `store` to a store folder")
    return p


class Embedder:
    """A sentence-transformers model loaded once (offline MiniLM by default)."""

    def __init__(self, name: str) -> None:
        from craft_ray.models.embedder import load_sentence_transformer

        self.model = load_sentence_transformer(name)

    def __call__(self, texts: list[str]) -> np.ndarray:
        from craft_ray.models.embedder import encode_texts

        if not texts:
            return np.zeros((0, 1), dtype=np.float32)
        return encode_texts(self.model, texts, 64).astype(np.float32)


# --- outputs -------------------------------------------------------------------------------

PROVENANCE = ("sample_id", "task", "doc_id", "corpus", "fewshot_ids", "retrieved_by",
              "variant", "prompt_hash", "sample_text")


@dataclass
class Item:
    """One candidate sample of a strategy: its record (None: rejected) and provenance."""

    sample_id: str
    doc_id: str
    corpus: str
    fewshot_ids: list[str]
    retrieved_by: list[str]
    record: dict[str, Any] | None = None
    reject_reason: str = ""
    reject_detail: str = ""
    step: str = ""
    text: str = ""
    prompt_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def reject(self, step: str, reason: str, detail: str = "", text: str = "") -> None:
        self.record, self.step, self.reject_reason = None, step, reason
        self.reject_detail, self.text = detail, text


def write_outputs(stage_path: str, task: Task, items: Sequence[Item], strategy: str,
                  record_types: Callable[[], Any]) -> dict[str, Any]:
    """``clean.parquet`` / ``clean.jsonl`` (records + provenance) and ``rejects.parquet``.

    A record that breaks its strategy's contract (``task.validate``) becomes a reject here, so
    ``clean`` holds only valid records. Returns counts for stats.json.
    """
    import pyarrow as pa

    clean, rejects = [], []
    for it in items:
        if it.record is not None:
            try:
                rec = task.validate(it.record)
            except TaskValidationError as exc:
                it.reject("record", str(exc))
            else:
                clean.append({**rec, "sample_id": it.sample_id, "task": strategy,
                              "doc_id": it.doc_id, "corpus": it.corpus,
                              "fewshot_ids": it.fewshot_ids, "retrieved_by": it.retrieved_by,
                              "variant": strategy, "prompt_hash": it.prompt_hash,
                              "sample_text": task.sample_text(rec), **it.extra})
                continue
        rejects.append({"sample_id": it.sample_id, "task": strategy, "doc_id": it.doc_id,
                        "corpus": it.corpus, "fewshot_ids": it.fewshot_ids, "step": it.step,
                        "prompt_hash": it.prompt_hash, "reject_reason": it.reject_reason,
                        "reject_detail": it.reject_detail, "text": it.text})
    lst = pa.list_(pa.string())
    prov = [("sample_id", pa.string()), ("task", pa.string()), ("doc_id", pa.string()),
            ("corpus", pa.string()), ("fewshot_ids", lst), ("retrieved_by", lst),
            ("variant", pa.string()), ("prompt_hash", pa.string()), ("sample_text", pa.string())]
    extra_keys = sorted({k for r in clean for k in r} - set(task.record_fields) -
                        {n for n, _ in prov})
    schema = pa.schema(list(record_types()) + prov)
    for k in extra_keys:
        schema = schema.append(pa.field(k, pa.float64() if k.endswith("similarity") else lst))
    clean.sort(key=lambda r: r["sample_id"])
    storage.write_parquet(storage.join(stage_path, "clean.parquet"),
                          pa.Table.from_pylist(clean, schema=schema))
    storage.write_text(storage.join(stage_path, "clean.jsonl"), "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in clean))
    rej_schema = pa.schema([("sample_id", pa.string()), ("task", pa.string()),
                            ("doc_id", pa.string()), ("corpus", pa.string()),
                            ("fewshot_ids", lst), ("step", pa.string()),
                            ("prompt_hash", pa.string()), ("reject_reason", pa.string()),
                            ("reject_detail", pa.string()), ("text", pa.string())])
    rejects.sort(key=lambda r: r["sample_id"])
    storage.write_parquet(storage.join(stage_path, "rejects.parquet"),
                          pa.Table.from_pylist(rejects, schema=rej_schema))
    return {"items": len(items), "clean": len(clean),
            "rejects": Counter(r["reject_reason"] for r in rejects)}
