"""What every ``craft-ray`` command shares: the Typer apps, the common options, the global
flags (``--verbose``, ``--json``), user errors (exit 2, one line) and the stage summary."""

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


class CliState:
    """The global flags of this invocation."""

    verbose = False
    json = False
    run_dir: str | None = None  # of the config last loaded (where summary.json goes)


def user_errors() -> tuple[type[BaseException], ...]:
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


def user_error_in(exc: BaseException) -> BaseException | None:
    """The user error behind ``exc``: itself, or the cause a Ray task/actor error wraps."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, user_errors()):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__  # RayTaskError keeps .cause
        seen += 1
    return None


def guarded(fn: Callable[[], T]) -> T:
    """Run a command body; a user error is its message on stderr and exit code 2, any other
    error one line (exit 1) with its traceback in RUN_DIR/error.log; tracebacks on the
    terminal with --verbose."""
    try:
        return fn()
    except Exception as exc:
        if CliState.verbose or isinstance(exc, typer.Exit):
            raise
        user = user_error_in(exc)
        if user is not None:
            typer.echo(f"error: {user}", err=True)
            raise typer.Exit(2) from None
        from craft_ray.console import error_line

        typer.echo(error_line(exc, CliState.run_dir), err=True)
        raise typer.Exit(1) from None
    finally:
        from craft_ray.console import ProgressLine

        ProgressLine.end()  # the command's work is over: no more progress lines


def load_stage_config(model: type[Any], config: Path, overrides: list[str] | None,
                      address: str | None) -> Any:
    """The config file with its ``--set`` overrides (and ``--address``), validated."""
    sets = list(overrides or [])
    if address:
        sets.append(f"ray.address={address}")
    cfg = load_config(model, config, sets, absolute_paths=True)
    CliState.run_dir = getattr(cfg, "run_dir", None)
    if CliState.run_dir is not None:
        from craft_ray.runtime.storage import check_location

        check_location(CliState.run_dir)  # a missing bucket, refused credentials: stop here
    return cfg


def print_stats(stats: dict[str, Any], run_dir: str | None = None,
                 report: str | None = None) -> None:
    """Write RUN_DIR/summary.json, show the stage table (stderr); JSON on stdout with --json.

    ``stats``: one stage's stats (with a ``stage`` key) or ``{stage: stats}`` of a pipeline.
    """
    from craft_ray import console

    run_dir = run_dir or CliState.run_dir
    by_stage = {stats["stage"]: stats} if isinstance(stats.get("stage"), str) else stats
    if run_dir is not None:
        console.write_summary(run_dir, by_stage)
        console.print_summary(by_stage, run_dir, report)
    if CliState.json:
        typer.echo(json.dumps(stats, sort_keys=True, default=str))


def on_stage(name: str) -> None:
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

    CliState.verbose, CliState.json = verbose, json_out
    console.configure(verbose, log_level)
