"""Stage commands: one per stage (embed, retrieve, generate, filter, train, sweep, evaluate,
judge), the whole pipeline (``run``) and the tools around a run's outputs (merge, aggregate,
report, export-h5). Each reads ``--config FILE`` plus ``--set key=value`` overrides, validates
them before Ray starts, then runs on an embedded local Ray or on ``--address`` / ``RAY_ADDRESS``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from craft_ray.cli.common import (
    AddressOpt,
    ConfigOpt,
    ForceOpt,
    SetOpt,
    app,
    guarded,
    load_stage_config,
    on_stage,
    print_stats,
)


@app.command()
def run(
    config: ConfigOpt,
    set_: SetOpt = None,
    address: AddressOpt = None,
    from_stage: Annotated[str | None, typer.Option("--from", help="Rerun from this stage.")]
    = None,
) -> None:
    """Run the whole pipeline from one YAML (stages whose section is present), with resume."""
    from craft_ray.pipeline import PipelineConfig, plan, run_pipeline
    from craft_ray.report.html import build_report
    from craft_ray.runtime import init_ray

    def body() -> dict[str, Any]:
        cfg = load_stage_config(PipelineConfig, config, set_, address)
        plan(cfg, from_stage)  # validates --from before Ray starts
        init_ray(cfg.ray)
        results = run_pipeline(cfg, from_stage, on_stage=on_stage)
        results["report"] = str(build_report(cfg.run_dir))
        return results

    results = guarded(body)
    print_stats(results, report=results["report"])


@app.command()
def embed(config: ConfigOpt, set_: SetOpt = None, address: AddressOpt = None,
          force: ForceOpt = False) -> None:
    """Embed corpora into a sharded embedding store (+ CRAFT .h5)."""
    from craft_ray.runtime import init_ray
    from craft_ray.stages.embed import EmbedStageConfig, preflight, run_embed

    def body() -> dict[str, Any]:
        cfg = load_stage_config(EmbedStageConfig, config, set_, address)
        preflight(cfg)
        init_ray(cfg.ray)
        on_stage("embed")
        return run_embed(cfg, force=force)

    stats = guarded(body)
    typer.echo(f"embedding store: {stats['store']}", err=True)
    print_stats(stats)


@app.command()
def retrieve(config: ConfigOpt, set_: SetOpt = None, address: AddressOpt = None,
             force: ForceOpt = False) -> None:
    """Retrieve the corpus documents most similar to the few-shots (exact top-k)."""
    from craft_ray.runtime import StageDir, init_ray
    from craft_ray.stages.retrieve import RetrieveStageConfig, prepare_retrieve, run_retrieve

    def body() -> dict[str, Any]:
        cfg = load_stage_config(RetrieveStageConfig, config, set_, address)
        done = not force and StageDir(cfg.run_dir, "retrieve").is_complete(cfg.retrieve)
        prep = None if done else prepare_retrieve(cfg)  # every check before Ray starts
        init_ray(cfg.ray)
        on_stage("retrieve")
        return run_retrieve(cfg, force=force, prepared=prep)

    stats = guarded(body)
    print_stats(stats)


@app.command()
def generate(config: ConfigOpt, set_: SetOpt = None, address: AddressOpt = None,
             force: ForceOpt = False) -> None:
    """Generate task samples from corpus samples + few-shots (hf, openai or vllm backend)."""
    from craft_ray.runtime import init_ray
    from craft_ray.stages.generate import GenerateStageConfig, run_generate

    def body() -> dict[str, Any]:
        cfg = load_stage_config(GenerateStageConfig, config, set_, address)
        init_ray(cfg.ray)
        on_stage("generate")
        return run_generate(cfg, force=force)

    stats = guarded(body)
    typer.echo(f"task samples: {Path(stats['output_dir']) / 'clean.parquet'}", err=True)
    print_stats(stats)


@app.command("filter")
def filter_cmd(config: ConfigOpt, set_: SetOpt = None, address: AddressOpt = None,
               force: ForceOpt = False) -> None:
    """Filter clean samples (leakage, dedup, decontamination, judge); write sized datasets."""
    from craft_ray.runtime import init_ray
    from craft_ray.stages.filter import FilterStageConfig, run_filter, too_few_message

    def body() -> dict[str, Any]:
        cfg = load_stage_config(FilterStageConfig, config, set_, address)
        init_ray(cfg.ray)
        on_stage("filter")
        return run_filter(cfg, force=force)

    stats = guarded(body)
    if stats.get("sizes_skipped"):
        typer.echo(f"warning: {too_few_message(stats['sizes_skipped'], stats['datasets'])}",
                   err=True)
    for name, info in stats.get("datasets", {}).items():
        typer.echo(f"dataset {name}: {info['path']} ({info['rows']} rows)", err=True)
    print_stats(stats)


@app.command()
def train(config: ConfigOpt, set_: SetOpt = None, address: AddressOpt = None,
          force: ForceOpt = False) -> None:
    """LoRA fine-tune on Ray Train (one dataset size, one seed) -> RUN_DIR/train/TRIAL/adapter."""
    from craft_ray.runtime import init_ray
    from craft_ray.stages.train import TrainStageConfig, run_train

    def body() -> dict[str, Any]:
        cfg = load_stage_config(TrainStageConfig, config, set_, address)
        init_ray(cfg.ray)
        on_stage("train")
        return run_train(cfg, force=force)

    stats = guarded(body)
    typer.echo(f"adapter: {stats['adapter']}", err=True)
    print_stats(stats)


@app.command()
def sweep(config: ConfigOpt, set_: SetOpt = None, address: AddressOpt = None) -> None:
    """Seeds x dataset sizes on Ray Tune (one Ray Train fine-tune per trial); resumable."""
    from craft_ray.runtime import init_ray
    from craft_ray.stages.sweep import SweepStageConfig, run_sweep

    def body() -> dict[str, Any]:
        cfg = load_stage_config(SweepStageConfig, config, set_, address)
        init_ray(cfg.ray)
        on_stage("sweep")
        return run_sweep(cfg)

    stats = guarded(body)
    typer.echo(f"table: {stats['table']}", err=True)
    print_stats(stats)


@app.command()
def evaluate(config: ConfigOpt, set_: SetOpt = None, address: AddressOpt = None,
             force: ForceOpt = False) -> None:
    """Score base models / adapters / merged models on eval sets: multiple-choice accuracy,
    or for generative sets the model's own answers with ROUGE-L and an LLM-judge win rate."""
    from craft_ray.runtime import init_ray
    from craft_ray.stages.evaluate import EvaluateStageConfig, run_evaluate

    def body() -> dict[str, Any]:
        cfg = load_stage_config(EvaluateStageConfig, config, set_, address)
        init_ray(cfg.ray)
        on_stage("evaluate")
        return run_evaluate(cfg, force=force)

    stats = guarded(body)
    typer.echo(f"evaluation outputs: {stats['outputs']}", err=True)
    print_stats(stats)


