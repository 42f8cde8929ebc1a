"""Running a judge on any generation backend: ``prompts -> answers`` (greedy, short)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from craft_ray.backends import check_backend, run_backend
from craft_ray.judging.config import JudgeModelConfig
from craft_ray.judging.pairwise import JudgeReply
from craft_ray.models.chat import chat_messages, render_chat
from craft_ray.models.gguf import resolve_model_path
from craft_ray.models.tokenizers import local_ref


def judge_rows(prompts: Sequence[str], cfg: JudgeModelConfig, tokenizer: Any | None
               ) -> list[dict[str, Any]]:
    """Prompt rows in the generation backends' input columns (see craft_ray.backends)."""
    rows = []
    for i, p in enumerate(prompts):
        messages = chat_messages(p, cfg.system_prompt)
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            text, ids = render_chat(tokenizer, messages)
        elif tokenizer is not None:
            text = p
            ids = list(tokenizer(text)["input_ids"])
        else:
            text, ids = p, []
        rows.append({"sample_id": f"judge-{i:08d}", "prompt": text, "prompt_token_ids": ids,
                     "messages": json.dumps(messages), "schema": "",
                     "max_new_tokens": cfg.max_new_tokens})
    return rows


def backend_generate(cfg: JudgeModelConfig, seed: int = 0, section: str = "judge.judge"
                     ) -> Callable[[list[str]], list[JudgeReply]]:
    """A ``prompts -> answers`` function running the judge on a generation backend (greedy).

    Ray must be initialised. A failed request yields an empty :class:`JudgeReply` carrying the
    backend's reason (an unparsable judgement whose cause is recorded). The backend
    is checked now, before any judging (an openai server must answer; ``section`` names the
    config keys in the error).
    """
    check_backend(cfg.backend, cfg.model, getattr(cfg, cfg.backend), section)

    def run(prompts: list[str]) -> list[JudgeReply]:
        import ray.data
        from transformers import AutoTokenizer

        tok_name = cfg.tokenizer or (None if cfg.backend == "openai" else cfg.model)
        tok = AutoTokenizer.from_pretrained(resolve_model_path(tok_name)) if tok_name else None
        ds = ray.data.from_items(judge_rows(prompts, cfg, tok))
        sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "seed": seed,
                    "guided": False}
        model = cfg.model if cfg.backend == "openai" else local_ref(cfg.model)
        out = run_backend(ds, cfg.backend, model, getattr(cfg, cfg.backend), sampling,
                          tokenizer=local_ref(cfg.tokenizer), key=f"{section}.{cfg.backend}")
        got = {str(r["sample_id"]): JudgeReply(str(r.get("text") or ""), str(r.get("error") or ""),
                                               str(r.get("error_detail") or ""))
               for r in out.take_all()}
        missing = JudgeReply("", "No reply from the backend.", "row missing from its output")
        return [got.get(f"judge-{i:08d}", missing) for i in range(len(prompts))]

    return run
