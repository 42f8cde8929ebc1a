"""Ray side of the filter stage's judge: prompts built with the tokenizer loaded once per actor,
then the judge backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from craft_ray.backends import run_backend
from craft_ray.models.chat import render_chat
from craft_ray.stages.filter.config import QualityJudgeConfig
from craft_ray.stages.filter.quality import (
    judge_criteria,
    judge_parse_batch,
    judge_schema,
    quality_judge_prompt,
    read_doc_texts,
    resolve_judge,
)


class JudgePromptBuilder:
    """Ray Data actor: loads the source documents and the tokenizer once, builds judge
    prompts (the generation backends' input columns) for batches of samples."""

    def __init__(self, docs: str, tokenizer: str | None, task_name: str,
                 is_multiple_choice: bool, max_doc_chars: int, max_new_tokens: int) -> None:
        from craft_ray.models.tokenizers import load_chat_tokenizer

        self.docs = read_doc_texts(docs)
        self.tokenizer = load_chat_tokenizer(tokenizer) if tokenizer else None
        self.task_name = task_name
        self.is_mc = is_multiple_choice
        self.max_doc_chars = max_doc_chars
        self.max_new_tokens = max_new_tokens
        self.schema = json.dumps(judge_schema(judge_criteria(is_multiple_choice)))

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        prompts, ids, msgs, missing = [], [], [], []
        for doc_id, text in zip(table.column("doc_id").to_pylist(),
                                table.column("sample_text").to_pylist()):
            doc = self.docs.get(str(doc_id))
            missing.append(doc is None)
            content = quality_judge_prompt(self.task_name, str(text), doc or "", self.is_mc,
                                           self.max_doc_chars)
            m = [{"role": "user", "content": content}]
            msgs.append(json.dumps(m, ensure_ascii=False))
            if self.tokenizer is not None:
                rendered, rendered_ids = render_chat(self.tokenizer, m)
                prompts.append(rendered)
                ids.append(rendered_ids)
            else:
                prompts.append("")
                ids.append([])
        n = table.num_rows
        cols = {"prompt": pa.array(prompts, pa.string()),
                "prompt_token_ids": pa.array(ids, pa.list_(pa.int64())),
                "messages": pa.array(msgs, pa.string()),
                "schema": pa.array([self.schema] * n, pa.string()),
                "max_new_tokens": pa.array([self.max_new_tokens] * n, pa.int64()),
                "_judge_doc_missing": pa.array(missing, pa.bool_())}
        for name, col in cols.items():
            table = table.append_column(name, col)
        return table


def judge_dataset(ds: Any, cfg: QualityJudgeConfig, run_dir: str | Path, task: Any) -> Any:
    """Lazy: samples -> judge prompts -> generation backend -> scores and reject marks."""
    import ray.data

    r = resolve_judge(cfg, run_dir)
    criteria = list(judge_criteria(bool(getattr(task, "is_multiple_choice", False))))
    prompts = ds.map_batches(
        JudgePromptBuilder, batch_format="pyarrow", batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=cfg.prompt_concurrency), num_cpus=1,
        fn_constructor_kwargs={"docs": r["docs"], "tokenizer": r["tokenizer"],
                               "task_name": task.name,
                               "is_multiple_choice": "correctness" in criteria,
                               "max_doc_chars": cfg.max_doc_chars,
                               "max_new_tokens": cfg.max_new_tokens})
    sampling = {"temperature": cfg.temperature, "top_p": 1.0, "top_k": -1, "seed": cfg.seed,
                "guided": cfg.guided_decoding}
    gen = run_backend(prompts, r["backend"], r["model"], r["settings"], sampling,
                      tokenizer=r["tokenizer"], key=f"filter.judge.{r['backend']}")
    return gen.map_batches(judge_parse_batch, batch_format="pyarrow", batch_size=256,
                           num_cpus=0.25, fn_kwargs={"criteria": criteria,
                                                     "min_scores": dict(cfg.min_scores)})
