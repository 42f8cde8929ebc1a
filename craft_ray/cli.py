"""The ``craft-ray`` command line: one subcommand per stage, each a few lines over the library.

Every stage command reads ``--config FILE`` (YAML) plus ``--set key=value`` overrides,
validates them before Ray starts, then runs on an embedded local Ray or on the cluster given
by ``--address`` / ``RAY_ADDRESS``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

from craft_ray.config import ConfigError, load_config

GLOBAL_FLAGS = ("--verbose", "-v", "--json")


class _GlobalFlagsFirst(TyperGroup):
    """``craft-ray demo --verbose`` works like ``craft-ray --verbose demo``: the global flags
    are moved in front of the subcommand before parsing."""

    def main(self, args: Any = None, *a: Any, **kw: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        end = argv.index("--") if "--" in argv else len(argv)
        flags = [x for x in argv[:end] if x in GLOBAL_FLAGS]
        rest = [x for x in argv[:end] if x not in GLOBAL_FLAGS] + argv[end:]
        return super().main(flags + rest, *a, **kw)


app = typer.Typer(
    help="CRAFT on Ray: few-shots + corpora -> task datasets -> LoRA adapters -> evaluation.",
    cls=_GlobalFlagsFirst,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks: ratios against a named baseline, measured in one run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")
config_app = typer.Typer(help="Configs that explain themselves: every key, its default and "
                         "meaning; validate a file without running anything.",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")

logger = logging.getLogger("craft_ray")

ConfigOpt = Annotated[Path, typer.Option(
    "--config", "-c", help="YAML config file. Every key with its default and meaning: "
    "`craft-ray config show STAGE`; check a file: `craft-ray config validate FILE`.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Dotted override, e.g. --set embed.batch_size=512 "
                 "(repeatable)."),
]
AddressOpt = Annotated[
    str | None,
    typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS, else an "
                 "embedded local Ray)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if complete.")]

T = TypeVar("T")


class _State:
    """The global flags of this invocation."""

    verbose = False
    json = False
    run_dir: str | None = None  # of the config last loaded (where summary.json goes)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or config: their message is the whole story (exit 2)."""
    from craft_ray.evalsets import EvalSetError
    from craft_ray.retrieval.evaluation import BeirError
    from craft_ray.runtime import ClusterUnreachableError
    from craft_ray.stages.retrieve import RetrieveError
    from craft_ray.stages.train_retriever import RetrieverDataError
    from craft_ray.store.corpus import CorpusError
    from craft_ray.store.vectors import StoreError
    from craft_ray.tasks import TaskError
    from craft_ray.tasks.fewshots import FewShotError

    return (ConfigError, CorpusError, StoreError, ClusterUnreachableError, FileNotFoundError,
            FewShotError, EvalSetError, TaskError, RetrieveError, BeirError,
            RetrieverDataError)


