"""Ray actors of the evaluate stage (hf backend): letter scoring and text generation."""

from __future__ import annotations

from typing import Any

import numpy as np

from craft_ray.evalsets.base import LETTERS
from craft_ray.models.hf import generate_new_tokens, load_hf_model
from craft_ray.models.tokenizers import engine_ref, ensure_pad_token, pad_token_ids
from craft_ray.resources import actor_resources
from craft_ray.runtime.progress import report_progress
from craft_ray.stages.evaluate.config import EvaluateConfig, ModelSpec
from craft_ray.stages.evaluate.scoring import (
    sampling_of,
    score_columns,
    scores_from_logprobs,
    trim_at_eos,
)
from craft_ray.stages.evaluate.vllm import vllm_generation_config, vllm_generation_request


def _actor_model(model: str, adapter: str | None, merge_adapter: bool, dtype: str,
                 num_gpus: float, torch_threads: int | None) -> tuple[str, Any, Any]:
    """(device, model, tokenizer) for an hf actor: threads set, GPU when asked and present."""
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    device = "cuda" if num_gpus and torch.cuda.is_available() else "cpu"
    return (device, *load_hf_model(model, adapter, merge_adapter, dtype, device))


class HFLetterScorer:
    """Ray Data actor: loads the model (+ adapter) once; scores letters from last logits."""

    def __init__(self, model: str, adapter: str | None, merge_adapter: bool, dtype: str,
                 num_gpus: float, torch_threads: int | None, letter_ids: dict[str, list[int]],
                 forward_batch_size: int, max_prompt_tokens: int) -> None:
        self.device, self.model, self.tok = _actor_model(model, adapter, merge_adapter, dtype,
                                                         num_gpus, torch_threads)
        self.letter_ids = letter_ids
        self.forward_batch_size = forward_batch_size
        self.max_prompt_tokens = max_prompt_tokens

    def last_logprobs(self, ids: list[list[int]]) -> np.ndarray:
        """Next-token log-probs [N, V] after each prompt (given as token ids)."""
        import torch

        ensure_pad_token(self.tok)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # less padding per pass
        out: list[np.ndarray | None] = [None] * len(ids)
        for s in range(0, len(order), self.forward_batch_size):
            chunk = order[s:s + self.forward_batch_size]
            # Right padding + explicit last index: positions stay 0..len-1 as in training.
            inp, att = pad_token_ids(self.tok, [ids[i] for i in chunk], "right")
            with torch.no_grad():
                logits = self.model(input_ids=inp.to(self.device),
                                    attention_mask=att.to(self.device)).logits
            last = torch.tensor([len(ids[i]) - 1 for i in chunk], device=logits.device)
            rows = logits[torch.arange(len(chunk), device=logits.device), last].float()
            lp = torch.log_softmax(rows, dim=-1).cpu().numpy()
            for r, i in enumerate(chunk):
                out[i] = lp[r]
        return np.stack(out)  # type: ignore[arg-type]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [[int(t) for t in x] for x in batch["tokenized_prompt"]]
        lp = self.last_logprobs(ids)
        scores = [scores_from_logprobs(lp[i], LETTERS, self.letter_ids) for i in range(len(ids))]
        out = {k: v for k, v in batch.items() if k != "tokenized_prompt"}
        out.update(score_columns(scores, batch["letters"]))
        out["prompt_tokens"] = np.array([len(x) for x in ids], dtype=np.int64)
        report_progress(done=len(ids))  # the console's line
        return out


