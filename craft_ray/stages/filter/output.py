"""Output of the filter stage: the train/eval datasets and their dataset card."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from craft_ray.runtime import storage
from craft_ray.stages.filter.config import FilterConfig, read_stage_config
from craft_ray.stages.filter.decontam import NgramIndex, overlap_summary
from craft_ray.stages.filter.rows import PROVENANCE_COLUMNS, priority_batch

# --- final datasets -----------------------------------------------------------------------


def _fewshot_rows(task: Any, shots: Sequence[Any], records: Sequence[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    return [{**rec, "is_few_shot": 1, "sample_id": f"fewshot:{s.id}", "task": task.name,
             "doc_id": None, "corpus": None, "fewshot_ids": [s.id]}
            for s, rec in zip(shots, records)]


def output_columns(task: Any, available: Sequence[str]) -> list[str]:
    """Columns of a final dataset: record fields, is_few_shot, provenance, judge scores."""
    judge = [c for c in available if c.startswith("judge_")]
    return [*task.record_fields, "is_few_shot",
            *[c for c in PROVENANCE_COLUMNS if c in available or c == "sample_id"], *judge]


def select_nested(table: Any, sizes: Mapping[str, int], n_fewshots: int
                  ) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Generated rows per size (a prefix of the priority-sorted table), and the skipped sizes.

    Nesting holds because every size is a prefix of the same order.
    """
    available = table.num_rows
    take, skipped = {}, {}
    for name, total in sizes.items():
        need = total - n_fewshots
        if need <= available:
            take[name] = need
        else:
            skipped[name] = {"size": total, "needed_generated": need, "available": available}
    return take, skipped


