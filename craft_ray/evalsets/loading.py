"""Loaders for the evaluation sets, each read in its original schema.

Every loader turns one source row into an item or an :class:`EvalReject` with a reason, so one
bad row is reported and skipped instead of stopping an evaluation. Multiple-choice sets give an
:class:`EvalItem` (question, choice texts, the letters A, B, ... in order, the gold letter);
generative sets give a :class:`GenItem` (a record of the CRAFT task the set evaluates, whose
``Task.training_pair`` is the prompt and the reference output).

Sets and where they come from:

=================  =====================================  ==========================  =====
name               source                                  schema                      opts
=================  =====================================  ==========================  =====
``commonsenseqa``  local ``*_rand_split.jsonl``            answerKey, question.stem,   5
                                                           question.choices[label,text]
``medqa``          local ``US/4_options/*.jsonl``          question, options{A..D},    4
                                                           answer_idx
``scienceqa_bio``  hub ``derek-thomas/ScienceQA`` test,    question, choices[],        2-5
                   ``topic == "biology"`` (CRAFT bioqa)    answer (index), topic
``medmcqa``        hub ``openlifescienceai/medmcqa``       question, opa..opd, cop     4
                   validation (CRAFT medqa)
``csqa2``          hub ``tasksource/commonsense_qa_2.0``   question, answer yes/no     2
                   validation (CRAFT csqa)
=================  =====================================  ==========================  =====

Generative sets (the reference is the task's completion text):

==================  ====================================  ===========================  =========
name                source                                schema                       task
==================  ====================================  ===========================  =========
``cnn_dailymail``   hub ``abisee/cnn_dailymail`` 3.0.0    article, highlights, id      summari-
                    test (CRAFT: 1000 items, see                                       zation
                    ``craft_subset``)
``recipenlg``       local RecipeNLG release               title, ingredients,          recipegen
                    (``RecipeNLG_dataset.csv`` or a       directions (lists, or JSON
                    .jsonl/.parquet of the hub's          list strings in the CSV),
                    ``recipe_nlg`` columns)               link, source, NER
==================  ====================================  ===========================  =========

CRAFT evaluated summarization on 1000 CNN/DailyMail test articles (``run_eval.py``: sklearn
``train_test_split(range(n), test_size=1000, random_state=1234)``, prompt
``"Please summarize the text below:\n{article}"``, reference ``highlights``) and recipe
generation on 1000 held-out RecipeNLG recipes (its ``datasets/recipenlg/test.jsonl`` with
``instruction``/``ingredients``/``steps``; that file is not published, so rows in that form
are read as they are and RecipeNLG rows get an instruction from ``instruction_template``).

A hub set can also be read from a local copy (``path``: a .jsonl, .json or .parquet file with
the hub's columns), which is what the tests and air-gapped clusters use.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from craft_ray.evalsets.base import (
    CRAFT_SUBSET,
    GENERATIVE_SETS,
    HUB_CONFIGS,
    HUB_DEFAULTS,
    EvalItem,
    EvalReject,
    EvalSetConfig,
    EvalSetError,
    RowError,
)
from craft_ray.evalsets.parsers import PARSERS, row_filter

logger = logging.getLogger(__name__)


# --- reading ---------------------------------------------------------------------------------


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(row number, object or None when the line is not a JSON object, raw line)."""
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield i, None, line
                continue
            yield i, obj if isinstance(obj, dict) else None, line