def _user_error_in(exc: BaseException) -> BaseException | None:
    """The user error behind ``exc``: itself, or the cause a Ray task/actor error wraps."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, _user_errors()):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__  # RayTaskError keeps .cause
        seen += 1
    return None


def _run(fn: Callable[[], T]) -> T:
    """Run a command body; a user error is its message on stderr and exit code 2, any other
    error one line (exit 1) with its traceback in RUN_DIR/error.log; tracebacks on the
    terminal with --verbose."""
    try:
        return fn()
    except Exception as exc:
        if _State.verbose or isinstance(exc, typer.Exit):
            raise
        user = _user_error_in(exc)
        if user is not None:
            typer.echo(f"error: {user}", err=True)
            raise typer.Exit(2) from None
        from craft_ray.console import error_line

        typer.echo(error_line(exc, _State.run_dir), err=True)
        raise typer.Exit(1) from None


def _load(model: type[Any], config: Path, overrides: list[str] | None, address: str | None
          ) -> Any:
    sets = list(overrides or [])
    if address:
        sets.append(f"ray.address={address}")
    cfg = load_config(model, config, sets, absolute_paths=True)
    _State.run_dir = getattr(cfg, "run_dir", None)
    return cfg


def _print_stats(stats: dict[str, Any], run_dir: str | None = None,
                 report: str | None = None) -> None:
    """Write RUN_DIR/summary.json, show the stage table (stderr); JSON on stdout with --json.

    ``stats``: one stage's stats (with a ``stage`` key) or ``{stage: stats}`` of a pipeline.
    """
    from craft_ray import console

    run_dir = run_dir or _State.run_dir
    by_stage = {stats["stage"]: stats} if isinstance(stats.get("stage"), str) else stats
    if run_dir is not None:
        console.write_summary(run_dir, by_stage)
        console.print_summary(by_stage, run_dir, report)
    if _State.json:
        typer.echo(json.dumps(stats, sort_keys=True, default=str))


def _on_stage(name: str) -> None:
    from craft_ray.console import ProgressLine

    ProgressLine.begin(name)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Libraries' own logs, worker output and full tracebacks "
        "(may be given after the subcommand too).")] = False,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Also print the run's summary as JSON on stdout (it is always written "
        "to RUN_DIR/summary.json).")] = False,
    log_level: Annotated[str, typer.Option(help="Level of craft_ray's own logs.")] = "INFO",
) -> None:
    """CRAFT on Ray."""
    from craft_ray import console

    _State.verbose, _State.json = verbose, json_out
    console.configure(verbose, log_level)


@app.command()
def embed(config: ConfigOpt, set_: SetOpt = None, address: AddressOpt = None,
          force: ForceOpt = False) -> None:
    """Embed corpora into a sharded embedding store (+ CRAFT .h5)."""
    from craft_ray.runtime import init_ray
    from craft_ray.stages.embed import EmbedStageConfig, preflight, run_embed

    def body() -> dict[str, Any]:
        cfg = _load(EmbedStageConfig, config, set_, address)
        preflight(cfg)
        init_ray(cfg.ray)
        _on_stage("embed")
        return run_embed(cfg, force=force)

    stats = _run(body)
    typer.echo(f"embedding store: {stats['store']}", err=True)
    _print_stats(stats)


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
        cfg = _load(PipelineConfig, config, set_, address)
        plan(cfg, from_stage)  # validates --from before Ray starts
        init_ray(cfg.ray)
        results = run_pipeline(cfg, from_stage, on_stage=_on_stage)
        results["report"] = str(build_report(cfg.run_dir).resolve())
        return results

    results = _run(body)
    _print_stats(results, report=results["report"])


@app.command()
def demo(
    set_: SetOpt = None,
    from_stage: Annotated[str | None, typer.Option("--from", help="Rerun from this stage.")]
    = None,
) -> None:
    """The offline demo: the whole pipeline on this machine (bundled data, tiny models)."""
    from craft_ray.demo import (
        demo_samples,
        demo_with_run_dir,
        load_demo_config,
        prepare_demo_models,
    )
    from craft_ray.pipeline import plan, run_pipeline
    from craft_ray.report.html import build_report
    from craft_ray.runtime import init_ray

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
        _State.run_dir = cfg.run_dir
        results = run_pipeline(cfg, from_stage, on_stage=_on_stage)
        results["report"] = str(build_report(cfg.run_dir).resolve())
        results["run_dir"] = str(Path(cfg.run_dir).resolve())
        return results

    results = _run(body)
    typer.echo("Demo finished.", err=True)
    _print_stats(results, results["run_dir"], results["report"])
    samples = demo_samples(results["run_dir"])
    if samples:
        typer.echo("\nThree generated samples beside their source document:", err=True)
    for s in samples:
        typer.echo(f"\n[{s['title']}]  ({s['doc_id']})\n{s['sample']}", err=True)


@app.command()
def init(
    name: Annotated[str, typer.Argument(help="Name of the new task (letters, digits, _ - .).")],
) -> None:
    """Start a new task here: NAME.yaml (a custom-task starter config), NAME.fewshots.jsonl
    and NAME.eval.jsonl (a held-out evaluation set)."""
    from craft_ray.bundled import init_task

    written = _run(lambda: init_task(name))
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

    typer.echo(_run(lambda: show(stage)))


@config_app.command("validate")
def config_validate(
    file: Annotated[Path, typer.Argument(help="Whole-pipeline or stage YAML.")],
    set_: SetOpt = None,
) -> None:
    """Check a config file (and overrides) without running anything; exit 2 on an error."""
    from craft_ray.config.doc import validate_file

    stages = _run(lambda: validate_file(file, set_ or []))
    typer.echo(f"{file}: valid; stages it runs: {', '.join(stages) or 'none'}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Run directory.")],
) -> None:
    """Write RUN_DIR/report.html from the stages that have run."""
    from craft_ray.report.html import build_report

    out = _run(lambda: build_report(run_dir))
    typer.echo(str(out))


@app.command("export-h5")
def export_h5_cmd(
    store: Annotated[Path, typer.Option(help="Embedding store folder (RUN_DIR/embed/store).")],
    out: Annotated[Path, typer.Option(help="Output .h5 file.")],
) -> None:
    """Export an embedding store to CRAFT's .h5 layout."""
    from craft_ray.store.vectors import export_h5

    counts = _run(lambda: export_h5(store, out))
    typer.echo(json.dumps({"out": str(out), "datasets": counts}))


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

    result = _run(lambda: run_bench_embed(data, min_docs=min_docs, overrides=set_ or [],
                                          repeats=repeats, int8=int8))
    typer.echo(json.dumps(result))


