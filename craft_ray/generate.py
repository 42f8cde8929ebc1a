"""Generation stage: corpus samples + few-shots -> prompts -> generator -> task samples.

The pipeline (two Ray Data executions; prompts are written in between so that what was asked
is on disk next to what came back)::

    corpus_samples.parquet -> map_batches(PromptBuilder)       actor pool, tokenizer once/actor
                           -> RUN_DIR/generate/prompts/          one row per prompt
    prompts (kept rows)    -> backend (hf | openai | vllm)       same output columns for all
                           -> map_batches(parse_batch)           JSON extraction + validation
                           -> RUN_DIR/generate/generations/      one row per generation

Then the driver splits the generations into ``raw.parquet`` (every generation),
``clean.parquet`` (valid task samples, the contract of the filter stage) and
``rejects.parquet`` (with reasons); prompts dropped before generation (too long, empty text)
go to ``prompt_drops.parquet``.

Invariants (checked before ``_SUCCESS`` is written):
``prompts = raw + prompt drops`` and ``raw = clean + rejects``: no row is lost.

Reproducibility: prompt ``j`` of document ``d`` draws its few-shots (and, for csqa, its
question/statement variant) from ``random.Random(f"{seed}:{d}:{j}")``, so a rerun builds the
same prompts; sampling is seeded per row where the backend allows it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from craft_ray.backends.hf import HFBackendConfig
from craft_ray.backends.openai_compat import OpenAIBackendConfig
from craft_ray.backends.vllm import VLLMBackendConfig
from craft_ray.config import ConfigError, RayConfig, StrictModel
from craft_ray.fewshots import FewShotConfig, FewShotError, load_fewshots
from craft_ray.models.gguf import resolve_model_path
from craft_ray.runtime import StageDir, StageStats, atomic_write_text, tmp_path_for
from craft_ray.tasks import (
    MALFORMED_JSON,
    NO_JSON,
    CustomTaskConfig,
    Task,
    TaskError,
    TaskValidationError,
    get_task,
)

logger = logging.getLogger(__name__)

# Fixed reasons of prompt-level drops and generation-level rejects (counted in stats.json).
DROP_EMPTY = "Empty document text."
DROP_TOO_LONG = "Prompt longer than max_prompt_tokens."
DROP_NO_ROOM = "Few-shots leave too little room for the text."
REJECT_TRUNCATED = "Truncated at max tokens."

SEPARATOR = "\n\n___________\nText: "  # CRAFT's separator between meta-instruction and text


class GenerateConfig(StrictModel):
    """Config of ``craft-ray generate``."""

    task: str | CustomTaskConfig = Field(
        description="A built-in task (bioqa, medqa, csqa, recipegen, summarization) or a "
        "custom task (name, meta_instruction, fields or json_schema, ...)."
    )
    fewshots: FewShotConfig = Field(description="The human few-shots shown in the prompts.")
    input_path: str | None = Field(
        default=None,
        description="Corpus samples (Parquet or JSONL with doc_id, text[, corpus, "
        "fewshot_ids]). Default: RUN_DIR/retrieve/corpus_samples.parquet.",
    )
    limit: int | None = Field(default=None, ge=1, description="Use only the first N documents.")
    samples_per_doc: int = Field(
        default=1, ge=1, le=64,
        description="Prompts per document, each with its own few-shot draw (CRAFT: 1).",
    )
    num_shots: int = Field(default=3, ge=0, le=64, description="Few-shots per prompt (CRAFT: 3).")
    fewshot_text_max_chars: int | None = Field(
        default=None, ge=50, le=10_000_000,
        description="Shorten each few-shot's text to about this many characters (cut at a "
        "word boundary) for small-context generators. None: as written (CRAFT).",
    )
    seed: int = Field(default=0, ge=0, description="Seed of few-shot draws and sampling.")
    backend: Literal["hf", "openai", "vllm"] = Field(
        default="hf",
        description="hf: transformers on CPU/one GPU; openai: an OpenAI-compatible server; "
        "vllm: vLLM engines via ray.data.llm (GPU clusters).",
    )
    model: str = Field(
        description="Generator: HF model id or local path (hf, vllm); the served model name "
        "(openai). CRAFT: mistralai/Mistral-7B-Instruct-v0.2."
    )
    tokenizer: str | None = Field(
        default=None,
        description="Tokenizer (id or path) whose chat template renders the prompts and counts "
        "tokens. Default: the model (hf, vllm); none for openai chat (no length rule then).",
    )
    max_new_tokens: int | None = Field(
        default=None, ge=1, le=131_072,
        description="Generated tokens per sample. Default: CRAFT's per task (bioqa 1536, medqa "
        "256, csqa 256, recipegen 1280, summarization 1536).",
    )
    temperature: float = Field(default=0.7, ge=0, le=5, description="Sampling temperature "
                               "(CRAFT 0.7; 0 = greedy).")
    top_p: float = Field(default=0.9, gt=0, le=1, description="Nucleus sampling (CRAFT 0.9).")
    top_k: int = Field(default=40, ge=-1, le=100_000, description="Top-k (CRAFT 40; -1 off).")
    guided_decoding: bool = Field(
        default=True,
        description="Constrain generation to the task's JSON schema (xgrammar for hf, "
        "structured outputs for vllm, response_format for openai).",
    )
    guided_max_string_chars: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="With guided decoding: cap every free string of the schema at this many "
        "characters (bounds runaway strings; None: no cap).",
    )
    max_prompt_tokens: int | None = Field(
        default=None, ge=16, le=10_000_000,
        description="Longest prompt allowed. Default: the model's context minus "
        "max_new_tokens (CRAFT filtered prompts above 16384 tokens).",
    )
    long_prompt: Literal["truncate_text", "drop"] = Field(
        default="truncate_text",
        description="A prompt over max_prompt_tokens: truncate the document text to fit, or "
        "drop the prompt (CRAFT dropped). Both are counted in stats.",
    )
    min_text_tokens: int = Field(
        default=64, ge=1, le=1_000_000,
        description="Truncation never leaves fewer document tokens than this (else: drop).",
    )
    prompt_batch_size: int = Field(default=64, ge=1, le=100_000,
                                   description="Documents per prompt-building call.")
    prompt_concurrency: int = Field(default=1, ge=1, le=1024,
                                    description="Prompt-building actors.")
    max_error_rate: float = Field(
        default=0.5, ge=0, le=1,
        description="Fail the stage (after writing outputs) when more than this fraction of "
        "generations failed in the backend (server errors, timeouts, engine errors).",
    )
    hf: HFBackendConfig = Field(default_factory=HFBackendConfig,
                                description="Settings of the hf backend.")
    openai: OpenAIBackendConfig = Field(default_factory=OpenAIBackendConfig,
                                        description="Settings of the openai backend.")
    vllm: VLLMBackendConfig = Field(default_factory=VLLMBackendConfig,
                                    description="Settings of the vllm backend.")

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str | CustomTaskConfig) -> str | CustomTaskConfig:
        try:
            get_task(v)
        except TaskError as exc:
            raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _backend_needs(self) -> GenerateConfig:
        if self.backend == "openai" and self.openai.api == "completions" and not self.tokenizer:
            raise ValueError(
                "openai.api=completions sends a locally rendered prompt: set generate.tokenizer "
                "to the served model's tokenizer (or use openai.api=chat)"
            )
        return self

    def task_obj(self) -> Task:
        """The configured :class:`Task`."""
        return get_task(self.task)

    def tokenizer_name(self) -> str | None:
        """Tokenizer used to render and count prompts (None: none available)."""
        if self.tokenizer:
            return self.tokenizer
        return None if self.backend == "openai" else self.model

    def sampling(self) -> dict[str, Any]:
        """Sampling settings handed to the backends."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "seed": self.seed, "guided": self.guided_decoding}


