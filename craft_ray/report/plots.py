"""Sweep tables and plots: mean ± std per (eval set, model series, dataset size).

Input: result dicts as written by ``craft-ray evaluate`` (``results.json``; one per model and
eval set) or by the judge (``metric: win_rate``). Repeats of the same (set, series, size) -
typically training seeds - are averaged; the std is the sample std (ddof=1; 0 for one run).

A series with sizes (CRAFT adapters trained on S/M/L/XL) becomes a line over dataset size with
error bars; a series without sizes (the base model, a few-shot-only baseline) becomes a
horizontal reference line with a shaded ± std band.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from craft_ray.runtime import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

SIZE_ORDER = {"XS": 0, "S": 1, "M": 2, "L": 3, "XL": 4, "XXL": 5}
_NUM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def size_value(size: str | int | float | None) -> float | None:
    """Numeric value of a size label: 500 -> 500, '25k' -> 25000; None when not numeric."""
    if size is None:
        return None
    if isinstance(size, (int, float)):
        return float(size)
    m = _NUM_RE.match(str(size))
    if not m:
        return None
    mult = {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
    return float(m.group(1)) * mult


def _size_key(size: str | None) -> tuple[int, float, str]:
    if size is None:
        return (0, 0.0, "")
    v = size_value(size)
    if v is not None:
        return (1, v, str(size))
    return (2, float(SIZE_ORDER.get(str(size).upper(), 99)), str(size))


def metric_of(result: dict[str, Any]) -> tuple[str, float]:
    """(metric name, value) of one result dict."""
    name = result.get("metric", "accuracy")
    return name, float(result[name])


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read result dicts from files (a dict or a list of dicts each) or folders (recursive
    ``results.json`` below them, excluding summary files that are lists)."""
    out: list[dict[str, Any]] = []
    for p in paths:
        p = Path(p)
        files = sorted(p.rglob("results.json")) if p.is_dir() else [p]
        for f in files:
            data = json.loads(f.read_text())
            if isinstance(data, dict):
                out.append(data)
            elif not p.is_dir():  # an explicit summary file: take its list
                out.extend(d for d in data if isinstance(d, dict))
    return out


def aggregate(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group by (eval_set, group, size): mean, std (ddof=1), runs, and the models averaged."""
    groups: dict[tuple[str, str, str | None, str], list[dict[str, Any]]] = {}
    for r in results:
        metric, _ = metric_of(r)
        size = None if r.get("size") is None else str(r["size"])
        key = (str(r["eval_set"]), str(r.get("group") or r.get("model")), size, metric)
        groups.setdefault(key, []).append(r)
    rows = []
    for (eval_set, group, size, metric), rs in groups.items():
        vals = [metric_of(r)[1] for r in rs]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) \
            if len(vals) > 1 else 0.0
        rows.append({"eval_set": eval_set, "group": group, "size": size, "metric": metric,
                     "mean": mean, "std": std, "runs": len(vals),
                     "n_items": sorted({int(r.get("n", 0)) for r in rs}),
                     "models": sorted(str(r.get("model")) for r in rs)})
    rows.sort(key=lambda r: (r["eval_set"], r["size"] is not None, r["group"],
                             _size_key(r["size"])))
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: one line per (eval set, series, size) with mean ± std."""
    lines = ["| eval set | model | size | metric | mean ± std | runs | items |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['eval_set']} | {r['group']} | {r['size'] or '-'} | {r['metric']} | "
            f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} | {r['runs']} | "
            f"{'/'.join(str(n) for n in r['n_items'])} |")
    return "\n".join(lines) + "\n"