@app.command()
def generate(config: ConfigOpt, set_: SetOpt = None, address: AddressOpt = None,
             force: ForceOpt = False) -> None:
    """Generate task samples from corpus samples + few-shots (hf, openai or vllm backend)."""
    from craft_ray.runtime import init_ray
    from craft_ray.stages.generate import GenerateStageConfig, run_generate

    def body() -> dict[str, Any]:
        cfg = _load(GenerateStageConfig, config, set_, address)
        init_ray(cfg.ray)
        _on_stage("generate")
        return run_generate(cfg, force=force)

    stats = _run(body)
    typer.echo(f"task samples: {Path(stats['output_dir']) / 'clean.parquet'}", err=True)
    _print_stats(stats)


@app.command()
def retrieve(config: ConfigOpt, set_: SetOpt = None, address: AddressOpt = None,
             force: ForceOpt = False) -> None:
    """Retrieve the corpus documents most similar to the few-shots (exact top-k)."""
    from craft_ray.runtime import StageDir, init_ray
    from craft_ray.stages.retrieve import (
        RetrieveError,
        RetrieveStageConfig,
        prepare_retrieve,
        run_retrieve,
    )
    from craft_ray.tasks.fewshots import FewShotError

    def body() -> dict[str, Any]:
        cfg = _load(RetrieveStageConfig, config, set_, address)
        done = not force and StageDir(cfg.run_dir, "retrieve").is_complete(cfg.retrieve)
        prep = None if done else prepare_retrieve(cfg)  # every check before Ray starts
        init_ray(cfg.ray)
        _on_stage("retrieve")
        return run_retrieve(cfg, force=force, prepared=prep)

    try:
        stats = _run(body)
    except (RetrieveError, FewShotError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    _print_stats(stats)


@app.command("eval-retrieval")
def eval_retrieval(
    data: Annotated[Path, typer.Option(help="BEIR-format folder (corpus.jsonl, queries.jsonl, "
                                       "qrels/SPLIT.tsv).")],
    split: Annotated[str, typer.Option(help="qrels split.")] = "test",
    model: Annotated[str, typer.Option(help="sentence-transformers model id or path.")] = (
        "sentence-transformers/all-MiniLM-L6-v2"),
    out: Annotated[Path | None, typer.Option(help="Write the metrics JSON here.")] = None,
    run_dir: Annotated[Path | None, typer.Option(
        help="Work folder for the embedding store (default runs/eval-retrieval/NAME).")] = None,
    set_: SetOpt = None,
    address: AddressOpt = None,
) -> None:
    """nDCG/MRR/Recall@{1,5,10,100} of the embed + retrieve stages on a BEIR folder."""
    from craft_ray.config import apply_overrides, validate
    from craft_ray.retrieval.evaluation import (
        BeirError,
        RetrievalEvalConfig,
        format_table,
        load_beir,
        run_eval_retrieval,
    )
    from craft_ray.runtime import atomic_write_json, init_ray

    def body() -> dict[str, Any]:
        raw = {"data": str(data), "split": split, "model": model,
               "run_dir": str(run_dir or Path("runs/eval-retrieval") / data.resolve().name)}
        sets = list(set_ or []) + ([f"ray.address={address}"] if address else [])
        cfg = validate(RetrievalEvalConfig, apply_overrides(raw, sets), "<eval-retrieval>")
        beir = load_beir(cfg.data, cfg.split)  # bad folders fail before Ray starts
        init_ray(cfg.ray)
        return run_eval_retrieval(cfg, beir)

    try:
        result = _run(body)
    except BeirError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if out is not None:
        atomic_write_json(out, result)
    typer.echo(format_table(result["metrics"], sorted({int(k.split("@")[1])
                                                        for k in result["metrics"]})))
    typer.echo(json.dumps(result["metrics"]))


@app.command()
def train(config: ConfigOpt, set_: SetOpt = None, address: AddressOpt = None,
          force: ForceOpt = False) -> None:
    """LoRA fine-tune on Ray Train (one dataset size, one seed) -> RUN_DIR/train/TRIAL/adapter."""
    from craft_ray.runtime import init_ray
    from craft_ray.stages.train import TrainStageConfig, run_train

    def body() -> dict[str, Any]:
        cfg = _load(TrainStageConfig, config, set_, address)
        init_ray(cfg.ray)
        _on_stage("train")
        return run_train(cfg, force=force)

    stats = _run(body)
    typer.echo(f"adapter: {stats['adapter']}", err=True)
    _print_stats(stats)


@app.command()
def evaluate(config: ConfigOpt, set_: SetOpt = None, address: AddressOpt = None,
             force: ForceOpt = False) -> None:
    """Score base models / adapters / merged models on eval sets: multiple-choice accuracy,
    or for generative sets the model's own answers with ROUGE-L and an LLM-judge win rate."""
    from craft_ray.evalsets.base import EvalSetError
    from craft_ray.runtime import init_ray
    from craft_ray.stages.evaluate import EvaluateStageConfig, run_evaluate

    def body() -> dict[str, Any]:
        cfg = _load(EvaluateStageConfig, config, set_, address)
        init_ray(cfg.ray)
        _on_stage("evaluate")
        try:
            return run_evaluate(cfg, force=force)
        except EvalSetError as exc:
            raise ConfigError(str(exc)) from None

    stats = _run(body)
    typer.echo(f"evaluation outputs: {stats['outputs']}", err=True)
    _print_stats(stats)


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

    path = _run(lambda: merge_adapter(adapter, out, base, dtype))
    typer.echo(json.dumps({"merged": str(path)}))


@app.command()
def sweep(config: ConfigOpt, set_: SetOpt = None, address: AddressOpt = None) -> None:
    """Seeds x dataset sizes on Ray Tune (one Ray Train fine-tune per trial); resumable."""
    from craft_ray.runtime import init_ray
    from craft_ray.stages.sweep import SweepStageConfig, run_sweep

    def body() -> dict[str, Any]:
        cfg = _load(SweepStageConfig, config, set_, address)
        init_ray(cfg.ray)
        _on_stage("sweep")
        return run_sweep(cfg)

    stats = _run(body)
    typer.echo(f"table: {stats['table']}", err=True)
    _print_stats(stats)


@bench_app.command("train")
def bench_train(
    rows: Annotated[int, typer.Option(help="Training examples (real CRAFT few-shots, "
                                      "repeated).")] = 64,
    steps: Annotated[int, typer.Option(help="Optimizer steps per measured run.")] = 30,
    set_: SetOpt = None,
) -> None:
    """Plain PEFT loop vs Ray Train with 1 and 2 workers: tokens/s on the same tiny model."""
    from craft_ray.bench.train import run_bench_train

    result = _run(lambda: run_bench_train(rows=rows, steps=steps, overrides=set_ or []))
    typer.echo(json.dumps(result))


@app.command()
def aggregate(
    inputs: Annotated[list[Path], typer.Argument(help="results.json files or folders.")],
    out: Annotated[Path, typer.Option(help="Output folder (table, plot, report).")],
) -> None:
    """Mean ± std per model series and dataset size over many results, with a plot."""
    from craft_ray.report.plots import run_aggregate

    typer.echo(json.dumps(_run(lambda: run_aggregate(inputs, out))))


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

    r = _run(lambda: run_bench_retrieve(workdir, rows, dim, queries, k, shards, concurrency,
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


@app.command("mine-negatives")
def mine_negatives(
    data: Annotated[Path, typer.Option(help="BEIR-format folder with the positives in qrels.")],
    out: Annotated[Path, typer.Option(help="Output jsonl (LLM-Embedder training format).")],
    split: Annotated[str, typer.Option(help="qrels split.")] = "train",
    set_: SetOpt = None,
    address: AddressOpt = None,
) -> None:
    """Hard negatives from dense + BM25 top-200, in LLM-Embedder's training format."""
    from craft_ray.config import apply_overrides, validate
    from craft_ray.retrieval.evaluation import BeirError, load_beir
    from craft_ray.retrieval.negatives import MineNegativesConfig, run_mine_negatives
    from craft_ray.runtime import init_ray

    def body() -> dict[str, Any]:
        raw = {"data": str(data), "out": str(out), "split": split,
               "run_dir": str(Path("runs/mine-negatives") / data.resolve().name)}
        sets = list(set_ or []) + ([f"ray.address={address}"] if address else [])
        cfg = validate(MineNegativesConfig, apply_overrides(raw, sets), "<mine-negatives>")
        beir = load_beir(cfg.data, cfg.split)  # bad folders fail before Ray starts
        if "dense" in cfg.retrievers:
            init_ray(cfg.ray)
        return run_mine_negatives(cfg, beir)

    try:
        result = _run(body)
    except BeirError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result))


# --- train-retriever (issue 18) -----------------------------------------------------------


@app.command("train-retriever")
def train_retriever(
    out: Annotated[Path, typer.Option(help="Output folder: the sentence-transformers model "
                                      "(+ metrics.json).")],
    data: Annotated[Path | None, typer.Option(help="BEIR folder or LLM-Embedder jsonl.")]
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
    from craft_ray.stages.train_retriever import RetrieverDataError, TrainRetrieverConfig
    from craft_ray.stages.train_retriever import run_train_retriever as run_tr

    def body() -> dict[str, Any]:
        sets = [f"out={out}"] + ([f"data={data}"] if data else []) + \
            ([f"split={split}"] if split else []) + list(set_ or [])
        cfg = _load(TrainRetrieverConfig, config, sets, address)
        init_ray(cfg.ray)
        return run_tr(cfg, force=force)

    try:
        stats = _run(body)
    except RetrieverDataError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for name in ("before", "after"):
        if stats.get(name):
            typer.echo(f"{name}:\n{format_table(stats[name], [10, 100])}", err=True)
    typer.echo(f"model: {stats['model']}", err=True)
    _print_stats(stats)


# --- end train-retriever ------------------------------------------------------------------


@app.command()
def judge(config: ConfigOpt, set_: SetOpt = None, address: AddressOpt = None,
          force: ForceOpt = False) -> None:
    """Win rate of predictions against references with an LLM judge (+ ROUGE-L)."""
    from craft_ray.runtime import init_ray
    from craft_ray.stages.judge import JudgeStageConfig, run_judge

    def body() -> dict[str, Any]:
        cfg = _load(JudgeStageConfig, config, set_, address)
        init_ray(cfg.ray)
        _on_stage("judge")
        return run_judge(cfg, force=force)

    stats = _run(body)
    typer.echo(f"judgements: {stats['outputs']}", err=True)
    _print_stats(stats)


@app.command("filter")
def filter_cmd(config: ConfigOpt, set_: SetOpt = None, address: AddressOpt = None,
               force: ForceOpt = False) -> None:
    """Filter clean samples (leakage, dedup, decontamination, judge); write sized datasets."""
    from craft_ray.runtime import init_ray
    from craft_ray.stages.filter import FilterStageConfig, run_filter, too_few_message

    def body() -> dict[str, Any]:
        cfg = _load(FilterStageConfig, config, set_, address)
        init_ray(cfg.ray)
        _on_stage("filter")
        return run_filter(cfg, force=force)

    stats = _run(body)
    if stats.get("sizes_skipped"):
        typer.echo(f"warning: {too_few_message(stats['sizes_skipped'], stats['datasets'])}",
                   err=True)
    for name, info in stats.get("datasets", {}).items():
        typer.echo(f"dataset {name}: {info['path']} ({info['rows']} rows)", err=True)
    _print_stats(stats)


@bench_app.command("dedup")
def bench_dedup(
    data: Annotated[Path, typer.Option(help="Folder of StackExchange dumps.")] = Path(
        "../shared/data/stackexchange"),
    n: Annotated[int, typer.Option(help="Samples at the base size (4n is also timed).")] = 20000,
    baseline_n: Annotated[int, typer.Option(help="Samples for the pairwise baseline.")] = 2000,
    ray_path: Annotated[bool, typer.Option(help="Also time the Ray Data plan at n.")] = True,
) -> None:
    """MinHash-LSH dedup vs CRAFT's pairwise token_set_ratio dedup on planted duplicates."""
    from craft_ray.bench.dedup import run_bench_dedup

    result = _run(lambda: run_bench_dedup(data, n=n, baseline_n=baseline_n,
                                          ray_path=ray_path))
    typer.echo(json.dumps(result))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
