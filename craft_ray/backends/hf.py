"""``hf`` backend: transformers ``generate`` in a Ray Data actor pool (CPU or one GPU each).

For small generators and CPU runs. JSON-schema guided decoding goes through xgrammar's
transformers integration (``xgrammar.contrib.hf.LogitsProcessor``), one compiled grammar per
row, so rows of different prompt variants can share a batch. Schemas are compiled without free
whitespace by default (``guided_any_whitespace: false``): the reply is laid out as
``json.dumps`` writes it (``", "`` and ``": "`` separators, nothing else between tokens). JSON
itself allows unlimited whitespace between tokens, and a weak or untrained model under a
grammar that allows it can emit whitespace until max tokens and never close the object.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field

from craft_ray.backends import ERR_ENGINE, batch_rows, error_row, merge_outputs, row_seed
from craft_ray.config import StrictModel
from craft_ray.models.gguf import resolve_model_path
from craft_ray.models.hf import generate_new_tokens
from craft_ray.resources import actor_resources, torch_threads
from craft_ray.runtime.progress import report_progress

logger = logging.getLogger(__name__)


class HFBackendConfig(StrictModel):
    """Settings of the ``hf`` backend (model and sampling come from the generate section)."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where each actor runs the model (auto: cuda if present)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Model dtype (auto: bfloat16 on GPU, float32 on CPU)."
    )
    concurrency: int = Field(default=1, ge=1, le=1024, description="Generator actors.")
    num_cpus: float | None = Field(
        default=None, gt=0, le=512,
        description="CPUs per actor (default: an equal share of the cluster's CPUs minus 1 "
        "left to the stage's read tasks, lowered until the pool fits the nodes; 1 with a "
        "GPU). Torch threads: the share of the cores. A pool that cannot fit fails first.")
    num_gpus: float = Field(default=0.0, ge=0, le=8, description="GPUs per actor.")
    torch_threads: int | None = Field(
        default=None, ge=1, le=512, description="Torch threads per actor (default: num_cpus)."
    )
    batch_size: int = Field(
        default=8, ge=1, le=4096, description="Rows handed to an actor per call."
    )
    generate_batch_size: int = Field(
        default=4, ge=1, le=1024,
        description="Rows per generate() call inside an actor (left-padded together).",
    )
    guided_any_whitespace: bool = Field(
        default=False,
        description="Guided decoding: allow any whitespace between JSON tokens (xgrammar's "
        "default). False: the JSON layout of json.dumps (', ' and ': ' separators, no other "
        "whitespace), so a model cannot loop on whitespace until max tokens.",
    )


