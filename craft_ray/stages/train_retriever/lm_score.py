"""LM scoring, as LLM-Embedder does it: the teacher score of key ``k`` for query ``q`` is the
causal LM's mean log-likelihood of the desired output, ``log p(answer | q, k)`` per answer
token. The embedder is then trained towards the softmax of these scores (KL, see
``loss.retrieval_loss``).

:func:`answer_logprobs` is the pure part (a model and tokenizer in, scores out);
:class:`LMScorer` is the Ray Data actor that loads the model once and scores rows;
:func:`score_examples` runs it over the examples that have answers but no teacher scores.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from craft_ray.stages.train_retriever.config import LMScoringSettings
from craft_ray.stages.train_retriever.data import Example

logger = logging.getLogger(__name__)


def answer_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                    max_length: int, batch_size: int = 8) -> list[float]:
    """Mean log p(answer tokens | prompt) of each (prompt, answer) pair.

    Prompt and answer are tokenised separately so the boundary is exact; a sequence over
    ``max_length`` loses prompt tokens from the left (the answer is kept whole).
    """
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    seqs = []
    for p, a in zip(prompts, answers):
        a_ids = list(tokenizer(a, add_special_tokens=False)["input_ids"])[: max_length - 2]
        p_ids = bos + list(tokenizer(p, add_special_tokens=False)["input_ids"])
        p_ids = p_ids[max(0, len(p_ids) + len(a_ids) - max_length):]
        seqs.append((p_ids, a_ids))
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for j, (p, a) in enumerate(chunk):
            n = len(p) + len(a)
            ids[j, :n] = torch.tensor(p + a)
            mask[j, :n] = 1
            labels[j, len(p):n] = torch.tensor(a)
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tgt = labels[:, 1:].to(device)
        ok = tgt != -100
        tok_lp = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * ok
        out += (tok_lp.sum(-1) / ok.sum(-1).clamp(min=1)).cpu().tolist()
    return out


def candidates(ex: Example, max_candidates: int) -> list[str]:
    """The keys of ``ex`` that get a teacher score: positives, then negatives."""
    return (ex.pos + ex.neg)[:max_candidates]


class LMScorer:
    """Ray Data actor: loads the causal LM once; scores the candidates of a batch of rows."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = LMScoringSettings.model_validate(cfg)
        torch.set_num_threads(max(1, int(self.cfg.num_cpus)))
        device = "cuda" if self.cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        dtype = self.cfg.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        kw: dict[str, Any] = {"dtype": getattr(torch, dtype)}
        if self.cfg.gguf_file:
            kw["gguf_file"] = self.cfg.gguf_file
        tok_kw = {"gguf_file": self.cfg.gguf_file} if self.cfg.gguf_file and \
            not self.cfg.tokenizer else {}
        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.tokenizer or self.cfg.model,
                                                       **tok_kw)
        self.model = AutoModelForCausalLM.from_pretrained(self.cfg.model, **kw).to(device).eval()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        prompts, answers, owner = [], [], []
        for r, (q, keys, ans) in enumerate(zip(batch["query"], batch["keys"],
                                               batch["answer"])):
            for k in keys:
                prompts.append(self.cfg.template.format(key=k, query=q))
                answers.append(str(ans))
                owner.append(r)
        scores = answer_logprobs(self.model, self.tokenizer, prompts, answers,
                                 self.cfg.max_length, self.cfg.batch_size)
        per: list[list[float]] = [[] for _ in batch["query"]]
        for r, s in zip(owner, scores):
            per[r].append(s)
        return {"row": batch["row"], "scores": per}


def score_examples(examples: list[Example], cfg: LMScoringSettings) -> int:
    """Give teacher scores to the examples with answers and none yet (in place; Ray must be
    initialised). Keys past ``max_candidates`` are dropped from those examples, so that every
    kept key has a score. Returns the number of examples scored."""
    import ray.data

    todo = [i for i, ex in enumerate(examples) if ex.answers and ex.teacher_scores is None]
    if not todo:
        logger.warning("lm_scoring: no example has answers without teacher_scores; nothing "
                       "to score")
        return 0
    rows = [{"row": i, "query": examples[i].query, "answer": examples[i].answers[0],
             "keys": candidates(examples[i], cfg.max_candidates)} for i in todo]
    from craft_ray.resources import actor_resources

    actor_resources(cfg.num_cpus, cfg.concurrency, cfg.num_gpus,  # fails first if it can't fit
                    key="lm_scoring")
    ds = ray.data.from_items(rows).map_batches(
        LMScorer, batch_size=cfg.rows_per_call, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency), num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus, fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json")})
    for r in ds.iter_rows():
        ex = examples[int(r["row"])]
        scores = [float(s) for s in r["scores"]]
        n_pos = min(len(ex.pos), len(scores))
        ex.pos, ex.neg = ex.pos[:n_pos], ex.neg[:len(scores) - n_pos]
        ex.teacher_scores = scores
    logger.info("lm_scoring: scored %d examples with %s", len(todo), cfg.model)
    return len(todo)
