"""The training step of the LoRA fine-tune, in plain torch: run by each Ray Train worker
(:mod:`craft_ray.stages.train.loop`), tested with torch.distributed. The loss of one optimizer
step is the mean over every label token of the global batch (all workers, all accumulation
micro-batches)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from craft_ray.stages.train.data import IGNORE_INDEX, collate_batch


def token_loss_sum(logits: Any, labels: Any) -> Any:
    """Sum of next-token cross-entropy over positions whose label is not IGNORE_INDEX."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                           shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def train_step(model: Any, micro_batches: Sequence[dict[str, Any]], optimizer: Any,
               scheduler: Any, *, device: Any, max_grad_norm: float | None = None,
               engine: Any = None) -> dict[str, float]:
    """One optimizer step over ``micro_batches`` (gradient accumulation), all ranks together.

    Each micro-batch's summed token loss is divided by the number of label tokens in the
    global batch (summed over micro-batches and ranks, one all-reduce), times the world size
    because DDP averages gradients over ranks. The gradient is therefore that of the mean
    token loss of the global batch, however the batch is split. With ``engine`` (DeepSpeed)
    the engine does backward/step (no extra division by its accumulation steps: the loss is
    already normalised) and it averages gradients over ranks like DDP; the last micro-batch
    is marked as the accumulation boundary, so a short last group of an epoch steps too.
    """
    import torch
    import torch.distributed as dist

    dist_on = dist_ready()
    world = dist.get_world_size() if dist_on else 1
    counts = torch.zeros(2, dtype=torch.float64)
    for mb in micro_batches:
        counts[0] += (mb["labels"][:, 1:] != IGNORE_INDEX).sum()
        counts[1] += mb["attention_mask"].sum()
    counts = _sum_over_ranks(counts, dist_on, device)
    n_label = max(float(counts[0]), 1.0)
    loss_sum = _accumulate(model, micro_batches, engine, device=device,
                           scale=world / n_label)
    grad_norm = _optimizer_step(model, optimizer, scheduler, engine, max_grad_norm)
    loss_sum = _sum_over_ranks(loss_sum, dist_on, device)
    return {"loss": float(loss_sum) / n_label, "label_tokens": float(counts[0]),
            "tokens": float(counts[1]), "grad_norm": grad_norm}


def _sum_over_ranks(t: Any, dist_on: bool, device: Any) -> Any:
    """``t`` (on CPU) summed over all ranks (an all-reduce on ``device``); ``t`` alone."""
    import torch.distributed as dist

    if not dist_on:
        return t
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def _accumulate(model: Any, micro_batches: Sequence[dict[str, Any]], engine: Any, *,
                device: Any, scale: float) -> Any:
    """Forward and backward of each micro-batch, its token loss sum times ``scale``; returns
    the unscaled loss sum of this rank (float64, CPU). DeepSpeed steps at the last one."""
    import torch

    loss_sum = torch.zeros((), dtype=torch.float64)
    n_mb = len(micro_batches)
    for i, mb in enumerate(micro_batches):
        last = i == n_mb - 1
        sync = contextlib.nullcontext()
        if engine is None and not last and hasattr(model, "no_sync"):
            sync = model.no_sync()  # DDP: all-reduce gradients once, on the last micro-batch
        with sync:
            out = (engine or model)(input_ids=mb["input_ids"].to(device),
                                    attention_mask=mb["attention_mask"].to(device))
            lsum = token_loss_sum(out.logits, mb["labels"].to(device))
            scaled = lsum * scale
            if engine is not None:
                engine.set_gradient_accumulation_boundary(last)
                engine.backward(scaled, scale_wrt_gas=False)
                engine.step()  # an optimizer step only at the boundary
            else:
                scaled.backward()
        loss_sum += lsum.detach().double().cpu()
    return loss_sum


def _optimizer_step(model: Any, optimizer: Any, scheduler: Any, engine: Any,
                    max_grad_norm: float | None) -> float:
    """Clip, step and zero the gradients (DeepSpeed has stepped already); the gradient norm
    (NaN when not clipped)."""
    import torch

    grad_norm = float("nan")
    if engine is not None:
        norm = engine.get_global_grad_norm()
        return float(norm) if norm is not None else grad_norm
    if max_grad_norm is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def iter_micro_batches(batches: Iterable[dict[str, Any]], pad_id: int, loss_on: str
                       ) -> Iterator[dict[str, Any]]:
    """Ray Data numpy batches (input_ids, prompt_len) -> padded torch micro-batches."""
    for b in batches:
        yield collate_batch(list(b["input_ids"]), list(b["prompt_len"]), pad_id, loss_on)


def group(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    """Consecutive groups of ``n`` (the last may be shorter)."""
    buf: list[Any] = []
    for it in items:
        buf.append(it)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf
