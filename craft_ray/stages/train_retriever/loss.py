"""Batches, the contrastive + distillation loss, and one optimizer step (plain torch).

Invariants (tested):

* The data order of an epoch and the negatives a query draws depend only on the seed, the
  epoch and the example's index, never on the number of workers; every worker knows the
  whole global batch of a step and encodes its slice ``[rank * b, (rank + 1) * b)``.
* Each worker all-gathers the embeddings of the global batch, puts its own (with gradients)
  in its slot, and computes the loss of the *whole* global batch; the loss is multiplied by
  the world size before backward because DDP averages gradients. The sum over ranks of the
  local gradients is the gradient of the global loss, so N workers x b queries and 1 worker
  x N*b queries make the same step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from craft_ray.stages.train_retriever.data import Example


@dataclass
class Group:
    """One query of a step: ``keys[0]`` is its positive, the rest its hard negatives."""

    query: str
    keys: list[str]
    teacher: list[float] | None = None  # teacher score per key (None: no distillation)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of an epoch (a seeded permutation)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    """Full global batches per epoch (a short last batch is dropped, as every worker must
    take an equal share)."""
    return n_examples // batch_size


def sample_group(ex: Example, num_negatives: int, rng: np.random.Generator,
                 select_positive: str = "random") -> Group:
    """One positive and up to ``num_negatives`` negatives (without replacement) of ``ex``."""
    pi = int(rng.integers(len(ex.pos))) if select_positive == "random" else 0
    k = min(num_negatives, len(ex.neg))
    ni = sorted(rng.choice(len(ex.neg), size=k, replace=False).tolist()) if k else []
    keys = [ex.pos[pi]] + [ex.neg[i] for i in ni]
    teacher = None
    if ex.teacher_scores is not None:
        s = ex.teacher_scores
        teacher = [s[pi]] + [s[len(ex.pos) + i] for i in ni]
    return Group(ex.query, keys, teacher)


def global_batch(examples: Sequence[Example], order: np.ndarray, step: int, batch_size: int,
                 seed: int, epoch: int, num_negatives: int, select_positive: str
                 ) -> list[Group]:
    """The groups of global step ``step`` of an epoch (same on every worker)."""
    idx = order[step * batch_size:(step + 1) * batch_size]
    return [sample_group(examples[i], num_negatives,
                         np.random.default_rng([seed, epoch, int(i)]), select_positive)
            for i in idx]


def batch_targets(groups: Sequence[Group]) -> dict[str, Any]:
    """Tensors describing the global batch: ``pos`` (Q,) index of each query's positive in
    the concatenated keys, ``own`` (Q, K) bool mask of each query's own group, ``teacher``
    (Q, K) teacher scores (NaN outside the group) and ``has_teacher`` (Q,) bool."""
    import torch

    sizes = [len(g.keys) for g in groups]
    n_keys = sum(sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    own = torch.zeros((len(groups), n_keys), dtype=torch.bool)
    teacher = torch.full((len(groups), n_keys), float("nan"))
    has = torch.zeros(len(groups), dtype=torch.bool)
    for i, (g, s) in enumerate(zip(groups, starts)):
        own[i, s:s + len(g.keys)] = True
        if g.teacher is not None:
            teacher[i, s:s + len(g.keys)] = torch.tensor(g.teacher, dtype=torch.float32)
            has[i] = True
    return {"pos": torch.as_tensor(starts, dtype=torch.long), "own": own, "teacher": teacher,
            "has_teacher": has}


def retrieval_loss(q: Any, k: Any, targets: dict[str, Any], *, temperature: float,
                   in_batch: bool = True, contrastive_weight: float = 1.0,
                   distill_weight: float = 0.0, teacher_temperature: float = 1.0
                   ) -> tuple[Any, dict[str, float]]:
    """InfoNCE over cosine scores / temperature (each query against every key of the batch,
    or its own group only) plus KL(teacher || student) over each query's own group.

    ``q`` (Q, d), ``k`` (K, d) are L2-normalised. Returns the loss and its parts (floats).
    """
    import torch
    import torch.nn.functional as F

    scores = (q.float() @ k.float().T) / temperature
    own = targets["own"].to(scores.device)
    parts: dict[str, float] = {}
    loss = scores.new_zeros(())
    if contrastive_weight > 0:
        logits = scores if in_batch else scores.masked_fill(~own, float("-inf"))
        ce = F.cross_entropy(logits, targets["pos"].to(scores.device))
        loss = loss + contrastive_weight * ce
        parts["contrastive"] = float(ce.detach())
    has = targets["has_teacher"].to(scores.device)
    if distill_weight > 0 and bool(has.any()):
        student = torch.log_softmax(scores.masked_fill(~own, float("-inf")), dim=-1)
        t = targets["teacher"].to(scores.device) / teacher_temperature
        t_logp = torch.log_softmax(t.masked_fill(~own, float("-inf")), dim=-1)
        # KL over own-group entries; zero outside (where both are -inf)
        kl = torch.where(own, t_logp.exp() * (t_logp - student), torch.zeros_like(student))
        kl = kl.sum(-1)[has].mean()
        loss = loss + distill_weight * kl
        parts["distill"] = float(kl.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts


def _dist() -> tuple[bool, int, int]:
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return on, (dist.get_world_size() if on else 1), (dist.get_rank() if on else 0)


def gather_with_grad(local: Any, sizes: Sequence[int], rank: int) -> Any:
    """Concatenate every rank's rows (rank order); this rank's rows keep their gradient.

    ``sizes``: rows per rank (known to all ranks); rows are padded to the largest for
    ``all_gather`` and the padding dropped.
    """
    import torch
    import torch.distributed as dist

    width = max(sizes)
    pad = torch.zeros((width - local.shape[0], *local.shape[1:]), dtype=local.dtype,
                      device=local.device)
    buf = torch.cat([local.detach(), pad])
    got = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(got, buf)
    return torch.cat([local if r == rank else got[r][:n] for r, n in enumerate(sizes)])


def encode(model: Any, tokenize: Callable[[list[str]], dict[str, Any]], texts: list[str],
           device: Any, autocast: Any = None) -> Any:
    """L2-normalised sentence embeddings of ``texts`` in one forward of ``model``."""
    import torch.nn.functional as F

    feats = {k: v.to(device) for k, v in tokenize(texts).items() if hasattr(v, "to")}
    with autocast or contextlib.nullcontext():
        emb = model(feats)["sentence_embedding"]
    return F.normalize(emb.float(), dim=-1)


def train_step(model: Any, tokenize: Callable[[list[str]], dict[str, Any]],
               groups: Sequence[Group], optimizer: Any, scheduler: Any, loss_cfg: Any, *,
               device: Any = "cpu", max_grad_norm: float | None = None, autocast: Any = None,
               scaler: Any = None) -> dict[str, float]:
    """One optimizer step on the global batch ``groups`` (every rank passes all of them)."""
    import torch

    dist_on, world, rank = _dist()
    if len(groups) % world:
        raise ValueError(f"{len(groups)} queries do not split over {world} workers")
    b = len(groups) // world
    slices = [groups[r * b:(r + 1) * b] for r in range(world)]
    mine = slices[rank]
    texts = [g.query for g in mine] + [key for g in mine for key in g.keys]
    emb = encode(model, tokenize, texts, device, autocast)
    q, k = emb[:b], emb[b:]
    if dist_on:
        q = gather_with_grad(q, [b] * world, rank)
        k = gather_with_grad(k, [sum(len(g.keys) for g in s) for s in slices], rank)
    loss, parts = retrieval_loss(
        q, k, batch_targets(groups), temperature=loss_cfg.temperature,
        in_batch=loss_cfg.in_batch_negatives, contrastive_weight=loss_cfg.contrastive_weight,
        distill_weight=loss_cfg.distill_weight, teacher_temperature=loss_cfg.teacher_temperature)
    scaled = loss * world  # DDP averages gradients over ranks
    if scaler is not None:
        scaler.scale(scaled).backward()
        scaler.unscale_(optimizer)
    else:
        scaled.backward()
    grad_norm = float("nan")
    if max_grad_norm is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {**parts, "grad_norm": grad_norm, "queries": float(len(groups)),
            "keys": float(k.shape[0])}