class GenerateStageConfig(StrictModel):
    """A YAML file for ``craft-ray generate``: common keys plus the ``generate`` section."""

    run_dir: str = Field(default="runs/default", description="Run directory.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    generate: GenerateConfig


# --- prompts (plain functions) ------------------------------------------------------------


@dataclass
class ShotPool:
    """The few-shots as shown in prompts: id, text and answer JSON per prompt variant."""

    ids: list[str]
    texts: list[str]
    answers: dict[str, list[str]]  # variant name -> answer JSON per few-shot
    quirks: dict[str, list[str]]  # few-shot id -> notes (only the quirky ones)


def shorten(text: str, max_chars: int | None) -> str:
    """``text`` cut to at most ``max_chars`` characters at a word boundary (None: unchanged)."""
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return cut[:space] if space > max_chars // 2 else cut


def make_shot_pool(task: Task, fewshots: FewShotConfig, text_max_chars: int | None = None
                   ) -> ShotPool:
    """Load and convert the few-shots; quirks are logged and returned, never fatal."""
    shots = load_fewshots(fewshots)
    records, quirks = [], {}
    for shot in shots:
        rec, notes = task.convert_fewshot(shot)
        records.append(rec)
        if notes:
            quirks[shot.id] = notes
            for n in notes:
                logger.warning("few-shot %s: %s", shot.id, n)
    answers = {v.name: [v.to_answer_json(r) for r in records] for v in task.variants}
    texts = [shorten(s.text.strip(), text_max_chars) for s in shots]
    return ShotPool([s.id for s in shots], texts, answers, quirks)


def user_message(meta_instruction: str, text: str) -> str:
    """One user turn: CRAFT's meta-instruction, separator, then the text."""
    return f"{meta_instruction.strip()}{SEPARATOR}{text.strip()}"


def build_messages(task: Task, pool: ShotPool, variant: str, shot_idx: Sequence[int],
                   text: str) -> list[dict[str, str]]:
    """The chat: (user: instruction + few-shot text, assistant: its JSON) x k, then the doc."""
    meta = task.variant(variant).meta_instruction
    msgs: list[dict[str, str]] = []
    for i in shot_idx:
        msgs.append({"role": "user", "content": user_message(meta, pool.texts[i])})
        msgs.append({"role": "assistant", "content": pool.answers[variant][i]})
    msgs.append({"role": "user", "content": user_message(meta, text)})
    return msgs


def draw(seed: int, doc_id: str, j: int, n_shots: int, k: int, variants: Sequence[str]
         ) -> tuple[str, list[int]]:
    """Variant and few-shot indices of prompt ``j`` of a document (seeded, rerun-stable)."""
    rng = random.Random(f"{seed}:{doc_id}:{j}")
    variant = rng.choice(list(variants)) if len(variants) > 1 else variants[0]
    return variant, rng.sample(range(n_shots), k)


@dataclass
class PromptSettings:
    """What the prompt builder needs besides the task and the few-shots."""

    task_name: str
    num_shots: int
    samples_per_doc: int
    seed: int
    max_new_tokens: int
    max_prompt_tokens: int | None
    long_prompt: str
    min_text_tokens: int
    guided_max_string_chars: int | None


def _render(tokenizer: Any, msgs: list[dict[str, str]]) -> tuple[str, list[int]]:
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # The template already holds the special tokens (BOS...): none are added again.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text, list(ids)


def build_prompt_rows(docs: list[dict[str, Any]], task: Task, pool: ShotPool,
                      st: PromptSettings, tokenizer: Any | None) -> list[dict[str, Any]]:
    """Prompt rows (see :data:`PROMPT_COLUMNS`) for a list of corpus-sample rows.

    Every document gives ``samples_per_doc`` rows; a row that cannot be generated carries a
    ``drop_reason`` instead of being left out.
    """
    from craft_ray.backends import cap_string_lengths

    variants = [v.name for v in task.variants]
    schemas = {v.name: json.dumps(cap_string_lengths(v.schema, st.guided_max_string_chars))
               for v in task.variants}
    rows = []
    for doc in docs:
        doc_id = str(doc["doc_id"])
        text = str(doc.get("text") or "")
        for j in range(st.samples_per_doc):
            variant, idx = draw(st.seed, doc_id, j, len(pool.ids), st.num_shots, variants)
            row = {
                "sample_id": f"{doc_id}@{j}", "task": st.task_name, "doc_id": doc_id,
                "corpus": str(doc.get("corpus") or doc_id.split("/", 1)[0]),
                "retrieved_by": [str(x) for x in (doc.get("fewshot_ids") or [])],
                "fewshot_ids": [pool.ids[i] for i in idx], "variant": variant,
                "prompt": "", "prompt_token_ids": [], "messages": "", "schema": schemas[variant],
                "prompt_hash": "", "prompt_tokens": -1, "max_new_tokens": st.max_new_tokens,
                "text_truncated": False, "drop_reason": "", "drop_detail": "",
            }
            rows.append(row)
            if not text.strip():
                row.update(drop_reason=DROP_EMPTY, drop_detail="the document text is empty")
                continue
            msgs = build_messages(task, pool, variant, idx, text)
            if tokenizer is not None:
                prompt, ids = _render(tokenizer, msgs)
                budget = st.max_prompt_tokens
                if budget is not None and len(ids) > budget:
                    if st.long_prompt == "drop":
                        row.update(drop_reason=DROP_TOO_LONG, prompt_tokens=len(ids),
                                   drop_detail=f"{len(ids)} tokens > {budget}")
                        continue
                    fitted = _fit_text(tokenizer, task, pool, variant, idx, text, len(ids),
                                       budget, st.min_text_tokens)
                    if isinstance(fitted, str):
                        row.update(drop_reason=fitted, prompt_tokens=len(ids),
                                   drop_detail=f"{len(ids)} tokens > {budget}")
                        continue
                    msgs, prompt, ids = fitted
                    row["text_truncated"] = True
                row.update(prompt=prompt, prompt_token_ids=ids, prompt_tokens=len(ids))
            row["messages"] = json.dumps(msgs, ensure_ascii=False)
            row["prompt_hash"] = hashlib.sha256(
                (row["prompt"] or row["messages"]).encode()).hexdigest()[:16]
    return rows


def _fit_text(tokenizer: Any, task: Task, pool: ShotPool, variant: str, idx: list[int],
              text: str, n_tokens: int, budget: int, min_text_tokens: int
              ) -> tuple[list[dict[str, str]], str, list[int]] | str:
    """Cut the document text (in tokens) until the prompt fits; a drop reason if it cannot."""
    doc_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = len(doc_ids)
    over = n_tokens - budget
    for _ in range(4):  # token counts of a decoded cut can differ slightly: re-check
        keep = keep - over - 2
        if keep < min_text_tokens:
            return DROP_NO_ROOM
        cut = tokenizer.decode(doc_ids[:keep], skip_special_tokens=True)
        msgs = build_messages(task, pool, variant, idx, cut)
        prompt, ids = _render(tokenizer, msgs)
        if len(ids) <= budget:
            return msgs, prompt, ids
        over = len(ids) - budget
    return DROP_TOO_LONG


def prompt_schema() -> Any:
    """Arrow schema of prompt rows."""
    import pyarrow as pa

    return pa.schema([
        ("sample_id", pa.string()), ("task", pa.string()), ("doc_id", pa.string()),
        ("corpus", pa.string()), ("retrieved_by", pa.list_(pa.string())),
        ("fewshot_ids", pa.list_(pa.string())), ("variant", pa.string()),
        ("prompt", pa.string()), ("prompt_token_ids", pa.list_(pa.int32())),
        ("messages", pa.string()), ("schema", pa.string()), ("prompt_hash", pa.string()),
        ("prompt_tokens", pa.int64()), ("max_new_tokens", pa.int64()),
        ("text_truncated", pa.bool_()), ("drop_reason", pa.string()),
        ("drop_detail", pa.string()),
    ])


class PromptBuilder:
    """Ray Data actor: tokenizer loaded once, builds prompt rows per batch of documents."""

    def __init__(self, task_spec: Any, pool: ShotPool, settings: PromptSettings,
                 tokenizer: str | None) -> None:
        self.task = get_task(task_spec)
        self.pool = pool  # converted in the driver: workers need no access to the file
        self.settings = settings
        self.tokenizer = load_tokenizer(tokenizer)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = build_prompt_rows(batch.to_pylist(), self.task, self.pool, self.settings,
                                 self.tokenizer)
        return pa.Table.from_pylist(rows, schema=prompt_schema())


def local_ref(name: str | None) -> str | None:
    """A model reference resolved for workers: a local path made absolute (Ray workers may run
    elsewhere), a GGUF file or ``pkg://`` spec converted to its cached HF folder; ids unchanged."""
    return resolve_model_path(name) if name is not None else None


def load_tokenizer(name: str | None) -> Any | None:
    """A transformers tokenizer with a chat template, or None."""
    if name is None:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            f"tokenizer {name!r} has no chat template; prompts are rendered with the "
            "generator's own template. Use an instruct/chat model, or set generate.tokenizer "
            "to one that has a template."
        )
    # Prompt length is governed by the stage's own rule (max_prompt_tokens); silence the
    # tokenizer's "longer than model_max_length" warning when counting long prompts.
    tok.model_max_length = 10**12
    return tok


