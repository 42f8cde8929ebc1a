"""CPU actors: default CPUs leave room for the stage's own tasks; torch threads follow them."""

from __future__ import annotations

from craft_ray.resources import RESERVED_CPUS, actor_cpus, actor_resources, torch_threads


def test_default_actor_cpus_leave_room_for_read_tasks_and_threads_use_the_machine():
    # Ray Data's read tasks ask 1 CPU: a 2-CPU node's actor asks 1, and runs 2 threads
    assert actor_resources(None, 1, total=2) == (2 - RESERVED_CPUS, 2) == (1.0, 2)
    assert actor_resources(None, 2, total=16) == (7.5, 8)
    assert actor_resources(None, 4, total=2) == (1.0, 1)  # never below one CPU / thread
    assert actor_resources(None, 1, num_gpus=1, total=16) == (1.0, 1)  # the GPU does the work
    assert actor_resources(3.0, 1, total=2) == (3.0, 3)  # what the config asks wins
    assert actor_resources(None, 1, threads=1, total=2) == (1.0, 1)
    assert actor_cpus(None, 1, total=2) == 1.0


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