@app.command()
def judge(config: ConfigOpt, set_: SetOpt = None, address: AddressOpt = None,
          force: ForceOpt = False) -> None:
    """Win rate of predictions against references with an LLM judge (+ ROUGE-L)."""
    from craft_ray.runtime import init_ray
    from craft_ray.stages.judge import JudgeStageConfig, run_judge

    def body() -> dict[str, Any]:
        cfg = load_stage_config(JudgeStageConfig, config, set_, address)
        init_ray(cfg.ray)
        on_stage("judge")
        return run_judge(cfg, force=force)

    stats = guarded(body)
    typer.echo(f"judgements: {stats['outputs']}", err=True)
    print_stats(stats)


@app.command()
def merge(
    adapter: Annotated[Path, typer.Option(help="PEFT adapter folder (RUN_DIR/train/TRIAL/"
                                          "adapter).")],
    out: Annotated[Path, typer.Option(help="Folder for the merged model.")],
    base: Annotated[str | None, typer.Option(help="Base model (default: the adapter's).")]
    = None,
    dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")] = "auto",
) -> None:
    """Fold a LoRA adapter into its base model and save the merged model."""
    from craft_ray.stages.train import merge_adapter

    path = guarded(lambda: merge_adapter(adapter, out, base, dtype))
    typer.echo(json.dumps({"merged": str(path)}))


@app.command()
def aggregate(
    inputs: Annotated[list[Path], typer.Argument(help="results.json files or folders.")],
    out: Annotated[Path, typer.Option(help="Output folder (table, plot, report).")],
) -> None:
    """Mean ± std per model series and dataset size over many results, with a plot."""
    from craft_ray.report.plots import run_aggregate

    typer.echo(json.dumps(guarded(lambda: run_aggregate(inputs, out))))


@app.command()
def report(
    run_dir: Annotated[str, typer.Option("--run-dir", help="Run directory (a path or an "
                                         "s3:// / gs:// URI).")],
) -> None:
    """Write RUN_DIR/report.html from the stages that have run."""
    from craft_ray.report.html import build_report

    out = guarded(lambda: build_report(run_dir))
    typer.echo(str(out))


@app.command("export-h5")
def export_h5_cmd(
    store: Annotated[Path, typer.Option(help="Embedding store folder (RUN_DIR/embed/store).")],
    out: Annotated[Path, typer.Option(help="Output .h5 file.")],
) -> None:
    """Export an embedding store to CRAFT's .h5 layout."""
    from craft_ray.store.vectors import export_h5

    counts = guarded(lambda: export_h5(store, out))
    typer.echo(json.dumps({"out": str(out), "datasets": counts}))
