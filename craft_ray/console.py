"""What a person sees in the terminal: calm logs, progress, a closing table, clean errors.

``configure(verbose)`` is called once by the CLI. Without ``--verbose``:

- craft_ray's own logs stay at INFO; Ray's, Ray Data's, transformers' and other libraries' own
  logs at WARNING, and a few known-harmless warnings (token-auth notice, Ray Train's
  controller-state polling) are dropped;
- worker processes' output is not streamed to the driver (it stays in Ray's session logs);
- Ray Data shows one progress line per running dataset: a live rich bar on a terminal, else a
  plain line every ``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL`` seconds (30 by default here)
  with rows done/total, rate and ETA, named after the running stage.

The library itself never prints: this module only configures logging and renders the summary.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

VERBOSE = False
# Libraries whose INFO chatter hides craft_ray's own lines.
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "transformers", "datasets",
                 "sentence_transformers", "accelerate", "peft", "urllib3", "filelock", "httpx",
                 "torch", "DeepSpeed", "numexpr", "matplotlib", "xgrammar",
                 "bitsandbytes")
# Warnings that say nothing actionable to a user of the pipeline (kept with --verbose).
NOISE = (
    "Token authentication is enabled for this Ray cluster",
    "Failed to query Ray Train Controller actor state",
    "Progress bars disabled. To enable",
    "Progress bars for operators disabled",
    "Progress will be logged because stdout is a non-interactive terminal",
    "Setting accelerator to CPU",
    "Failed to load CPU gemm_4bit_forward",
)
PROGRESS_LOGGER = "ray.data._internal.progress.logging_progress"
_TOTAL = re.compile(r"^Total Progress: (\d+)/(\d+|\?)")


class NoiseFilter(logging.Filter):
    """Drops the records of :data:`NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in NOISE)


class ProgressLine(logging.Filter):
    """One progress line per running stage: done/total, rate, ETA, tokens/s, rejects so far.

    Two sources: Ray Data's non-terminal progress dump (a block of lines per refresh: a
    banner, the total, operators, a banner; only the total is kept) and the stage's own
    counters (:mod:`craft_ray.runtime.progress`: generations done out of those planned,
    tokens, training steps, rejects). When Ray Data is silent for a while (training, a single
    long batch), a heartbeat thread writes the line from the counters alone.
    """

    stage = "dataset"
    started = time.time()
    last = 0.0  # when the last line was let through
    # A stage runs many small datasets (filter: one per step), each logging at its start:
    # one line per this many seconds is enough.
    min_gap_s = 20.0
    _beat: threading.Thread | None = None
    _stop = threading.Event()

    @classmethod
    def begin(cls, stage: str) -> None:
        """A stage starts: reset its counters and keep a heartbeat going."""
        from craft_ray.runtime.progress import start_progress

        cls.stage, cls.started, cls.last = stage, time.time(), 0.0
        start_progress()
        if not VERBOSE and (cls._beat is None or not cls._beat.is_alive()):
            cls._stop.clear()
            cls._beat = threading.Thread(target=cls._heartbeat, name="craft-ray-progress",
                                         daemon=True)
            cls._beat.start()

    @classmethod
    def end(cls) -> None:
        """The command is done: no more lines."""
        cls._stop.set()

    @classmethod
    def _heartbeat(cls) -> None:
        while not cls._stop.wait(cls.min_gap_s / 4):
            now = time.time()
            if min(now - cls.last, now - cls.started) >= cls.min_gap_s:
                cls.last = time.time()
                logger.info("%s", cls.line(0, None))

    @classmethod
    def line(cls, done: int, total: int | None) -> str:
        """The line for Ray Data's ``done``/``total`` and the stage's counters."""
        from craft_ray.runtime.progress import read_progress

        return progress_text(cls.stage, done, total, time.time() - cls.started,
                             read_progress())

    def filter(self, record: logging.LogRecord) -> bool:
        m = _TOTAL.match(record.getMessage())
        if not m or time.time() - ProgressLine.last < self.min_gap_s:
            return False
        ProgressLine.last = time.time()
        total = None if m.group(2) == "?" else int(m.group(2))
        record.msg, record.args = ProgressLine.line(int(m.group(1)), total), None
        return True


def progress_text(stage: str, done: int, total: int | None, elapsed: float,
                  counters: dict[str, Any] | None = None) -> str:
    """``generate: 120/480 generations (25%), 3.1/s, ETA 1m56s, 38.2 tok/s, 2 rejects so far,
    39s elapsed``.

    ``done``/``total``: Ray Data's rows of the running dataset. ``counters`` (see
    :mod:`craft_ray.runtime.progress`): items the stage counts itself take their place when
    they have a ``total`` (generations of the prompts planned, training steps), else are added
    with their rate (``500 docs (50/s)``); tokens/s and rejects so far follow.
    """
    c = counters or {}
    unit = f" {c['unit']}" if c.get("unit") else " done"
    own = int(c.get("done", 0))
    if c.get("total"):
        done, total, own = own, int(c["total"]), 0
    extras = []
    if own:
        extras.append(f"{own:,}{unit} ({_rate(own, elapsed)})")
        unit = " done"
    if c.get("tokens") and elapsed > 0:
        extras.append(f"{c['tokens'] / elapsed:.3g} tok/s")
    for key in ("rejects", "errors"):
        if c.get(key):
            extras.append(f"{int(c[key]):,} {key} so far")
    tail = [*extras, f"{_duration(elapsed)} elapsed"]
    if done == 0 and not total:  # Ray Data counted nothing yet
        # what the stage counted itself, else a heartbeat
        return f"{stage}: " + ", ".join(tail if own else ["running", *tail])
    parts = [f"{stage}: {done:,}/{f'{total:,}' if total else '?'}{unit}"]
    if total:
        parts[0] += f" ({100 * done // max(total, 1)}%)"
    if done:  # no rate before the first item is done (a batch of generations takes minutes)
        parts.append(_rate(done, elapsed))
    rate = done / elapsed if elapsed > 0 else 0.0
    if total and rate > 0 and done < total:
        parts.append(f"ETA {_duration((total - done) / rate)}")
    return ", ".join(parts + tail)


def _rate(n: int, elapsed: float) -> str:
    rate = n / elapsed if elapsed > 0 else 0.0
    return f"{rate:.3g}/s" if rate >= 0.1 else f"{60 * rate:.2g}/min"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def configure(verbose: bool = False, level: str = "INFO") -> None:
    """Set up logging for a CLI run (see the module docstring)."""
    global VERBOSE
    VERBOSE = verbose
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if verbose:
        return
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "30")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|peft)")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    _filter_handlers()
    try:  # transformers' own tqdm bars (model saving/loading) in this process
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def ray_init_kwargs(log_to_driver: bool) -> dict[str, Any]:
    """``ray.init`` arguments of this console mode: quiet unless ``--verbose``.

    Also filters Ray's own handlers (set up when ``ray`` is imported) before ``ray.init``
    logs its start-up notices through them.
    """
    if VERBOSE:
        return {"log_to_driver": log_to_driver}
    _filter_handlers()
    return {"log_to_driver": False, "logging_level": logging.WARNING}


def _filter_handlers() -> None:
    for name in ("ray", "ray.data", "ray.train", "ray.tune", ""):
        for h in logging.getLogger(name).handlers:
            if not any(isinstance(f, NoiseFilter) for f in h.filters):
                h.addFilter(NoiseFilter())


def after_ray_init() -> None:
    """Quiet Ray's and Ray Data's loggers (Ray sets its own up in ``ray.init``) and choose
    Ray Data's progress display: one line per dataset, operators' own bars off."""
    if VERBOSE:
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    if sys.stdout.isatty():  # a live rich bar: rows done/total, rate, ETA
        ctx.enable_rich_progress_bars = True
        ctx.use_ray_tqdm = False
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    _filter_handlers()
    prog = logging.getLogger(PROGRESS_LOGGER)
    prog.setLevel(logging.INFO)
    if not any(isinstance(f, ProgressLine) for f in prog.filters):
        prog.addFilter(ProgressLine())


# --- the closing summary ---------------------------------------------------------------------

# The stats key naming each stage's output (other stages: RUN_DIR/STAGE).
OUTPUT_KEYS = {"embed": "store", "generate": "output_dir", "train": "adapter",
               "evaluate": "outputs", "sweep": "table"}


def write_summary(run_dir: str | Path, results: dict[str, Any]) -> str:
    """Merge ``{stage: stats}`` into ``RUN_DIR/summary.json`` (stages of earlier commands are
    kept); returns its path."""
    from craft_ray.runtime import storage

    path = storage.join(run_dir, "summary.json")
    old: dict[str, Any] = {}
    if storage.is_file(path):
        try:
            old = storage.read_json(path)
        except (OSError, json.JSONDecodeError):
            old = {}
    stages = dict(old.get("stages", {}))
    stages.update({k: v for k, v in results.items() if isinstance(v, dict)})
    extra = {k: v for k, v in results.items() if not isinstance(v, dict)}
    storage.write_json(path, {**{k: v for k, v in old.items() if k != "stages"}, **extra,
                              "stages": stages, "updated": time.time()})
    return path


def _output_of(name: str, stats: dict[str, Any], run_dir: str) -> str:
    from craft_ray.runtime import storage

    v = stats.get(OUTPUT_KEYS.get(name, ""))
    return v if isinstance(v, str) and v else storage.join(run_dir, name)


def stage_rows(results: dict[str, Any], run_dir: str | Path) -> list[list[str]]:
    """One row per stage: name, rows in, rows out, rejects, seconds, output path."""
    rows = []
    for name, st in results.items():
        if not isinstance(st, dict):
            continue
        if st.get("skipped"):
            rows.append([name, "-", "-", "-", "skipped", _output_of(name, {}, str(run_dir))])
            continue
        def num(key: str, st: dict[str, Any] = st) -> str:
            v = st.get(key)
            return f"{v:,}" if isinstance(v, int) else "-"
        secs = st.get("seconds")
        rows.append([name, num("rows_in"), num("rows_out"), num("rejects_total"),
                     f"{secs:.1f}" if isinstance(secs, int | float) else "-",
                     _output_of(name, st, str(run_dir))])
    return rows


def print_summary(results: dict[str, Any], run_dir: str | Path,
                  report: str | Path | None = None) -> None:
    """The closing table (stderr: stdout stays for ``--json``)."""
    from rich.console import Console
    from rich.table import Table

    # A terminal gets its width; a log (CI, `ray job submit`) wide lines rather than folds.
    console = Console(stderr=True, highlight=False,
                      width=None if sys.stderr.isatty() else 200)
    rows = stage_rows(results, run_dir)
    if rows:
        table = Table(title=None, box=None, pad_edge=False, show_edge=False)
        for col, just in (("stage", "left"), ("rows in", "right"), ("rows out", "right"),
                          ("rejects", "right"), ("seconds", "right"), ("output", "left")):
            table.add_column(col, justify=just, overflow="fold")
        for r in rows:
            table.add_row(*r)
        console.print(table)
    console.print(f"summary: {_output_of('summary.json', {}, str(run_dir))}")
    if report is not None:
        console.print(f"report:  {report}")


def error_line(exc: BaseException, run_dir: str | Path | None) -> str:
    """One line for an unexpected error (no --verbose): its type and message, and where its
    full traceback was written (``RUN_DIR/error.log``, else a temporary file)."""
    import tempfile
    import traceback

    from craft_ray.runtime import storage

    text = "".join(traceback.format_exception(exc))
    path: str | None = None
    tmp = os.path.join(tempfile.gettempdir(), f"craft-ray-error-{os.getpid()}.log")
    for target in ([storage.join(run_dir, "error.log")] if run_dir else []) + [tmp]:
        try:
            storage.write_text(target, text)
            path = storage.redact(target)
            break
        except Exception:  # an unwritable folder or store: the local temporary file then
            path = None
    first = (str(exc).strip().splitlines() or [""])[-1][:300]
    where = f"full traceback in {path}; " if path else ""
    return f"error: {type(exc).__name__}: {first} ({where}rerun with --verbose to see it here)"