def build_datasets(ds: Any, task: Any, shots: Sequence[Any], fs_records: Sequence[dict],
                   cfg: FilterConfig, stage_path: str, run_dir: str,
                   steps: list[dict[str, Any]], eval_texts: dict[str, list[str]],
                   empty_schema: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write every size that can be built; returns (built info, skipped sizes)."""
    import pyarrow as pa

    dcfg = cfg.datasets
    n_fs = len(shots) if dcfg.include_fewshots else 0
    need_max = max(dcfg.sizes.values()) - n_fs
    ranked = ds.map_batches(priority_batch, batch_format="pyarrow",
                            fn_kwargs={"seed": dcfg.seed}).sort("_priority")
    batches = list(_arrow_batches(ranked.limit(max(need_max, 0))))
    if batches:
        table = pa.concat_tables(batches)
    else:  # no survivor: an empty table of the input's columns (+ judge scores)
        table = empty_schema.empty_table()
    cols = output_columns(task, table.column_names)
    gen = table.append_column("is_few_shot", pa.array([0] * table.num_rows, pa.int64()))
    gen = gen.select([c for c in cols if c in gen.column_names])
    fs_rows = _fewshot_rows(task, shots, fs_records) if dcfg.include_fewshots else []
    fs_table = pa.Table.from_pylist([{c: r.get(c) for c in gen.column_names} for r in fs_rows],
                                    schema=gen.schema) if fs_rows else None
    take, skipped = select_nested(gen, dcfg.sizes, n_fs)
    out_root = storage.join(stage_path, "datasets")
    built: dict[str, Any] = {}
    for name in sorted(take, key=lambda k: dcfg.sizes[k]):
        part = gen.slice(0, take[name])
        if fs_table is not None:
            part = pa.concat_tables([part, fs_table])
        info = write_dataset(part, storage.join(out_root, name), name, task, cfg, run_dir, steps,
                             eval_texts)
        built[name] = info
    return built, skipped


def _arrow_batches(ds: Any) -> Any:
    for b in ds.iter_batches(batch_format="pyarrow", batch_size=65_536):
        yield b.drop_columns(["_priority"]) if "_priority" in b.column_names else b


def write_dataset(table: Any, out: str, name: str, task: Any, cfg: FilterConfig,
                  run_dir: str, steps: list[dict[str, Any]],
                  eval_texts: dict[str, list[str]]) -> dict[str, Any]:
    """One size: hf/ (save_to_disk), data.parquet, data.jsonl, README.md; written to a
    temporary folder and renamed into place (uploaded to an object store), so a local size
    folder is never half-written; on an object store the stage's _SUCCESS, written after,
    tells it is complete."""
    import datasets
    import pyarrow.parquet as pq

    decontam = {}
    if eval_texts:
        texts = [task.sample_text(r) for r in table.select(task.record_fields).to_pylist()]
        dc = cfg.decontamination
        decontam = {
            ename: {str(n): overlap_summary(NgramIndex(etexts, n).hits(texts,
                                                                       dc.max_hits_per_row),
                                            len(etexts))
                    for n in sorted({dc.ngram, *dc.report_ngrams})}
            for ename, etexts in eval_texts.items()}
    info = {"rows": table.num_rows,
            "generated": int(sum(1 for x in table.column("is_few_shot").to_pylist() if not x)),
            "few_shots": int(sum(1 for x in table.column("is_few_shot").to_pylist() if x)),
            "path": storage.redact(out), "decontamination": decontam}
    with storage.write_once(out) as tmp:
        tmp.mkdir(parents=True)
        datasets.Dataset(table).save_to_disk(str(tmp / "hf"))
        pq.write_table(table, tmp / "data.parquet")
        with (tmp / "data.jsonl").open("w", encoding="utf-8") as fh:
            for row in table.to_pylist():
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "README.md").write_text(dataset_card(table, name, task, cfg, run_dir, steps, info),
                                       encoding="utf-8")
        storage.remove(out)  # a rename does not replace a full folder
    return info


def _yaml_section(run_dir: str | Path, stage: str, key: str) -> str | None:
    data = read_stage_config(run_dir, stage)
    if not data:
        return None
    section = data.get(key, data)
    return yaml.safe_dump(section, sort_keys=False, allow_unicode=True).strip()


def dataset_card(table: Any, name: str, task: Any, cfg: FilterConfig, run_dir: str | Path,
                 steps: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """README.md of one size: composition, corpora mix, retrieval, generator, filter counts."""
    return "\n".join([*_card_front_matter(task.name, name, table.num_rows),
                      *_card_composition(table, name, task, cfg, run_dir, info),
                      *_card_settings(run_dir),
                      *_card_filtering(steps, info),
                      *_card_usage(table, name, task)])


def _card_front_matter(task_name: str, name: str, n: int) -> list[str]:
    """The card's YAML header (what the Hugging Face Hub reads)."""
    size_cat = "n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K" \
        if n < 100_000 else "100K<n<1M"
    return [
        "---",
        f"pretty_name: craft-ray {task_name} {name}",
        "size_categories:",
        f"- {size_cat}",
        "tags:",
        "- synthetic",
        "- craft",
        "configs:",
        "- config_name: default",
        "  data_files: data.parquet",
        "---",
        "",
    ]


def _card_composition(table: Any, name: str, task: Any, cfg: FilterConfig, run_dir: str | Path,
                      info: dict[str, Any]) -> list[str]:
    """Title, composition and the corpora the generated samples come from."""
    n = table.num_rows
    corpora = Counter(c for c, f in zip(table.column("corpus").to_pylist()
                                        if "corpus" in table.column_names else [None] * n,
                                        table.column("is_few_shot").to_pylist()) if not f)
    mix = "\n".join(f"| {c or '(unknown)'} | {k} | {100.0 * k / max(1, info['generated']):.1f}% |"
                    for c, k in corpora.most_common()) or "| (none) | 0 | |"
    return [
        f"# {task.name} — size {name} ({n} samples)",
        "",
        "Built by `craft-ray filter` (CRAFT: Corpus Retrieval and Augmentation for "
        f"Fine-Tuning) in run directory `{run_dir}`.",
        "",
        "## Composition",
        "",
        f"- generated samples: {info['generated']}",
        f"- human few-shots (`is_few_shot=1`): {info['few_shots']}",
        f"- chosen with seed {cfg.datasets.seed} by hash priority; smaller sizes of this run "
        "are subsets of larger ones.",
        "",
        "## Corpora mix (generated samples)",
        "",
        "| corpus | samples | share |",
        "|---|---|---|",
        mix,
        "",
    ]


def _card_settings(run_dir: str | Path) -> list[str]:
    """The retrieve and generate settings of the run, as their resolved YAML."""
    retrieve = _yaml_section(run_dir, "retrieve", "retrieve")
    generate = _yaml_section(run_dir, "generate", "generate")
    return [
        "## Retrieval settings",
        "",
        f"```yaml\n{retrieve}\n```" if retrieve else "not available (no retrieve/config.yaml "
        "in the run directory)",
        "",
        "## Generator",
        "",
        f"```yaml\n{generate}\n```" if generate else "not available (no generate/config.yaml "
        "in the run directory)",
        "",
    ]


def _card_filtering(steps: list[dict[str, Any]], info: dict[str, Any]) -> list[str]:
    """Rows in/out of each filter step, and this dataset's overlap with the eval sets."""
    filt = "\n".join(f"| {s['step']} | {s['rows_in']} | {s['rows_out']} | {s['dropped']} |"
                     for s in steps) or "| (no steps) | | | |"
    dec = info.get("decontamination") or {}
    dec_rows = "\n".join(
        f"| {e} | {n_} | {v['samples_overlapping']} ({v['samples_overlapping_pct']}%) | "
        f"{v['eval_items_overlapping']} ({v['eval_items_overlapping_pct']}%) |"
        for e, per in dec.items() for n_, v in per.items())
    return [
        "## Filtering (all generated samples of the run)",
        "",
        "| step | in | out | dropped |",
        "|---|---|---|---|",
        filt,
        "",
        "## Decontamination (this dataset)",
        "",
        "| eval set | n-gram | samples overlapping | eval items overlapping |",
        "|---|---|---|---|",
        dec_rows or "| (no eval sets configured) | | | |",
        "",
    ]


def _card_usage(table: Any, name: str, task: Any) -> list[str]:
    """The columns and how to load the dataset."""
    return [
        "## Columns",
        "",
        f"`{'`, `'.join(table.column_names)}`: the task's record fields "
        f"({', '.join(task.record_fields)}), `is_few_shot`, and provenance.",
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_from_disk",
        f'ds = load_from_disk("{name}/hf")',
        "```",
        "",
    ]