class HFGenerator:
    """Ray Data actor: loads the model and tokenizer once, generates for batches of prompts."""

    def __init__(self, model: str, tokenizer: str | None, cfg: dict[str, Any],
                 sampling: dict[str, Any]) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        # On this node: an s3:// / gs:// model downloaded, a GGUF converted (cached per node)
        model = resolve_model_path(model)
        tokenizer = resolve_model_path(tokenizer) if tokenizer else None
        self.cfg = HFBackendConfig.model_validate(cfg)
        self.sampling = sampling
        torch.set_num_threads(torch_threads(self.cfg.num_cpus or 1.0, self.cfg.torch_threads))
        device = self.cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        dtype = self.cfg.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        # The tokenizer (and, guided, xgrammar's import) load in a thread while the model's
        # weights load: the actor's start-up is on the stage's critical path.
        with ThreadPoolExecutor(max_workers=1) as pool:
            tok = pool.submit(_load_tokenizer, tokenizer or model, bool(sampling.get("guided")))
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
            self.model.to(device).eval()
            self.tokenizer = tok.result()
        self.vocab_size = int(self.model.config.vocab_size)
        self._grammars: dict[str, Any] = {}
        self._compiler: Any = None
        self.eos_ids = _eos_ids(self.model, self.tokenizer)

    def _grammar(self, schema: str) -> Any:
        """Compiled grammar for a schema string (compiled once per actor and schema)."""
        if schema not in self._grammars:
            import xgrammar as xgr

            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer,
                                                          vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info)
            self._grammars[schema] = compile_schema(self._compiler, schema,
                                                    self.cfg.guided_any_whitespace)
        return self._grammars[schema]

    def _generate(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import torch

        ids = [list(r["prompt_token_ids"]) if len(r["prompt_token_ids"]) else
               self.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
        pad = self.tokenizer.pad_token_id
        max_new = max(int(r["max_new_tokens"]) for r in rows)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": pad}
        temp = float(self.sampling["temperature"])
        if temp > 0:
            # top_k <= 0 means "off" in our configs (vLLM's -1); transformers wants 0 for off
            # (a negative top_k raises in TopKLogitsWarper).
            kwargs.update(do_sample=True, temperature=temp, top_p=float(self.sampling["top_p"]),
                          top_k=max(0, int(self.sampling["top_k"])))
        else:
            kwargs.update(do_sample=False)
        if self.sampling["guided"]:
            from xgrammar.contrib.hf import LogitsProcessor

            # A new processor per generate() call (it holds per-call matcher state).
            kwargs["logits_processor"] = [LogitsProcessor([self._grammar(r["schema"])
                                                           for r in rows])]
        # tokens/s on the console's line while generate() runs (minutes on a CPU)
        kwargs["streamer"] = TokenCounter(self.tokenizer.pad_token_id)
        torch.manual_seed(row_seed(int(self.sampling["seed"]), str(rows[0]["sample_id"])))
        gen = generate_new_tokens(self.model, self.tokenizer, ids, self.device, **kwargs)
        results = []
        for r, x, g in zip(rows, ids, gen):
            limit = int(r["max_new_tokens"])
            toks: list[int] = []
            stopped = False
            for t in g[:limit]:
                if t in self.eos_ids:
                    stopped = True
                    break
                toks.append(t)
            results.append({
                "text": self.tokenizer.decode(toks, skip_special_tokens=True),
                "tokens_in": len(x), "tokens_out": len(toks) + int(stopped),
                "finish_reason": "stop" if stopped else "length",
                "error": "", "error_detail": "",
            })
        return results

    def __call__(self, batch: Any) -> Any:
        rows = batch_rows(batch, ("sample_id", "prompt", "prompt_token_ids", "schema",
                                  "max_new_tokens"))
        n = len(rows)
        # Similar lengths together: less padding per generate() call.
        order = sorted(range(n), key=lambda i: len(rows[i]["prompt"]))
        outs: list[dict[str, Any] | None] = [None] * n
        step = self.cfg.generate_batch_size
        for s in range(0, n, step):
            idx = order[s:s + step]
            t0 = time.perf_counter()
            try:
                res = self._generate([rows[i] for i in idx])
            except Exception as exc:  # a bad batch becomes rejects, never kills the stage
                logger.exception("hf generate failed for %d rows", len(idx))
                res = [error_row(ERR_ENGINE, f"{type(exc).__name__}: {exc}") for _ in idx]
            per_row = (time.perf_counter() - t0) / len(idx)
            report_progress(done=len(idx))  # tokens: counted as they come (TokenCounter)
            for i, r in zip(idx, res):
                r["gen_seconds"] = per_row
                outs[i] = r
        return merge_outputs(batch, outs)


class TokenCounter:
    """A ``generate(streamer=...)`` that counts the new tokens of every row (padding of
    finished rows left out) and adds them to the console's counters every ~2 s."""

    def __init__(self, pad_token_id: int | None, every_s: float = 2.0) -> None:
        self.pad_token_id, self.every_s = pad_token_id, every_s
        self.prompt_seen, self.pending, self.last = False, 0, time.monotonic()

    def put(self, value: Any) -> None:
        """One generation step's tokens ([batch]); the first call is the prompt."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.pending += int((value != self.pad_token_id).sum()) if self.pad_token_id is not None \
            else int(value.numel())
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def end(self) -> None:
        """generate() is done."""
        self.flush()

    def flush(self) -> None:
        if self.pending:
            report_progress(tokens=self.pending)
        self.pending, self.last = 0, time.monotonic()


def compile_schema(compiler: Any, schema: str, any_whitespace: bool = False) -> Any:
    """A JSON schema compiled by an ``xgrammar.GrammarCompiler``.

    ``any_whitespace=False``: one fixed layout (``", "`` / ``": "`` separators, no newlines or
    indentation), so every whitespace token the model could loop on is masked out.
    """
    return compiler.compile_json_schema(schema, any_whitespace=any_whitespace)


def _load_tokenizer(name: str, guided: bool) -> Any:
    """The generator's tokenizer (pad = eos when it has none); ``guided`` also imports
    xgrammar, so the first guided batch does not wait for it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if guided:
        import xgrammar  # noqa: F401
    return tok


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def hf_generate(ds: Any, model: str, tokenizer: str | None, cfg: HFBackendConfig,
                sampling: dict[str, Any], key: str = "hf") -> Any:
    """Lazy: ``ds`` (prompt rows) -> the same rows plus the generation columns.

    ``key`` is the config section of these settings (``generate.hf``), named in the error
    when the pool cannot fit the cluster.
    """
    import ray.data

    cpus, threads = actor_resources(cfg.num_cpus, cfg.concurrency, cfg.num_gpus,
                                    cfg.torch_threads, key=key)
    cfg = cfg.model_copy(update={"num_cpus": cpus, "torch_threads": threads})
    return ds.map_batches(
        HFGenerator, batch_size=cfg.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus or None,
        fn_constructor_kwargs={"model": model, "tokenizer": tokenizer,
                               "cfg": cfg.model_dump(), "sampling": sampling},
    )