# --- parsing (plain function) -------------------------------------------------------------


def source_document(messages: str | None) -> str:
    """The document text of a prompt: the part of its last user turn after the separator."""
    if not messages:
        return ""
    users = [m["content"] for m in json.loads(messages) if m.get("role") == "user"]
    return users[-1].rsplit(SEPARATOR, 1)[-1] if users else ""


def parse_row(task: Task, text: str, finish_reason: str, error: str, source: str = ""
              ) -> tuple[dict[str, Any] | None, str, str]:
    """(record or None, reject reason, detail) of one generation; ``source`` is the document
    it was generated from (for the task's no-verbatim-copy rules)."""
    if error:
        return None, error, ""
    try:
        return task.parse(text, source), "", ""
    except TaskValidationError as exc:
        reason = str(exc)
        if finish_reason == "length" and reason in (MALFORMED_JSON, NO_JSON):
            return None, REJECT_TRUNCATED, reason
        return None, reason, ""


GENERATION_COLUMNS = (
    "sample_id", "task", "doc_id", "corpus", "retrieved_by", "fewshot_ids", "variant",
    "prompt_hash", "prompt_tokens", "text_truncated", "text", "tokens_in", "tokens_out",
    "gen_seconds", "finish_reason", "error", "error_detail",
)


def parse_batch(batch: Any, task_spec: Any) -> Any:
    """Ray Data UDF (pyarrow batches): add ``status``, ``reject_reason``, ``reject_detail``,
    ``record`` (JSON) and ``sample_text``; drop the heavy prompt columns."""
    import pyarrow as pa

    task = get_task(task_spec)
    cols = {c: batch.column(c).to_pylist() for c in ("text", "finish_reason", "error")}
    msgs = (batch.column("messages").to_pylist() if "messages" in batch.column_names
            else [""] * batch.num_rows)
    status, reasons, details, records, texts = [], [], [], [], []
    for text, fin, err, m in zip(cols["text"], cols["finish_reason"], cols["error"], msgs):
        rec, reason, detail = parse_row(task, text or "", fin or "", err or "",
                                        source_document(m))
        status.append("clean" if rec is not None else "reject")
        reasons.append(reason)
        details.append(detail)
        records.append(json.dumps(rec, ensure_ascii=False) if rec is not None else "")
        texts.append(task.sample_text(rec) if rec is not None else "")
    out = batch.select([c for c in GENERATION_COLUMNS if c in batch.column_names])
    for name, vals in (("status", status), ("reject_reason", reasons),
                       ("reject_detail", details), ("record", records),
                       ("sample_text", texts)):
        out = out.append_column(name, pa.array(vals, type=pa.string()))
    return out


