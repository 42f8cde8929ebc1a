"""Training data: tokenising prompt/completion pairs, labels, batches, train/eval splits."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from craft_ray.config import ConfigError
from craft_ray.stages.train.config import TrainConfig

IGNORE_INDEX = -100

ROW_COLUMN = "__source_row__"  # row number in the source dataset, carried through tokenising

# --- formatting and tokenisation (plain functions) -----------------------------------------


def resolve_train_template(cfg: TrainConfig, tokenizer: Any) -> str:
    """'chat' or 'plain' for this tokenizer; error if chat is asked of a template-less one."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if cfg.template == "chat" and not has_chat:
        raise ConfigError(f"train.template=chat but the tokenizer of {cfg.base_model} has no "
                          "chat template (a base model?); set train.template=plain")
    if cfg.template == "auto":
        return "chat" if has_chat else "plain"
    return cfg.template


def make_labels(input_ids: Sequence[int], prompt_len: int, loss_on: str) -> list[int]:
    """Labels for one example: prompt tokens are IGNORE_INDEX unless ``loss_on='full'``."""
    labels = list(input_ids)
    if loss_on == "completion":
        labels[:prompt_len] = [IGNORE_INDEX] * min(prompt_len, len(labels))
    return labels


def collate_batch(input_ids: Sequence[Sequence[int]], prompt_lens: Sequence[int], pad_id: int,
                  loss_on: str = "completion") -> dict[str, Any]:
    """Dynamic padding to the longest example of the batch (right padding).

    Returns torch tensors ``input_ids``, ``attention_mask`` and ``labels``; padded positions
    have attention 0 and label IGNORE_INDEX. Padding is torch's ``pad_sequence`` (the batch
    holds token ids only, so no tokenizer is needed on this path).
    """
    import torch
    from torch.nn.utils.rnn import pad_sequence

    rows = [torch.from_numpy(np.array(row, dtype=np.int64)) for row in input_ids]  # copies
    labels = [torch.as_tensor(make_labels(list(map(int, row)), int(plen), loss_on),
                              dtype=torch.long) for row, plen in zip(input_ids, prompt_lens)]
    return {
        "input_ids": pad_sequence(rows, batch_first=True, padding_value=pad_id),
        "attention_mask": pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows],
                                       batch_first=True, padding_value=0),
        "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
    }


def to_plain(v: Any) -> Any:
    """numpy / pandas cell -> plain Python (tasks expect lists, str, int)."""
    if isinstance(v, np.ndarray):
        return [to_plain(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def get_training_pair_fn(task: str | dict[str, Any] | None, prompt_field: str,
                         completion_field: str) -> Callable[[dict[str, Any]], tuple[str, str]]:
    """``record -> (prompt, completion)``: the task's training_pair, or two columns."""
    if task is not None:
        from craft_ray.tasks.registry import get_task

        return get_task(task).training_pair

    def pair(record: dict[str, Any]) -> tuple[str, str]:
        missing = [f for f in (prompt_field, completion_field) if f not in record]
        if missing:
            raise KeyError(f"row has no column(s) {missing}; set train.task or "
                           "train.prompt_field / train.completion_field")
        return str(record[prompt_field]), str(record[completion_field])

    return pair


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    """Token-length statistics printed before training."""
    if len(lengths) == 0:
        return {"count": 0}
    q = np.percentile(lengths, [50, 90, 95, 99])
    return {"count": int(len(lengths)), "mean": round(float(lengths.mean()), 1),
            "min": int(lengths.min()), "p50": float(q[0]), "p90": float(q[1]),
            "p95": float(q[2]), "p99": float(q[3]), "max": int(lengths.max())}


def choose_max_length(cfg: TrainConfig, lengths: np.ndarray) -> int | None:
    """``max_length`` from the config, or the configured percentile of ``lengths``."""
    if cfg.max_length is not None:
        return cfg.max_length
    if cfg.max_length_percentile is not None and len(lengths):
        return int(math.ceil(float(np.percentile(lengths, cfg.max_length_percentile))))
    return None


def apply_max_length(input_ids: list[int], prompt_len: int, max_length: int | None,
                     overlong: str) -> tuple[list[int], int] | None:
    """Truncate (keeping the prompt boundary) or drop (None) an example over max_length."""
    if max_length is None or len(input_ids) <= max_length:
        return input_ids, prompt_len
    if overlong == "drop":
        return None
    return input_ids[:max_length], min(prompt_len, max_length)
