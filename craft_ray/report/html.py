"""``report.html``: one static page per run directory (opens from disk, no scripts, no network).

Sections, each shown when its stage has run: stage overview and throughput, corpus mix and
retrieval-score distribution, rejects by reason per stage, sample length histograms, training
loss curves per trial, evaluation table and accuracy-vs-size plot. Figures are matplotlib PNGs
inlined as data URIs, so the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from craft_ray.runtime import SUCCESS, atomic_write_text, storage

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


TEMPLATE = """<!doctype html><html><head><meta charset='utf-8'>
<title>craft_ray run {{ name }}</title><style>{{ css | safe }}</style></head><body>
<h1>craft_ray run report</h1><p class='muted'>{{ path }}</p>
{%- macro table(b) -%}
<table><tr>{% for h in b.headers %}<th>{{ h }}</th>{% endfor %}</tr>
{%- for r in b.rows %}<tr>
{%- for c in r -%}
{%- if c is status -%}
<td><span class="{{ c.css_class }}">{{ c.word }}</span></td>
{%- elif c is numeric -%}<td class="num">{{ c | fmt }}</td>
{%- else -%}<td>{{ c }}</td>{%- endif -%}
{%- endfor %}</tr>{% endfor %}</table>
{%- endmacro -%}
{%- macro block(b) -%}
{%- if b.kind == "table" -%}{{ table(b) }}
{%- elif b.kind == "image" -%}<img alt="{{ b.alt }}" src="{{ b.src }}">
{%- elif b.kind == "grid" -%}<div class='grid'>
{%- for i in b.images %}{{ block(i) }}{% endfor %}</div>
{%- elif b.kind == "heading" -%}<h3>{{ b.text }}</h3>
{%- elif b.kind == "pre" -%}<pre>{{ b.text }}</pre>
{%- else -%}<p class='muted'>{{ b.text }}</p>{%- endif -%}
{%- endmacro -%}
{% for s in sections %}<h2>{{ s.title }}</h2>{% for b in s.blocks %}{{ block(b) }}{% endfor %}
{% endfor %}</body></html>
"""

Block = dict[str, Any]


@dataclass(frozen=True)
class Status:
    """A stage's completion, shown as a coloured word in the overview table."""

    done: bool

    @property
    def word(self) -> str:
        return "complete" if self.done else "incomplete"

    @property
    def css_class(self) -> str:
        return "ok" if self.done else "no"


def _fmt(x: float | int) -> str:
    """Numbers as the report shows them: 3 decimals for floats (none past 1,000), grouped ints."""
    if isinstance(x, float):
        return f"{x:,.3f}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{x:,}"


def _table(headers: list[str], rows: Iterable[list[Any]]) -> Block:
    """A table block: numbers right-aligned and formatted, everything else escaped text."""
    return {"kind": "table", "headers": headers, "rows": [list(r) for r in rows]}


def _muted(text: str) -> list[Block]:
    return [{"kind": "muted", "text": text}]


def _image(src: str, alt: str = "figure") -> Block:
    return {"kind": "image", "src": src, "alt": alt}


def _png(fig: Any) -> Block:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return _image(_data_uri(buf.getvalue()))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def render_page(name: str, path: str, sections: list[tuple[str, list[Block]]]) -> str:
    """The whole page from section blocks, through jinja2 with autoescape on."""
    from jinja2 import Environment

    env = Environment(autoescape=True)
    env.tests["status"] = lambda x: isinstance(x, Status)
    env.tests["numeric"] = lambda x: isinstance(x, int | float)
    env.filters["fmt"] = _fmt
    return env.from_string(TEMPLATE).render(
        name=name, path=path, css=CSS,
        sections=[{"title": t, "blocks": b} for t, b in sections])


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


def _stages_section(run: Path) -> tuple[list[Block], dict[str, dict[str, Any]]]:
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
            name, Status(done),
            st.get("rows_in", ""), st.get("rows_out", ""), st.get("rejects_total", ""),
            st.get("seconds", ""), st.get("rows_per_s", ""),
        ])
    if not rows:
        return _muted("No stage has run in this directory yet."), stats
    return [_table(["stage", "status", "rows in", "rows out", "rejects", "seconds", "rows/s"],
                   rows)], stats


def _rejects_section(stats: dict[str, dict[str, Any]]) -> list[Block]:
    rows = []
    for stage, st in stats.items():
        for reason, n in sorted((st.get("rejects") or {}).items(), key=lambda kv: -kv[1]):
            if n:
                rows.append([stage, reason, n])
    if not rows:
        return _muted("No rejects recorded.")
    return [_table(["stage", "reason", "rows"], rows)]


def _retrieval_section(run: Path) -> list[Block]:
    t = _read_parquet(run / "retrieve" / "corpus_samples.parquet", ["corpus", "score"])
    if t is None or t.num_rows == 0:
        return _muted("Retrieval has not run.")
    from collections import Counter

    mix = Counter(t.column("corpus").to_pylist())
    total = sum(mix.values())
    table = _table(["corpus", "documents", "share"],
                   [[c, n, f"{n / total:.1%}"] for c, n in mix.most_common()])
    fig, ax = _fig()
    ax.hist(t.column("score").to_pylist(), bins=40, color="#3b6fd4")
    ax.set_xlabel("cosine similarity to the few-shots")
    ax.set_ylabel("documents")
    ax.set_title("Retrieval scores")
    return [table, _png(fig)]