# --- the lazy plans ---------------------------------------------------------------------


def prompts_dataset(docs: Any, cfg: GenerateConfig, settings: PromptSettings, pool: ShotPool
                    ) -> Any:
    """Lazy: corpus-sample rows -> prompt rows."""
    import ray.data

    return docs.map_batches(
        PromptBuilder, batch_size=cfg.prompt_batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.prompt_concurrency), num_cpus=1,
        fn_constructor_kwargs={"task_spec": _task_spec(cfg), "pool": pool,
                               "settings": settings,
                               "tokenizer": local_ref(cfg.tokenizer_name())},
    )


def generations_dataset(prompts: Any, cfg: GenerateConfig) -> Any:
    """Lazy: prompt rows (kept ones) -> backend -> parsed generation rows."""
    from ray.data.expressions import col

    kept = prompts.filter(expr=col("drop_reason") == "")  # dropped prompts are not generated
    sampling = cfg.sampling()
    if cfg.backend == "hf":
        from craft_ray.backends.hf import hf_generate

        gen = hf_generate(kept, local_ref(cfg.model) or cfg.model, local_ref(cfg.tokenizer),
                          cfg.hf, sampling)
    elif cfg.backend == "openai":
        from craft_ray.backends.openai_compat import openai_generate

        gen = openai_generate(kept, cfg.model, cfg.openai, sampling)
    else:
        from craft_ray.backends.vllm import vllm_generate

        gen = vllm_generate(kept, local_ref(cfg.model) or cfg.model, cfg.vllm, sampling)
    return gen.map_batches(parse_batch, batch_format="pyarrow", batch_size=256, num_cpus=0.25,
                           fn_kwargs={"task_spec": _task_spec(cfg)})


