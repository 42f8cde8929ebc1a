"""Timing that resists a noisy machine, shared by every ``craft-ray bench`` command.

A comparison taken once, with one side slowed by other work, is not a measurement. So each
benchmark runs its two sides **interleaved** (A B A B A B, after a warm-up of each), reports
median and min–max of each side, and the ratio **pair by pair** (run i of A against run i of B,
which ran next to each other under the same load): ``ratio`` is the median of those ratios.
The load average before and after, and the threads each side used (torch, and the BLAS/OpenMP
pools through threadpoolctl) go into the result, so a reader can tell a quiet run from a
loaded one.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

#: Load average (1 min) above which a run is flagged as taken on a busy machine.
QUIET_LOAD = 1.0


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def thread_report() -> dict[str, Any]:
    """Threads this process computes with: torch intra-op threads and every BLAS/OpenMP pool
    threadpoolctl finds (library, API, threads, kernel architecture)."""
    out: dict[str, Any] = {"cpu_count": os.cpu_count()}
    try:
        import torch

        out["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    from threadpoolctl import threadpool_info

    out["pools"] = [
        {"api": p.get("internal_api"), "threads": p.get("num_threads"),
         "arch": p.get("architecture"), "lib": os.path.basename(p.get("filepath", ""))}
        for p in threadpool_info()
    ]
    return out


def summary(values: list[float], digits: int = 3) -> dict[str, Any]:
    """Median, min and max of ``values`` (and the values themselves)."""
    return {"median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits),
            "runs": [round(v, digits) for v in values]}


def paired_ratio(num: list[float], den: list[float], digits: int = 3) -> dict[str, Any]:
    """``num[i] / den[i]`` for each interleaved pair: median, min and max."""
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio needs two equal, non-empty lists ({len(num)}, {len(den)})")
    return summary([n / d for n, d in zip(num, den)], digits)


def interleave(sides: dict[str, Callable[[], float]], repeats: int = 3,
               warmup: bool | dict[str, Callable[[], Any]] = True) -> dict[str, list[float]]:
    """Warm up each side (``warmup=True``: one call of the side itself, not kept; a dict: a
    lighter call per side), then ``repeats`` rounds of every side in turn. Each callable runs
    its work and returns the figure it measured (seconds, or a rate); what it times is its own
    business, so set-up can stay outside the timing."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup:
        for name, fn in (warmup if isinstance(warmup, dict) else sides).items():
            logger.info("bench: warm-up of %s", name)
            fn()
    out: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(repeats):
        for name, fn in sides.items():
            out[name].append(fn())
            logger.info("bench: round %d/%d %s -> %.4g", r + 1, repeats, name, out[name][-1])
    return out


def conditions(load_before: list[float]) -> dict[str, Any]:
    """What a result carries about the machine it ran on: load before and after, and a flag
    when the run began above :data:`QUIET_LOAD` (such a figure is not one to publish)."""
    return {"load_before": load_before, "load_after": load_average(),
            "quiet": load_before[0] < QUIET_LOAD}
