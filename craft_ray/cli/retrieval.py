"""Retriever commands: evaluation on BEIR folders, hard-negative mining and retriever
fine-tuning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from craft_ray.cli.common import (
    AddressOpt,
    ForceOpt,
    SetOpt,
    app,
    guarded,
    load_stage_config,
    print_stats,
)


def _folder_name(data: str) -> str:
    """The last part of a folder path or URI (the default work folder's name)."""
    from craft_ray.runtime import storage

    return storage.name(data.rstrip("/")) if storage.is_uri(data) else Path(data).resolve().name


@app.command("eval-retrieval")
def eval_retrieval(
    data: Annotated[str, typer.Option(help="BEIR-format folder (corpus.jsonl, queries.jsonl, "
                                      "qrels/SPLIT.tsv).")],
    split: Annotated[str, typer.Option(help="qrels split.")] = "test",
    model: Annotated[str, typer.Option(help="sentence-transformers model id or path.")] = (
        "sentence-transformers/all-MiniLM-L6-v2"),
    out: Annotated[str | None, typer.Option(help="Write the metrics JSON here (a path or "
                                            "s3:// / gs:// URI).")] = None,
    run_dir: Annotated[str | None, typer.Option(
        help="Work folder for the embedding store (default runs/eval-retrieval/NAME; may be "
        "s3:// / gs://).")] = None,
    set_: SetOpt = None,
    address: AddressOpt = None,
) -> None:
    """nDCG/MRR/Recall@{1,5,10,100} of the embed + retrieve stages on a BEIR folder."""
    from craft_ray.config import apply_overrides, validate
    from craft_ray.retrieval.evaluation import (
        RetrievalEvalConfig,
        format_table,
        load_beir,
        run_eval_retrieval,
    )
    from craft_ray.runtime import init_ray, storage

    def body() -> dict[str, Any]:
        raw = {"data": data, "split": split, "model": model,
               "run_dir": run_dir or str(Path("runs/eval-retrieval") / _folder_name(data))}
        sets = list(set_ or []) + ([f"ray.address={address}"] if address else [])
        cfg = validate(RetrievalEvalConfig, apply_overrides(raw, sets), "<eval-retrieval>")
        if out is not None:
            storage.check_no_credentials(out)
            storage.check_location(out, "--out")
        storage.check_location(cfg.run_dir)
        beir = load_beir(cfg.data, cfg.split)  # bad folders and buckets fail before Ray
        init_ray(cfg.ray)
        result = run_eval_retrieval(cfg, beir)
        if out is not None:
            storage.write_json(out, result)
        return result

    result = guarded(body)
    typer.echo(format_table(result["metrics"], sorted({int(k.split("@")[1])
                                                        for k in result["metrics"]})))
    typer.echo(json.dumps(result["metrics"]))


@app.command("mine-negatives")
def mine_negatives(
    data: Annotated[str, typer.Option(help="BEIR-format folder with the positives in qrels.")],
    out: Annotated[str, typer.Option(help="Output jsonl (LLM-Embedder training format).")],
    split: Annotated[str, typer.Option(help="qrels split.")] = "train",
    set_: SetOpt = None,
    address: AddressOpt = None,
) -> None:
    """Hard negatives from dense + BM25 top-200, in LLM-Embedder's training format."""
    from craft_ray.config import apply_overrides, validate
    from craft_ray.retrieval.evaluation import load_beir
    from craft_ray.retrieval.negatives import MineNegativesConfig, run_mine_negatives
    from craft_ray.runtime import init_ray, storage

    def body() -> dict[str, Any]:
        raw = {"data": data, "out": out, "split": split,
               "run_dir": str(Path("runs/mine-negatives") / _folder_name(data))}
        sets = list(set_ or []) + ([f"ray.address={address}"] if address else [])
        cfg = validate(MineNegativesConfig, apply_overrides(raw, sets), "<mine-negatives>")
        storage.check_location(cfg.out, "--out")
        storage.check_location(cfg.run_dir)
        beir = load_beir(cfg.data, cfg.split)  # bad folders and buckets fail before Ray
        if "dense" in cfg.retrievers:
            init_ray(cfg.ray)
        return run_mine_negatives(cfg, beir)

    result = guarded(body)
    typer.echo(json.dumps(result))


@app.command("train-retriever")
def train_retriever(
    out: Annotated[str, typer.Option(help="Output folder: the sentence-transformers model "
                                     "(+ metrics.json).")],
    data: Annotated[str | None, typer.Option(help="BEIR folder or LLM-Embedder jsonl.")]
    = None,
    split: Annotated[str | None, typer.Option(help="BEIR qrels split to train on (default "
                                              "train).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
    = None,
    set_: SetOpt = None,
    address: AddressOpt = None,
    force: ForceOpt = False,
) -> None:
    """Fine-tune a sentence-transformers retriever (in-batch + hard negatives, optional LM
    distillation) on Ray Train; before/after nDCG@10, MRR@10, Recall@100."""
    from craft_ray.retrieval.evaluation import format_table
    from craft_ray.runtime import init_ray
    from craft_ray.stages.train_retriever import TrainRetrieverConfig
    from craft_ray.stages.train_retriever import run_train_retriever as run_tr

    def body() -> dict[str, Any]:
        sets = [f"out={out}"] + ([f"data={data}"] if data else []) + \
            ([f"split={split}"] if split else []) + list(set_ or [])
        cfg = load_stage_config(TrainRetrieverConfig, config, sets, address)
        init_ray(cfg.ray)
        return run_tr(cfg, force=force)

    stats = guarded(body)
    for name in ("before", "after"):
        if stats.get(name):
            typer.echo(f"{name}:\n{format_table(stats[name], [10, 100])}", err=True)
    typer.echo(f"model: {stats['model']}", err=True)
    print_stats(stats)