def _task_spec(cfg: GenerateConfig) -> Any:
    return cfg.task if isinstance(cfg.task, str) else cfg.task.model_dump(mode="json")


# --- stage runner -------------------------------------------------------------------------


def _model_context(name: str) -> int | None:
    """The generator's context length from its config (None when unknown)."""
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(resolve_model_path(name))
    except Exception:  # not a local/hub model (e.g. an openai served name)
        return None
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(c, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def prompt_budget(cfg: GenerateConfig, max_new_tokens: int) -> int | None:
    """max_prompt_tokens, or the model's context minus max_new_tokens, or None."""
    if cfg.max_prompt_tokens is not None:
        return cfg.max_prompt_tokens
    ctx = None
    if cfg.backend == "vllm" and cfg.vllm.max_model_len:
        ctx = cfg.vllm.max_model_len
    if ctx is None and cfg.tokenizer_name() is not None:
        ctx = _model_context(cfg.model if cfg.backend != "openai" else cfg.tokenizer_name())
    if ctx is None:
        return None
    if ctx <= max_new_tokens:
        raise ConfigError(
            f"generate.max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
            f"model's context of {ctx} tokens; lower max_new_tokens"
        )
    return ctx - max_new_tokens


def _input_path(stage_cfg: GenerateStageConfig) -> Path:
    cfg = stage_cfg.generate
    p = Path(cfg.input_path) if cfg.input_path else (
        Path(stage_cfg.run_dir) / "retrieve" / "corpus_samples.parquet")
    if not p.exists():
        raise ConfigError(
            f"corpus samples {p} do not exist: run `craft-ray retrieve` first, or set "
            "generate.input_path to a Parquet/JSONL file with doc_id and text"
        )
    return p


def _read_docs(path: Path, limit: int | None) -> Any:
    import pyarrow.parquet as pq
    import ray.data

    if path.suffix in (".jsonl", ".json"):
        ds = ray.data.read_json(str(path), lines=True)
        names = ds.schema().names
    else:
        names = pq.read_schema(path).names if path.is_file() else None
        ds = ray.data.read_parquet(str(path))
        names = names or ds.schema().names
    missing = [c for c in ("doc_id", "text") if c not in names]
    if missing:
        raise ConfigError(f"corpus samples {path} lack column(s) {missing} (has {names})")
    keep = [c for c in ("doc_id", "corpus", "text", "fewshot_ids") if c in names]
    ds = ds.select_columns(keep)
    return ds.limit(limit) if limit else ds


def _write_parquet(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = tmp_path_for(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _record_types(task: Task) -> dict[str, Any]:
    import pyarrow as pa

    types = {}
    props = task.output_schema().get("properties", {})
    ren = dict(task.variants[0].renames)
    for f in task.record_fields:
        t = (props.get(ren.get(f, f)) or {}).get("type")
        types[f] = {"array": pa.list_(pa.string()), "integer": pa.int64(),
                    "number": pa.float64(), "boolean": pa.bool_()}.get(t, pa.string())
    return types


def _raw_schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("sample_id", pa.string()), ("task", pa.string()), ("doc_id", pa.string()),
        ("corpus", pa.string()), ("retrieved_by", pa.list_(pa.string())),
        ("fewshot_ids", pa.list_(pa.string())), ("variant", pa.string()),
        ("prompt_hash", pa.string()), ("prompt_tokens", pa.int64()),
        ("text_truncated", pa.bool_()), ("text", pa.string()), ("tokens_in", pa.int64()),
        ("tokens_out", pa.int64()), ("gen_seconds", pa.float64()),
        ("finish_reason", pa.string()), ("status", pa.string()),
    ])


def _rejects_schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("sample_id", pa.string()), ("task", pa.string()), ("doc_id", pa.string()),
        ("corpus", pa.string()), ("fewshot_ids", pa.list_(pa.string())),
        ("prompt_hash", pa.string()), ("reject_reason", pa.string()),
        ("reject_detail", pa.string()), ("error_detail", pa.string()),
        ("finish_reason", pa.string()), ("tokens_out", pa.int64()), ("text", pa.string()),
    ])


