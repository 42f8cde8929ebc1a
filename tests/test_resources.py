"""CPU actors: default CPUs leave room for the stage's own tasks; torch threads follow them."""

from __future__ import annotations

import pytest

from craft_ray.resources import (
    RESERVED_CPUS,
    ResourceFitError,
    actor_resources,
    place_spread,
    pool_fits,
    torch_threads,
)


def test_default_actor_cpus_leave_room_for_read_tasks_and_threads_use_the_machine():
    # one 2-CPU node, one actor: 1 CPU asked (1 left to the read tasks), 2 torch threads
    assert actor_resources(None, 1, total=2) == (2 - RESERVED_CPUS, 2) == (1.0, 2)
    assert actor_resources(None, 2, total=16) == (7.5, 8)
    # more actors than CPUs: fractional CPUs, so the readers still fit (before: 1 CPU each,
    # which held both CPUs and starved the reads)
    assert actor_resources(None, 4, total=2) == (0.25, 1)
    assert actor_resources(None, 1, num_gpus=1, nodes=[(16, 1)]) == (1.0, 1)  # the GPU works
    assert actor_resources(None, 1, threads=1, total=2) == (1.0, 1)


def test_default_pool_is_sized_from_the_nodes_not_the_total():
    """The hang of issue 16: a head with 0 CPUs and two 1-CPU workers, embed.concurrency=2.
    Two 1-CPU embedders held both CPUs and the 0.5-CPU readers waited forever."""
    nodes = [(0.0, 0.0), (1.0, 0.0), (1.0, 0.0)]
    cpus, threads = actor_resources(None, 2, nodes=nodes, task_cpus=0.5)
    assert (cpus, threads) == (0.5, 1)
    assert pool_fits(nodes, 2, cpus, task_cpus=0.5) and not pool_fits(nodes, 2, 1.0,
                                                                       task_cpus=0.5)
    # one actor takes one whole node, a reader the other; threads: one node's cores at most
    assert actor_resources(None, 1, nodes=nodes) == (1.0, 1)
    # four 4-CPU nodes, four actors: the equal share (3.75) would leave 0.25 per node and no
    # room for a 1-CPU read; 3 CPUs each leaves one CPU on every node
    assert actor_resources(None, 4, nodes=[(4.0, 0.0)] * 4) == (3.0, 4)
    assert actor_resources(None, 1, nodes=[(4.0, 0.0)] * 4) == (4.0, 4)


def test_requests_that_cannot_fit_fail_before_work_with_the_keys_to_change():
    nodes = [(0.0, 0.0), (1.0, 0.0), (1.0, 0.0)]
    with pytest.raises(ResourceFitError) as e:
        actor_resources(1.0, 2, nodes=nodes, key="embed", task_cpus=0.5)
    msg = str(e.value)
    assert "2 actors x 1 CPU (embed.concurrency x embed.num_cpus)" in msg
    assert "2 CPUs on 3 nodes (CPUs per node: 1, 1, 0; 0 GPUs)" in msg
    assert "Lower embed.concurrency or embed.num_cpus" in msg
    with pytest.raises(ResourceFitError, match=r"1 actors x 1.5 CPU \(train.num_workers x "
                       r"train.cpus_per_worker\)"):  # bigger than any node
        actor_resources(1.5, 1, nodes=nodes, key="train", task_cpus=0.25,
                        names=("num_workers", "cpus_per_worker"))
    with pytest.raises(ResourceFitError, match="and 1 GPU"):  # no node has a GPU
        actor_resources(None, 1, 1.0, nodes=nodes, key="embed")
    with pytest.raises(ResourceFitError, match="Lower evaluate.concurrency, or add nodes"):
        actor_resources(None, 3, nodes=[(1.0, 0.0)], key="evaluate")
    # an autoscaling pool: only its minimum must fit now
    assert actor_resources(0.5, 4, nodes=nodes, task_cpus=0.5, min_size=1)[0] == 0.5
    assert actor_resources(3.0, 1, total=4) == (3.0, 3)  # what the config asks wins
    with pytest.raises(ResourceFitError):
        actor_resources(3.0, 1, total=2)  # 3 CPUs on a 2-CPU machine never start
    # a retrieval pool runs no tasks beside it: the whole cluster is its own
    assert actor_resources(1.0, 2, nodes=nodes, task_cpus=0.0) == (1.0, 1)
    assert place_spread(nodes, 2, 1.0) == [0.0, 0.0, 0.0]


def test_torch_threads_follow_the_actor_cpus():
    assert torch_threads(1.5) == 2 and torch_threads(2.0) == 2 and torch_threads(1.0) == 1
    assert torch_threads(0.25) == 1 and torch_threads(1.5, explicit=1) == 1


def test_hf_generator_sets_threads_from_its_cpus(tiny_causal_lm):
    import torch

    from craft_ray.backends.hf import HFGenerator

    before = torch.get_num_threads()
    try:
        HFGenerator(str(tiny_causal_lm), None, {"num_cpus": 1.5}, {})
        assert torch.get_num_threads() == 2
        HFGenerator(str(tiny_causal_lm), None, {"num_cpus": 1.0}, {})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
