"""``report.html``: one static page per run directory (opens from disk, no scripts, no network).

Sections, each shown when its stage has run: stage overview and throughput, corpus mix and
retrieval-score distribution, rejects by reason per stage, sample length histograms, training
loss curves per trial, evaluation table and accuracy-vs-size plot. Figures are matplotlib PNGs
inlined as data URIs, so the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from craft_ray.runtime import SUCCESS, atomic_write_text

logger = logging.getLogger(__name__)

STAGE_ORDER = ["embed", "retrieve", "generate", "filter", "train", "sweep", "evaluate"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#1d2330;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;
border-bottom:1px solid #d8dde6;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #d8dde6;padding:.3rem .6rem;text-align:left}
th{background:#f2f4f8} td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#137333;font-weight:600} .no{color:#b3261e;font-weight:600}
.muted{color:#667085} img{max-width:100%;border:1px solid #eef0f4;margin:.4rem 0}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1rem}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:,.3f}" if abs(x) < 1000 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return _esc(x)


def _table(headers: list[str], rows: Iterable[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = "".join(
            f'<td class="num">{_fmt(c)}</td>' if isinstance(c, int | float) else f"<td>{c}</td>"
            for c in r)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return ('<img alt="figure" src="data:image/png;base64,'
            + base64.b64encode(buf.getvalue()).decode() + '">')


def _fig(w: float = 6, h: float = 3.2) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(w, h))


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _read_parquet(p: Path, columns: list[str] | None = None) -> Any:
    import pyarrow.parquet as pq

    if not p.is_file():
        return None
    try:
        names = pq.ParquetFile(p).schema_arrow.names
        cols = [c for c in (columns or names) if c in names]
        return pq.read_table(p, columns=cols)
    except Exception:  # a broken file should not break the report
        logger.warning("report: cannot read %s", p)
        return None


def _stages_section(run: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    stats: dict[str, dict[str, Any]] = {}
    rows = []
    entries: list[tuple[str, Path]] = []
    for name in STAGE_ORDER:
        d = run / name
        if not d.is_dir():
            continue
        if name == "train" and not (d / "stats.json").is_file():
            # one folder (and one _SUCCESS) per trained adapter
            entries += [(f"train/{t.name}", t) for t in sorted(d.iterdir()) if t.is_dir()]
        else:
            entries.append((name, d))
    for name, d in entries:
        st = _read_json(d / "stats.json") or {}
        stats[name] = st
        done = (d / SUCCESS).is_file()
        rows.append([
            _esc(name),
            '<span class="ok">complete</span>' if done else '<span class="no">incomplete</span>',
            st.get("rows_in", ""), st.get("rows_out", ""), st.get("rejects_total", ""),
            st.get("seconds", ""), st.get("rows_per_s", ""),
        ])
    if not rows:
        return "<p class='muted'>No stage has run in this directory yet.</p>", stats
    return _table(["stage", "status", "rows in", "rows out", "rejects", "seconds", "rows/s"],
                  rows), stats


def _rejects_section(stats: dict[str, dict[str, Any]]) -> str:
    rows = []
    for stage, st in stats.items():
        for reason, n in sorted((st.get("rejects") or {}).items(), key=lambda kv: -kv[1]):
            if n:
                rows.append([_esc(stage), _esc(reason), n])
    if not rows:
        return "<p class='muted'>No rejects recorded.</p>"
    return _table(["stage", "reason", "rows"], rows)


def _retrieval_section(run: Path) -> str:
    t = _read_parquet(run / "retrieve" / "corpus_samples.parquet", ["corpus", "score"])
    if t is None or t.num_rows == 0:
        return "<p class='muted'>Retrieval has not run.</p>"
    from collections import Counter

    mix = Counter(t.column("corpus").to_pylist())
    total = sum(mix.values())
    table = _table(["corpus", "documents", "share"],
                   [[_esc(c), n, f"{n / total:.1%}"] for c, n in mix.most_common()])
    fig, ax = _fig()
    ax.hist(t.column("score").to_pylist(), bins=40, color="#3b6fd4")
    ax.set_xlabel("cosine similarity to the few-shots")
    ax.set_ylabel("documents")
    ax.set_title("Retrieval scores")
    return table + _png(fig)


def _lengths_section(run: Path) -> str:
    parts = []
    sources = [("generated clean samples", run / "generate" / "clean.parquet"),
               ("corpus samples (documents)", run / "retrieve" / "corpus_samples.parquet")]
    for title, p in sources:
        col = "sample_text" if "generate" in str(p) else "text"
        t = _read_parquet(p, [col])
        if t is None or t.num_rows == 0 or col not in t.column_names:
            continue
        lens = [len(x or "") for x in t.column(col).to_pylist()]
        fig, ax = _fig(5, 3)
        ax.hist(lens, bins=40, color="#6a9f3a")
        ax.set_xlabel("characters")
        ax.set_ylabel("rows")
        ax.set_title(f"Length of {title} (n={len(lens):,})")
        parts.append(_png(fig))
    sizes = []
    ds_root = run / "filter" / "datasets"
    if ds_root.is_dir():
        for d in sorted(ds_root.iterdir()):
            t = _read_parquet(d / "data.parquet", ["is_few_shot"])
            if t is not None:
                fs = sum(t.column("is_few_shot").to_pylist()) if "is_few_shot" in \
                    t.column_names else 0
                sizes.append([_esc(d.name), t.num_rows, fs])
    out = f"<div class='grid'>{''.join(parts)}</div>" if parts else ""
    if sizes:
        out += "<h3>Final datasets</h3>" + _table(["size", "rows", "of which few-shots"], sizes)
    return out or "<p class='muted'>No generated samples yet.</p>"


def _loss_section(run: Path) -> str:
    curves: list[tuple[str, list[float], list[float]]] = []
    for p in sorted(list(run.glob("train/**/metrics.jsonl")) +
                    list(run.glob("sweep/**/metrics.jsonl"))):
        steps, losses = [], []
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in rec and rec.get("loss") is not None:
                steps.append(rec.get("step", len(steps)))
                losses.append(float(rec["loss"]))
        if losses:
            curves.append((str(p.parent.relative_to(run)), steps, losses))
    if not curves:
        return "<p class='muted'>No training run yet.</p>"
    fig, ax = _fig(7, 3.6)
    for label, steps, losses in curves[:24]:
        ax.plot(steps, losses, label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7, loc="upper right")
    return _png(fig)


def _eval_section(run: Path) -> str:
    d = run / "evaluate"
    if not d.is_dir():
        return "<p class='muted'>No evaluation yet.</p>"
    rows = []
    for p in sorted(d.rglob("results*.json")):
        res = _read_json(p) or {}
        metric = res.get("metric") if isinstance(res, dict) else None
        if metric is None and isinstance(res, dict):
            metric = next((m for m in ("accuracy", "win_rate", "rougeL_f1") if m in res), None)
        if metric is not None and metric in res:
            rows.append([_esc(p.parent.relative_to(d) if p.parent != d else p.stem),
                         _esc(res.get("model", res.get("name", ""))),
                         _esc(res.get("eval_set", res.get("dataset", ""))),
                         _esc(metric), res[metric], res.get("n", "")])
    out = _table(["run", "model", "eval set", "metric", "value", "n"], rows) if rows else ""
    for png in sorted(d.rglob("*.png")):
        out += ('<img alt="evaluation plot" src="data:image/png;base64,'
                + base64.b64encode(png.read_bytes()).decode() + '">')
    return out or "<p class='muted'>No evaluation results yet.</p>"


def build_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html`` from whatever stages have run; returns its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    overview, stats = _stages_section(run)
    sections = [
        ("Stages and throughput", overview),
        ("Corpus mix and retrieval scores", _retrieval_section(run)),
        ("Rejects by reason", _rejects_section(stats)),
        ("Sample lengths", _lengths_section(run)),
        ("Training loss", _loss_section(run)),
        ("Evaluation", _eval_section(run)),
    ]
    body = "".join(f"<h2>{_esc(t)}</h2>{c}" for t, c in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>craft_ray run "
            f"{_esc(run.name)}</title><style>{CSS}</style></head><body>"
            f"<h1>craft_ray run report</h1><p class='muted'>{_esc(run.resolve())}</p>"
            f"{body}</body></html>")
    out = run / "report.html"
    atomic_write_text(out, page)
    return out
