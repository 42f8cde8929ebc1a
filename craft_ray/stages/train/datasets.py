"""Training datasets on Ray Data: read, tokenise with the tokenizer loaded once per actor, split
train/eval.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import numpy as np

from craft_ray.config import ConfigError
from craft_ray.models.chat import encode_example
from craft_ray.models.tokenizers import load_train_tokenizer
from craft_ray.runtime import storage
from craft_ray.stages.train.config import TrainConfig, TrainStageConfig, dataset_path
from craft_ray.stages.train.data import (
    ROW_COLUMN,
    apply_max_length,
    choose_max_length,
    get_training_pair_fn,
    length_stats,
    to_plain,
)

logger = logging.getLogger(__name__)


class TokenizeRows:
    """Ray Data actor: task record -> (input_ids, prompt_len, length) or a reject reason."""

    def __init__(self, tokenizer_path: str, template: str, plain_template: str,
                 system_prompt: str | None, task: str | dict[str, Any] | None,
                 prompt_field: str, completion_field: str) -> None:
        self.tok = load_train_tokenizer(tokenizer_path)
        self.template = template
        self.plain_template = plain_template
        self.system_prompt = system_prompt
        self.pair = get_training_pair_fn(task, prompt_field, completion_field)

    def __call__(self, batch: Any) -> Any:
        import pandas as pd

        out: dict[str, list[Any]] = {"row": [], "input_ids": [], "prompt_len": [],
                                     "length": [], "reject_reason": []}
        for rec in batch.to_dict("records"):
            rec = {k: to_plain(v) for k, v in rec.items()}
            out["row"].append(int(rec.pop(ROW_COLUMN, -1)))
            ids: list[int] = []
            plen, reason = 0, ""
            try:
                prompt, completion = self.pair(rec)
                if not str(completion).strip():
                    reason = "empty_completion"
                else:
                    ids, plen = encode_example(
                        self.tok, prompt, completion, template=self.template,
                        plain_template=self.plain_template, system_prompt=self.system_prompt)
            except Exception as exc:  # a bad row is rejected, never kills the stage
                reason = f"format_error: {type(exc).__name__}: {exc}"[:300]
            out["input_ids"].append(ids)
            out["prompt_len"].append(plen)
            out["length"].append(len(ids))
            out["reject_reason"].append(reason)
        return pd.DataFrame(out)


def _load_hf(path: str, what: str) -> Any:
    """A ``datasets.save_to_disk`` folder (downloaded first from an object store)."""
    import datasets

    if not storage.exists(path):
        raise FileNotFoundError(
            f"{what} {storage.redact(path)} does not exist; run `craft-ray filter` first or "
            "set train.dataset_path / train.eval_path to a datasets.save_to_disk folder")
    try:
        ds = datasets.load_from_disk(str(storage.local_copy(path)))
    except Exception as exc:
        raise ConfigError(f"{what} {path} is not a datasets.save_to_disk folder: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError(f"{what} {path} is a DatasetDict without a 'train' split")
        ds = ds["train"]
    return ds


def split_rows(n: int, cfg: TrainConfig, has_eval_path: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row indices for training and for held-out eval (fixed ``data_seed``)."""
    rng = np.random.default_rng(cfg.data_seed)
    perm = rng.permutation(n)
    n_eval = 0
    if not has_eval_path and cfg.eval_fraction > 0:
        n_eval = min(max(1, int(round(cfg.eval_fraction * n))), n - 1)
    eval_idx, train_idx = perm[:n_eval], perm[n_eval:]
    if cfg.max_train_samples is not None and len(train_idx) > cfg.max_train_samples:
        train_idx = train_idx[: cfg.max_train_samples]
    return np.sort(train_idx), np.sort(eval_idx)


def tokenize_dataset(table: Any, cfg: TrainConfig, template: str) -> Any:
    """Lazy Ray Data plan: an Arrow table of task records -> tokenised rows.

    The table enters as blocks of ``tokenize_batch_size`` rows (no shuffle operator, whose
    1-CPU tasks could starve next to running Train workers in a sweep).
    """
    import ray.data

    if ROW_COLUMN not in table.column_names:
        import pyarrow as pa

        table = table.append_column(ROW_COLUMN, pa.array(range(table.num_rows), pa.int64()))
    step = cfg.tokenize_batch_size
    blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)]
    return ray.data.from_arrow(blocks).map_batches(
        TokenizeRows, batch_size=step, batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.data_num_cpus,
        fn_constructor_kwargs={
            "tokenizer_path": cfg.base_model, "template": template,
            "plain_template": cfg.plain_template, "system_prompt": cfg.system_prompt,
            "task": cfg.task, "prompt_field": cfg.prompt_field,
            "completion_field": cfg.completion_field})