def _lengths_section(run: Path) -> list[Block]:
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
                sizes.append([d.name, t.num_rows, fs])
    out: list[Block] = [{"kind": "grid", "images": parts}] if parts else []
    if sizes:
        out += [{"kind": "heading", "text": "Final datasets"},
                _table(["size", "rows", "of which few-shots"], sizes)]
    return out or _muted("No generated samples yet.")


def _loss_section(run: Path) -> list[Block]:
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
        return _muted("No training run yet.")
    fig, ax = _fig(7, 3.6)
    for label, steps, losses in curves[:24]:
        ax.plot(steps, losses, label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7, loc="upper right")
    return [_png(fig)]


def _eval_section(run: Path) -> list[Block]:
    d = run / "evaluate"
    if not d.is_dir():
        return _muted("No evaluation yet.")
    rows = []
    for p in sorted(d.rglob("results*.json")):
        res = _read_json(p) or {}
        metric = res.get("metric") if isinstance(res, dict) else None
        if metric is None and isinstance(res, dict):
            metric = next((m for m in ("accuracy", "win_rate", "rougeL_f1") if m in res), None)
        if metric is not None and metric in res:
            rows.append([str(p.parent.relative_to(d) if p.parent != d else p.stem),
                         str(res.get("model", res.get("name", ""))),
                         str(res.get("eval_set", res.get("dataset", ""))),
                         str(metric), res[metric], res.get("n", "")])
    out = [_table(["run", "model", "eval set", "metric", "value", "n"], rows)] if rows else []
    out += [_image(_data_uri(png.read_bytes()), "evaluation plot")
            for png in sorted(d.rglob("*.png"))]
    return out or _muted("No evaluation results yet.")


# --- samples per strategy (issue 17) ---
PROVENANCE_HIDDEN = {"sample_text", "prompt_hash", "retrieved_by", "variant"}


def _samples_section(run: Path, per_group: int = 3) -> list[Block]:
    """A few clean samples of each task / strategy (``task`` column), record fields as JSON."""
    t = _read_parquet(run / "generate" / "clean.parquet")
    if t is None or t.num_rows == 0:
        return _muted("No generated samples yet.")
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in t.to_pylist():
        groups.setdefault(str(row.get("task") or "samples"), []).append(row)
    out: list[Block] = []
    for name, rows in sorted(groups.items()):
        out.append({"kind": "heading", "text": f"{name} ({len(rows):,} clean)"})
        out += [{"kind": "pre", "text": json.dumps(
            {k: v for k, v in r.items() if k not in PROVENANCE_HIDDEN},
            ensure_ascii=False, indent=1, default=str)[:3000]} for r in rows[:per_group]]
    return out
# --- end samples per strategy ---


# What the report reads of a run on an object store: small files, not the store, checkpoints,
# adapters, HF datasets or intermediate Parquet folders (fnmatch patterns, relative to RUN_DIR).
REPORT_SUFFIXES = (".json", ".jsonl", ".yaml", ".png", ".parquet", SUCCESS)
REPORT_SKIPPED = ("embed/store/*", "*/ray/*", "sweep/tune/*", "*/adapter/*",
                  "*/adapter_partial/*", "generate/prompts/*", "generate/generations/*",
                  "filter/survivors/*", "filter/datasets/*/hf/*")


def _report_inputs(run_dir: str, local: Path) -> None:
    """Download the files the report reads from a run on an object store into ``local``."""
    import fnmatch

    base = run_dir.rstrip("/")
    for f in storage.list_files(base, recursive=True):
        rel = f[len(base) + 1:]
        if rel.endswith(REPORT_SUFFIXES) and not any(fnmatch.fnmatch(rel, p)
                                                     for p in REPORT_SKIPPED):
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            (local / rel).write_bytes(storage.read_bytes(f))


def build_report(run_dir: str | Path) -> Path | str:
    """Write ``RUN_DIR/report.html`` from whatever stages have run; returns where it is (a
    local path, or the URI of a run on an object store, whose small files are read from a
    temporary local copy)."""
    import tempfile

    if not storage.is_uri(run_dir):
        return _build_report(Path(run_dir)).resolve()
    if not storage.exists(run_dir):
        raise FileNotFoundError(f"run directory {storage.redact(run_dir)} does not exist")
    out = storage.join(run_dir, "report.html")
    with tempfile.TemporaryDirectory(prefix="craft_ray_report_") as tmp:
        local = Path(tmp) / storage.name(run_dir)
        local.mkdir()
        _report_inputs(str(run_dir), local)
        storage.upload(_build_report(local, storage.redact(run_dir)), out)
    return out


def _build_report(run: Path, shown: str | None = None) -> Path:
    """``run/report.html`` of a local run folder (``shown``: the run's name in the page)."""
    from craft_ray.report.examples import reject_examples_section, samples_section

    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    overview, stats = _stages_section(run)
    sections = [
        ("Stages and throughput", overview),
        ("Corpus mix and retrieval scores", _retrieval_section(run)),
        ("Samples beside their source documents", samples_section(run)),
        ("Rejects by reason", _rejects_section(stats)),
        ("One example of each reject reason", reject_examples_section(run)),
        ("Sample lengths", _lengths_section(run)),
        ("Samples", _samples_section(run)),
        ("Training loss", _loss_section(run)),
        ("Evaluation", _eval_section(run)),
    ]
    page = render_page(run.name, shown or str(run.resolve()), sections)
    out = run / "report.html"
    atomic_write_text(out, page)
    return out
