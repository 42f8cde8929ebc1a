"""Generation prompts: few-shot pools, messages, prompts fitted to the token budget (pure)."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from craft_ray.models.chat import render_chat
from craft_ray.stages.generate.parse import DROP_EMPTY, DROP_NO_ROOM, DROP_TOO_LONG
from craft_ray.tasks.base import Task
from craft_ray.tasks.fewshots import FewShotConfig, load_fewshots

logger = logging.getLogger(__name__)


SEPARATOR = "\n\n___________\nText: "  # CRAFT's separator between meta-instruction and text

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
                prompt, ids = render_chat(tokenizer, msgs)
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
        prompt, ids = render_chat(tokenizer, msgs)
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