def plot_vs_size(rows: Sequence[dict[str, Any]], out_png: str | Path) -> Path:
    """Metric vs dataset size with error bars, one panel per eval set; PNG at ``out_png``.

    Sizes are placed on a log axis when all are numeric, else in S < M < L < XL order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    sets = sorted({r["eval_set"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(5.2 * max(1, len(sets)), 4),
                             squeeze=False)
    for ax, eval_set in zip(axes[0], sets):
        mine = [r for r in rows if r["eval_set"] == eval_set]
        sized = [r for r in mine if r["size"] is not None]
        sizes = sorted({r["size"] for r in sized}, key=_size_key)
        numeric = bool(sizes) and all(size_value(s) is not None for s in sizes)
        pos = {s: (size_value(s) if numeric else i) for i, s in enumerate(sizes)}
        # one colour per series across both kinds, so a baseline never shares a line's colour
        colour = {g: f"C{i % 10}" for i, g in enumerate(sorted({r["group"] for r in mine}))}
        for group in sorted({r["group"] for r in sized}):
            pts = sorted((r for r in sized if r["group"] == group),
                         key=lambda r: _size_key(r["size"]))
            ax.errorbar([pos[r["size"]] for r in pts], [100 * r["mean"] for r in pts],
                        yerr=[100 * r["std"] for r in pts], marker="o", capsize=4,
                        label=group, color=colour[group])
        for r in mine:
            if r["size"] is not None:
                continue
            ax.axhline(100 * r["mean"], linestyle="--", label=r["group"],
                       color=colour[r["group"]])
            if r["std"] > 0:
                ax.axhspan(100 * (r["mean"] - r["std"]), 100 * (r["mean"] + r["std"]),
                           color=colour[r["group"]], alpha=0.15)
        if numeric:
            ax.set_xscale("log")
            ax.set_xticks([pos[s] for s in sizes], [str(s) for s in sizes])
        elif sizes:
            ax.set_xticks(list(range(len(sizes))), [str(s) for s in sizes])
        metric = mine[0]["metric"] if mine else "accuracy"
        ax.set_title(eval_set)
        ax.set_xlabel("training set size")
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")  # the temporary name does not end in .png
    plt.close(fig)
    return out_png


def write_report(path: str | Path, rows: Sequence[dict[str, Any]], png: Path | None,
                 results: Sequence[dict[str, Any]]) -> None:
    """A Markdown report: the plot (embedded by relative path), the table, each run's CI."""
    path = Path(path)
    parts = ["# Evaluation report", ""]
    if png is not None:
        rel = png.relative_to(path.parent) if png.parent == path.parent else png
        parts += [f"![metric vs training set size]({rel})", ""]
    parts += ["## Mean ± std per model series and size", "", markdown_table(rows),
              "## Individual runs", "",
              "| model | eval set | metric | value | n | CI |", "|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["eval_set"], r["model"])):
        metric, val = metric_of(r)
        ci = (f"{100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f}"
              if "ci_low" in r else "-")
        parts.append(f"| {r['model']} | {r['eval_set']} | {metric} | {100 * val:.2f} | "
                     f"{r.get('n', '-')} | {ci} |")
    atomic_write_text(path, "\n".join(parts) + "\n")


def sweep_trials(inputs: Iterable[str | Path]) -> dict[str, dict[str, Any]]:
    """Finished sweep trials found among ``inputs`` (a run dir with ``sweep/results.jsonl``
    or a sweep folder), keyed by their adapter folder (resolved)."""
    out: dict[str, dict[str, Any]] = {}
    for p in inputs:
        p = Path(p)
        for table in (p / "sweep" / "results.jsonl", p / "results.jsonl"):
            if not table.is_file():
                continue
            for line in table.read_text(encoding="utf-8").splitlines():
                row = json.loads(line) if line.strip() else {}
                if row.get("status") != "finished":
                    continue
                # the recorded folder and where it is now (RUN_DIR/train/TRIAL/adapter)
                for a in (row.get("adapter"),
                          table.parent.parent / "train" / str(row.get("trial")) / "adapter"):
                    if a:
                        out[str(Path(a).resolve())] = row
    return out


def annotate_from_sweep(results: list[dict[str, Any]], trials: dict[str, dict[str, Any]],
                        group: str = "craft") -> int:
    """Fill size / seed / series of results whose adapter is a sweep trial's (models listed
    by hand without them). Returns how many results were annotated."""
    n = 0
    for r in results:
        adapter = r.get("adapter")
        row = trials.get(str(Path(adapter).resolve())) if adapter else None
        if row is None or r.get("size") is not None:
            continue
        r["size"] = str(row["size"])
        r["seed"] = r.get("seed") if r.get("seed") is not None else row.get("seed")
        if r.get("group") in (None, "adapter"):
            r["group"] = group
        n += 1
    return n


def run_aggregate(inputs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Aggregate result files/folders into ``out_dir`` (table, results.json, plot, report).

    When an input is a run dir (or a sweep folder) holding a sweep's ``results.jsonl``,
    results of that sweep's adapters get their size and seed from it.
    """
    from craft_ray.runtime import atomic_write_json

    results = load_results(inputs)
    annotated = annotate_from_sweep(results, sweep_trials(inputs))
    if not results:
        raise FileNotFoundError(f"no results.json found under {list(map(str, inputs))}")
    out_dir = Path(out_dir)
    rows = aggregate(results)
    atomic_write_json(out_dir / "aggregate.json", rows)
    atomic_write_text(out_dir / "results.md", markdown_table(rows))
    png = plot_vs_size(rows, out_dir / "accuracy.png")
    write_report(out_dir / "report.md", rows, png, results)
    return {"results": len(results), "rows": len(rows), "out": str(out_dir),
            "plot": str(png), "annotated_from_sweep": annotated}