def split_outputs(rows: list[dict[str, Any]], task: Task) -> dict[str, Any]:
    """raw / clean / rejects tables from parsed generation rows (sorted by sample_id)."""
    import pyarrow as pa

    rows = sorted(rows, key=lambda r: r["sample_id"])
    raw_s, rej_s = _raw_schema(), _rejects_schema()
    raw = pa.Table.from_pylist([{k: r[k] for k in raw_s.names} for r in rows], schema=raw_s)
    rejects = pa.Table.from_pylist(
        [{k: r[k] for k in rej_s.names} for r in rows if r["status"] != "clean"], schema=rej_s)
    types = _record_types(task)
    prov = [("sample_id", pa.string()), ("task", pa.string()), ("doc_id", pa.string()),
            ("corpus", pa.string()), ("fewshot_ids", pa.list_(pa.string())),
            ("retrieved_by", pa.list_(pa.string())), ("variant", pa.string()),
            ("prompt_hash", pa.string()), ("sample_text", pa.string())]
    schema = pa.schema([(f, types[f]) for f in task.record_fields] + prov)
    clean_rows = [{**json.loads(r["record"]), **{k: r[k] for k, _ in prov}}
                  for r in rows if r["status"] == "clean"]
    try:
        clean = pa.Table.from_pylist(clean_rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a custom schema with unusual types
        clean = pa.Table.from_pylist(clean_rows)
    return {"raw": raw, "clean": clean, "rejects": rejects}


def run_generate(stage_cfg: GenerateStageConfig, *, force: bool = False) -> dict[str, Any]:
    """Run the generation stage (Ray must be initialised). Returns the stage's stats."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    cfg = stage_cfg.generate
    stage = StageDir(stage_cfg.run_dir, "generate")
    if not force and stage.is_complete(cfg):
        logger.info("generate: already complete in %s (same config); skipping", stage.path)
        return json.loads((stage.path / "stats.json").read_text())

    # Everything that can be wrong with the inputs is checked before any work starts.
    task = cfg.task_obj()
    try:
        pool = make_shot_pool(task, cfg.fewshots, cfg.fewshot_text_max_chars)
    except FewShotError as exc:
        raise ConfigError(f"generate.fewshots: {exc}") from None
    except TaskError as exc:
        raise ConfigError(f"generate.task: {exc}") from None
    if cfg.num_shots > len(pool.ids):
        raise ConfigError(
            f"generate.num_shots={cfg.num_shots} but {cfg.fewshots.path} holds only "
            f"{len(pool.ids)} few-shots; lower num_shots"
        )
    if cfg.backend == "openai" and cfg.openai.api_key_env and not os.environ.get(
            cfg.openai.api_key_env):
        raise ConfigError(
            f"generate.openai.api_key_env names {cfg.openai.api_key_env!r}, which is not set; "
            "export it, or set api_key_env: null for a server without a key"
        )
    input_path = _input_path(stage_cfg)
    max_new = cfg.max_new_tokens or task.max_new_tokens
    load_tokenizer(cfg.tokenizer_name())  # fails early on a tokenizer without chat template
    budget = prompt_budget(cfg, max_new)
    settings = PromptSettings(
        task_name=task.name, num_shots=cfg.num_shots, samples_per_doc=cfg.samples_per_doc,
        seed=cfg.seed, max_new_tokens=max_new, max_prompt_tokens=budget,
        long_prompt=cfg.long_prompt, min_text_tokens=cfg.min_text_tokens,
        guided_max_string_chars=cfg.guided_max_string_chars if cfg.guided_decoding else None,
    )
    logger.info("generate: task=%s backend=%s model=%s max_new_tokens=%d prompt budget=%s",
                task.name, cfg.backend, cfg.model, max_new, budget)

    stage.begin(cfg, clean=True)
    stats = StageStats("generate")
    docs = _read_docs(input_path, cfg.limit)

    prompts_dir = stage.path / "prompts"
    t0 = time.time()
    prompts_dataset(docs, cfg, settings, pool).write_parquet(str(prompts_dir))
    prompt_seconds = time.time() - t0
    import ray.data

    prompts = ray.data.read_parquet(str(prompts_dir))
    prompt_cols = ["sample_id", "doc_id", "corpus", "fewshot_ids", "prompt_tokens",
                   "drop_reason", "drop_detail"]
    prompt_table = pds.dataset(str(prompts_dir)).to_table(columns=prompt_cols)
    n_prompts = prompt_table.num_rows
    drop_mask = pc.not_equal(prompt_table.column("drop_reason"), "")
    drops = prompt_table.filter(drop_mask)
    n_truncated = pds.dataset(str(prompts_dir)).to_table(
        columns=["text_truncated"]).column("text_truncated").to_pylist().count(True)

    gens_dir = stage.path / "generations"
    t1 = time.time()
    rows: list[dict[str, Any]] = []
    if n_prompts - drops.num_rows > 0:
        generations_dataset(prompts, cfg).write_parquet(str(gens_dir))
        rows = pds.dataset(str(gens_dir)).to_table().to_pylist()
    gen_seconds = time.time() - t1

    out = split_outputs(rows, task)
    raw_n, clean_n = out["raw"].num_rows, out["clean"].num_rows
    reject_reasons = Counter(out["rejects"].column("reject_reason").to_pylist())
    tokens_in = sum(max(0, r["tokens_in"]) for r in rows)
    tokens_out = sum(max(0, r["tokens_out"]) for r in rows)
    backend_errors = sum(1 for r in rows if r["error"])
    for name, table in out.items():
        _write_parquet(table, stage.path / f"{name}.parquet")
    atomic_write_text(stage.path / "clean.jsonl", "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in out["clean"].to_pylist()))
    _write_parquet(drops, stage.path / "prompt_drops.parquet")

    drop_reasons = Counter(drops.column("drop_reason").to_pylist())
    # Nothing lost: every prompt is a generation or a drop; every generation clean or reject.
    if n_prompts != raw_n + drops.num_rows or raw_n != clean_n + sum(reject_reasons.values()):
        raise RuntimeError(
            f"generate: row accounting broken: prompts={n_prompts} raw={raw_n} "
            f"drops={drops.num_rows} clean={clean_n} rejects={sum(reject_reasons.values())}"
        )
    stats.rows_in = n_prompts
    stats.rows_out = clean_n
    stats.rejects = reject_reasons + drop_reasons
    stats.extra = {
        "task": task.name, "backend": cfg.backend, "model": cfg.model,
        "output_dir": str(stage.path),
        "documents": n_prompts // cfg.samples_per_doc,
        "prompts": n_prompts, "prompt_drops": dict(sorted(drop_reasons.items())),
        "prompts_text_truncated": n_truncated, "prompt_budget_tokens": budget,
        "generations": raw_n, "samples": clean_n,
        "generation_rejects": dict(sorted(reject_reasons.items())),
        "backend_errors": backend_errors,
        "yield": round(clean_n / raw_n, 4) if raw_n else None,
        "tokens_in": tokens_in, "tokens_out": tokens_out,
        "prompt_seconds": round(prompt_seconds, 3),
        "generation_seconds": round(gen_seconds, 3),
        "samples_per_s": round(clean_n / gen_seconds, 4) if gen_seconds > 0 else None,
        "tokens_out_per_s": round(tokens_out / gen_seconds, 2) if gen_seconds > 0 else None,
        "fewshots": len(pool.ids), "fewshot_quirks": pool.quirks,
        "max_new_tokens": max_new, "guided_decoding": cfg.guided_decoding,
    }
    if raw_n and backend_errors / raw_n > cfg.max_error_rate:
        raise RuntimeError(
            f"generate: {backend_errors} of {raw_n} generations failed in the backend "
            f"({backend_errors / raw_n:.1%} > max_error_rate={cfg.max_error_rate}); see "
            f"{stage.path / 'rejects.parquet'}. Fix the backend or raise "
            "generate.max_error_rate."
        )
    shutil.rmtree(gens_dir, ignore_errors=True)  # raw.parquet holds the same rows
    return stage.finish(cfg, stats)