class HFTextGenerator:
    """Ray Data actor: loads the model (+ adapter, merged or not) once, as the scorer does,
    and answers batches of tokenized prompts (greedy unless a temperature is set)."""

    def __init__(self, model: str, adapter: str | None, merge_adapter: bool, dtype: str,
                 num_gpus: float, torch_threads: int | None, generate_batch_size: int,
                 sampling: dict[str, Any]) -> None:
        self.device, self.model, self.tok = _actor_model(model, adapter, merge_adapter, dtype,
                                                         num_gpus, torch_threads)
        self.generate_batch_size = generate_batch_size
        self.sampling = sampling
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tok.eos_token_id is not None:
            self.eos_ids.add(self.tok.eos_token_id)
        self.pad = ensure_pad_token(self.tok)

    def generate(self, ids: list[list[int]], max_new: list[int], keys: list[str]
                 ) -> list[tuple[str, int, str]]:
        """(text, generated tokens, finish reason) per prompt, in input order."""
        import torch

        from craft_ray.backends import row_seed

        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # less padding per call
        out: list[tuple[str, int, str] | None] = [None] * len(ids)
        for s in range(0, len(order), self.generate_batch_size):
            chunk = order[s:s + self.generate_batch_size]
            kwargs: dict[str, Any] = {"max_new_tokens": max(max_new[i] for i in chunk),
                                      "pad_token_id": self.pad}
            if self.sampling["temperature"] > 0:
                kwargs.update(do_sample=True, temperature=self.sampling["temperature"],
                              top_p=self.sampling["top_p"])
                if self.sampling["top_k"] > 0:
                    kwargs["top_k"] = self.sampling["top_k"]
                torch.manual_seed(row_seed(int(self.sampling["seed"]), keys[chunk[0]]))
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            gen = generate_new_tokens(self.model, self.tok, [ids[i] for i in chunk],
                                      self.device, **kwargs)
            for r, i in enumerate(chunk):
                toks, stopped = trim_at_eos(gen[r], self.eos_ids, max_new[i])
                out[i] = (self.tok.decode(toks, skip_special_tokens=True).strip(),
                          len(toks) + int(stopped), "stop" if stopped else "length")
        return out  # type: ignore[return-value]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [[int(t) for t in x] for x in batch["tokenized_prompt"]]
        keys = [f"{m}/{e}/{i}" for m, e, i in zip(batch["model_name"], batch["eval_set"],
                                                   batch["id"])]
        res = self.generate(ids, [int(x) for x in batch["max_new_tokens"]], keys)
        out = {k: v for k, v in batch.items() if k != "tokenized_prompt"}
        out["prediction"] = np.array([r[0] for r in res], dtype=object)
        out["tokens_out"] = np.array([r[1] for r in res], dtype=np.int64)
        out["finish_reason"] = np.array([r[2] for r in res], dtype=object)
        out["prompt_tokens"] = np.array([len(x) for x in ids], dtype=np.int64)
        report_progress(done=len(ids))  # the console's line
        return out


def map_hf_actors(ds: Any, cfg: EvaluateConfig, model: ModelSpec, actor: type,
                   extra: dict[str, Any]) -> Any:
    """``ds`` through a pool of hf actors that each load ``model`` (+ adapter) once."""
    import ray.data

    cpus, threads = actor_resources(cfg.num_cpus, cfg.concurrency, cfg.num_gpus,
                                    cfg.torch_threads, key="evaluate")
    return ds.map_batches(
        actor, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_gpus=cfg.num_gpus or None, num_cpus=cpus,
        fn_constructor_kwargs={
            "model": model.model, "adapter": model.adapter,
            "merge_adapter": model.merge_adapter, "dtype": cfg.dtype,
            "num_gpus": cfg.num_gpus,
            "torch_threads": threads,
            **extra,
        })


def generate_rows(cfg: EvaluateConfig, model: ModelSpec, rows: list[dict[str, Any]]
                   ) -> list[dict[str, Any]]:
    """Answers of ``model`` to the prompt rows (columns: prediction, tokens_out, finish_reason,
    prompt_tokens added)."""
    import ray.data

    sampling = sampling_of(cfg.generation)
    ds = ray.data.from_items(rows)
    if cfg.backend == "hf":
        return map_hf_actors(ds, cfg, model, HFTextGenerator, {
            "generate_batch_size": cfg.generation.generate_batch_size,
            "sampling": sampling}).take_all()
    from functools import partial

    from craft_ray.backends.vllm import postprocess, processor_config

    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ImportError("backend: vllm needs vLLM on the workers: pip install "
                          "'craft-ray[gpu]' (or pip install vllm)") from exc
    from ray.data.llm import build_processor

    vrows = [{**r, "sample_id": f"{r['model_name']}/{r['eval_set']}/{r['id']}",
              "prompt_token_ids": r["tokenized_prompt"], "schema": ""} for r in rows]
    processor = build_processor(
        processor_config(vllm_generation_config(cfg, model), engine_ref(model.model)),
        preprocess=partial(vllm_generation_request, sampling=sampling, adapter=model.adapter),
        postprocess=postprocess)
    got = []
    for r in processor(ray.data.from_items(vrows)).take_all():
        got.append({**r, "prediction": str(r.get("text") or "").strip(),
                    "prompt_tokens": int(r.get("tokens_in") or 0)})
    return got