def _iter_local(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {"data": [...]} or {id: row}
            data = data.get("data", list(data.values()))
        for i, obj in enumerate(data):
            yield i, obj if isinstance(obj, dict) else None, json.dumps(obj)[:2000]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, obj in enumerate(pq.read_table(path).to_pylist()):
            yield i, obj, ""
    elif suffix == ".csv":  # RecipeNLG's release: an unnamed index column, lists as JSON
        import csv

        with path.open("r", encoding="utf-8", errors="replace", newline="") as fh:
            for i, rec in enumerate(csv.DictReader(fh)):
                yield i, dict(rec), ""
    else:
        raise EvalSetError(f"eval file {path}: unknown format {suffix!r} (use .jsonl, .json, "
                           ".parquet or .csv in the set's original schema)")


def _iter_hub(hub_id: str, split: str, config: str | None = None
              ) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a hard dependency
        raise EvalSetError("loading a hub set needs `pip install datasets`") from exc
    try:
        kwargs = {"name": config} if config else {}
        ds = datasets.load_dataset(hub_id, split=split, **kwargs)
    except Exception as exc:  # network, auth, unknown split: all stop before work starts
        raise EvalSetError(
            f"cannot load hub dataset {hub_id!r} split {split!r}: {exc}. Without hub access, "
            "download it elsewhere and set the eval set's `path` to a local .jsonl/.parquet "
            "copy with the same columns."
        ) from exc
    if "image" in ds.column_names:  # never decode images: only the text is evaluated
        ds = ds.remove_columns(["image"])
    for i, obj in enumerate(ds):
        yield i, dict(obj), ""


def _raw(obj: dict[str, Any] | None, line: str) -> str:
    if line:
        return line.rstrip("\n")[:2000]
    return json.dumps(obj, default=str)[:2000]


def parse_rows(name: str, rows: Iterable[tuple[int, dict[str, Any] | None, str]],
               source: str, instruction: str | None = None,
               parser: Callable[..., Any] | None = None
               ) -> tuple[list[Any], list[EvalReject]]:
    """Parse ``(row, obj, raw)`` triples with the set's parser; bad rows become rejects.

    Items are :class:`EvalItem` for multiple-choice sets, :class:`GenItem` for generative ones
    (``instruction`` is their instruction / template). ``parser``: a custom set's own.
    """
    parser = parser or PARSERS[name]
    if name in GENERATIVE_SETS:
        parser = functools.partial(parser, instruction=instruction)
    keep = row_filter(name)
    items: list[Any] = []
    rejects: list[EvalReject] = []
    seen: set[str] = set()
    for i, obj, line in rows:
        if obj is None:
            rejects.append(EvalReject(source, i, "malformed_json", "not a JSON object",
                                      line[:2000]))
            continue
        if keep is not None and not keep(obj):
            continue
        try:
            item = parser(obj, i)
        except RowError as err:
            rejects.append(EvalReject(source, i, err.reason, err.detail, _raw(obj, line)))
            continue
        if item.id in seen:
            rejects.append(EvalReject(source, i, "duplicate_id", f"id {item.id!r} seen before",
                                      _raw(obj, line)))
            continue
        seen.add(item.id)
        items.append(item)
    return items, rejects


def craft_subset_rows(n_rows: int, size: int, seed: int) -> list[int]:
    """Row indices of CRAFT's evaluation subset, in CRAFT's order.

    CRAFT took ``train_test_split(range(n), test_size=size, random_state=seed)[1]``; sklearn's
    ShuffleSplit draws ``RandomState(seed).permutation(n)`` and the test part is its first
    ``size`` entries (all rows when there are fewer).
    """
    import numpy as np

    return [int(i) for i in np.random.RandomState(seed).permutation(n_rows)[:size]]


def _local_file(cfg: EvalSetConfig) -> Path:
    """The set's file, downloaded first when ``path`` is an object-store URI."""
    from craft_ray.runtime import storage

    if not storage.is_uri(cfg.path or ""):
        return Path(cfg.path or "")
    if not storage.is_file(cfg.path or ""):
        raise EvalSetError(f"eval set {cfg.display_name!r}: {storage.redact(cfg.path or '')} "
                           "does not exist (fix `path`)")
    return storage.local_copy(cfg.path or "")


def load_eval_set(cfg: EvalSetConfig, base_dir: str | Path | None = None
                  ) -> tuple[list[Any], list[EvalReject]]:
    """Load one evaluation set: its items (shuffled/limited as configured) and its rejects.

    Raises :class:`EvalSetError` when the set cannot be read at all (missing file, hub
    unreachable); a bad row is a reject, never an error.
    """
    if cfg.path:
        path = _local_file(cfg)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise EvalSetError(f"eval set {cfg.display_name!r}: file {path} does not exist "
                               "(fix `path`, or drop it to load a hub set from the hub)")
        rows = _iter_local(path)
        source = str(path)
    else:
        hub_id, split = HUB_DEFAULTS[cfg.name]
        hub_id = cfg.hub_id or hub_id
        split = cfg.split or split
        config = cfg.hub_config or HUB_CONFIGS.get(cfg.name)
        rows = _iter_hub(hub_id, split, config)
        source = f"{hub_id}{'/' + config if config else ''}:{split}"
    if cfg.craft_subset:
        # the subset indexes the source rows (before parsing), as CRAFT's select() did
        all_rows = list(rows)
        size, seed = CRAFT_SUBSET[cfg.name]
        rows = iter([all_rows[i] for i in craft_subset_rows(len(all_rows), size, seed)])
    custom = None
    if cfg.fields is not None:
        from craft_ray.evalsets.custom_rows import custom_parser

        custom = custom_parser(cfg.fields)
    items, rejects = parse_rows(cfg.name, rows, source, cfg.instruction, custom)
    if cfg.shuffle_seed is not None:
        random.Random(cfg.shuffle_seed).shuffle(items)
    if cfg.limit is not None:
        items = items[: cfg.limit]
    if rejects:
        logger.warning("eval set %s: %d rows rejected (%s)", cfg.display_name, len(rejects),
                       dict(Counter(r.reason for r in rejects)))
    if not items:
        raise EvalSetError(f"eval set {cfg.display_name!r} ({source}) has no usable items; "
                           f"rejects by reason: {dict(Counter(r.reason for r in rejects))}")
    logger.info("eval set %s: %d items from %s", cfg.display_name, len(items), source)
    return items, rejects


def gold_distribution(items: Iterable[EvalItem]) -> dict[str, int]:
    """How many items have each gold letter (the accuracy of always answering that letter)."""
    return dict(sorted(Counter(it.gold for it in items).items()))
