"""The retriever loss and batching (plain torch, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from craft_ray.stages.train_retriever.data import Example
from craft_ray.stages.train_retriever.loss import (
    batch_targets,
    epoch_order,
    global_batch,
    retrieval_loss,
    sample_group,
)


def _examples():
    return [Example(f"q{i}", [f"p{i}a", f"p{i}b"], [f"n{i}{j}" for j in range(5)],
                    [float(-j) for j in range(7)]) for i in range(6)]


def test_groups_are_deterministic_and_independent_of_the_batch_split():
    exs = _examples()
    order = epoch_order(len(exs), 7, 0)
    assert sorted(order.tolist()) == list(range(6))
    assert order.tolist() != epoch_order(len(exs), 7, 1).tolist()
    g1 = global_batch(exs, order, 0, 4, 7, 0, 3, "random")
    g2 = global_batch(exs, order, 0, 4, 7, 0, 3, "random")
    assert [g.keys for g in g1] == [g.keys for g in g2]
    for g in g1:
        i = int(g.query[1:])
        assert g.keys[0] in exs[i].pos and len(g.keys) == 4
        assert set(g.keys[1:]) <= set(exs[i].neg) and len(set(g.keys[1:])) == 3
        # teacher scores follow the keys they belong to (pos: 0/-1, neg j: -(2 + j))
        expect = [exs[i].teacher_scores[(exs[i].pos + exs[i].neg).index(k)] for k in g.keys]
        assert g.teacher == expect
    few = sample_group(Example("q", ["p"], ["n"]), 7, np.random.default_rng(0), "first")
    assert few.keys == ["p", "n"] and few.teacher is None


def test_contrastive_loss_matches_a_manual_infonce():
    import torch

    rng = np.random.default_rng(0)
    exs = _examples()[:3]
    groups = [sample_group(e, 2, np.random.default_rng(i)) for i, e in enumerate(exs)]
    t = batch_targets(groups)
    assert t["pos"].tolist() == [0, 3, 6] and t["own"].sum().item() == 9
    q = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(3, 8))), dim=-1)
    k = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(9, 8))), dim=-1)
    loss, parts = retrieval_loss(q, k, t, temperature=0.1)
    s = (q @ k.T).numpy() / 0.1
    manual = np.mean([np.log(np.exp(s[i]).sum()) - s[i, 3 * i] for i in range(3)])
    assert float(loss) == pytest.approx(manual, rel=1e-5)
    own_only, _ = retrieval_loss(q, k, t, temperature=0.1, in_batch=False)
    manual_own = np.mean([np.log(np.exp(s[i, 3 * i:3 * i + 3]).sum()) - s[i, 3 * i]
                          for i in range(3)])
    assert float(own_only) == pytest.approx(manual_own, rel=1e-5)
    assert float(own_only) < float(loss)  # in-batch keys only add competitors
    assert parts["contrastive"] == pytest.approx(float(loss), rel=1e-6)


def test_distillation_is_kl_from_teacher_to_student_over_the_own_group():
    import torch

    rng = np.random.default_rng(1)
    groups = [sample_group(e, 2, np.random.default_rng(i)) for i, e in enumerate(_examples()[:2])]
    groups[1].teacher = None  # a query without teacher scores is left out of the KL
    t = batch_targets(groups)
    q = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(2, 4))), dim=-1)
    k = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(6, 4))), dim=-1)
    loss, parts = retrieval_loss(q, k, t, temperature=0.5, contrastive_weight=0.0,
                                 distill_weight=2.0, teacher_temperature=0.5)
    s = (q[0] @ k[:3].T).numpy() / 0.5
    p_s = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    tt = np.array(groups[0].teacher) / 0.5
    p_t = np.exp(tt - tt.max()) / np.exp(tt - tt.max()).sum()
    kl = float((p_t * (np.log(p_t) - np.log(p_s))).sum())
    assert parts["distill"] == pytest.approx(kl, rel=1e-5)
    assert float(loss) == pytest.approx(2 * kl, rel=1e-5)
    # student = teacher: zero KL
    same = {**t, "teacher": torch.where(t["own"], torch.tensor(0.0), t["teacher"])}
    k_same = torch.stack([q[0]] * 3 + [q[1]] * 3)
    zero, _ = retrieval_loss(q, k_same, same, temperature=1.0, contrastive_weight=0.0,
                             distill_weight=1.0, teacher_temperature=1.0)
    assert float(zero) == pytest.approx(0.0, abs=1e-6)