def _finalise_rows(batch: Any, max_length: int | None, overlong: str) -> Any:
    """Ray Data UDF: apply max_length, keep only good rows, keep the training columns."""
    import pandas as pd

    ids, plens, lens = [], [], []
    for row_ids, plen, reason in zip(batch["input_ids"], batch["prompt_len"],
                                     batch["reject_reason"]):
        if reason:
            continue
        kept = apply_max_length(list(map(int, row_ids)), int(plen), max_length, overlong)
        if kept is None:
            continue
        ids.append(kept[0])
        plens.append(kept[1])
        lens.append(len(kept[0]))
    return pd.DataFrame({"input_ids": ids, "prompt_len": plens, "length": lens})


def prepare_datasets(stage_cfg: TrainStageConfig, trial_dir: str, template: str
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load, split, tokenise; write length stats and rejects; return Ray datasets + stats."""
    import pyarrow as pa

    cfg = stage_cfg.train
    src = dataset_path(stage_cfg)
    hf = _load_hf(src, "train dataset")
    if len(hf) < 2:
        raise ConfigError(f"train dataset {src} has {len(hf)} rows; need at least 2")
    train_idx, eval_idx = split_rows(len(hf), cfg, cfg.eval_path is not None)
    table = hf.select(train_idx).flatten_indices().data.table  # row i = source train_idx[i]
    eval_table = None
    if cfg.eval_path:
        eval_table = _load_hf(cfg.eval_path, "eval dataset").flatten_indices().data.table
    elif len(eval_idx):
        eval_table = hf.select(eval_idx).flatten_indices().data.table

    tok_train = tokenize_dataset(pa.table(table), cfg, template).materialize()
    meta = tok_train.select_columns(["row", "length", "reject_reason"]).to_pandas()
    bad = meta["reject_reason"] != ""
    good_lengths = meta.loc[~bad, "length"].to_numpy()
    if len(good_lengths) == 0:
        raise ConfigError(f"train dataset {src}: every row was rejected; first reason: "
                          f"{meta['reject_reason'].iloc[0]}")
    max_length = choose_max_length(cfg, good_lengths)
    over = int((good_lengths > max_length).sum()) if max_length else 0
    stats = {"rows_in": int(len(hf)), "train_rows_selected": int(len(train_idx)),
             "eval_rows": 0, "lengths": length_stats(good_lengths), "max_length": max_length,
             "overlong": over, "overlong_action": cfg.overlong,
             "rejects": dict(Counter(r.split(":")[0] for r in meta.loc[bad, "reject_reason"]))}
    logger.info("train: sequence lengths (tokens) %s; max_length=%s, %d over it (%s)",
                json.dumps(stats["lengths"]), max_length, over, cfg.overlong)
    if bad.any():
        rej = meta.loc[bad, ["row", "reject_reason"]].reset_index(drop=True)
        rej["row"] = train_idx[rej["row"].to_numpy()]  # position in the source dataset
        storage.write_parquet(storage.join(trial_dir, "rejects.parquet"),
                              pa.Table.from_pandas(rej, preserve_index=False))
        logger.warning("train: %d rows rejected (%s); see %s", int(bad.sum()),
                       stats["rejects"], storage.join(trial_dir, "rejects.parquet"))
    datasets = {"train": tok_train.map_batches(
        _finalise_rows, batch_format="pandas", batch_size=None, num_cpus=cfg.data_num_cpus,
        fn_kwargs={"max_length": max_length, "overlong": cfg.overlong}).materialize()}
    stats["train_rows"] = datasets["train"].count()
    if eval_table is not None:
        datasets["eval"] = tokenize_dataset(pa.table(eval_table), cfg, template).map_batches(
            _finalise_rows, batch_format="pandas", batch_size=None, num_cpus=cfg.data_num_cpus,
            fn_kwargs={"max_length": max_length, "overlong": "truncate"}).materialize()
        stats["eval_rows"] = datasets["eval"].count()
    storage.write_json(storage.join(trial_dir, "length_stats.json"), stats)
    return datasets, stats
