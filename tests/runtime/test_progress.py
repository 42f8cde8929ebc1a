"""Live progress counters: what actors add is what the console's line reads."""

from __future__ import annotations

import logging
import time

import pytest

from craft_ray import console
from craft_ray.runtime import progress


def test_counters_add_numbers_and_replace_total_and_unit():
    c = progress.ProgressCounters()
    c.add({"done": 3, "tokens": 10, "total": 50, "unit": "generations"})
    c.add({"done": 2, "tokens": 5, "total": 40, "rejects": 1})
    assert c.snapshot() == {"done": 5, "tokens": 15, "total": 40, "unit": "generations",
                            "rejects": 1}
    c.reset()
    assert c.snapshot() == {}


def test_report_without_ray_or_actor_is_silent(monkeypatch):
    import ray

    monkeypatch.setattr(progress, "_handle", None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # a library call without Ray
    progress.report_progress(done=1)  # dropped, no error
    assert progress.read_progress() == {}
    monkeypatch.setattr(progress, "_handle", False)  # Ray, but nobody watching: no actor
    progress.report_progress(done=1)
    assert progress.read_progress() == {}


def test_workers_report_and_the_driver_reads(ray_local, monkeypatch):
    import ray

    monkeypatch.setattr(progress, "_handle", None)
    progress.start_progress()
    progress.report_progress(total=6, unit="generations")

    @ray.remote(num_cpus=0)
    def work(i: int) -> int:
        progress.report_progress(done=1, tokens=10 * i, rejects=int(i == 2))
        return i

    assert sorted(ray.get([work.remote(i) for i in range(4)])) == [0, 1, 2, 3]
    deadline = time.time() + 10  # reports are fire-and-forget: wait until all arrived
    while progress.read_progress().get("done", 0) < 4 and time.time() < deadline:
        time.sleep(0.05)
    got = progress.read_progress()
    assert got == {"total": 6, "unit": "generations", "done": 4, "tokens": 60, "rejects": 1}
    line = console.progress_text("generate", 0, 1, 10.0, got)
    assert line.startswith("generate: 4/6 generations (66%), 0.4/s, ETA 5s, 6 tok/s, "
                           "1 rejects so far")
    progress.start_progress()  # the next stage starts from zero
    assert progress.read_progress() == {}


@pytest.fixture
def quick_heartbeat(monkeypatch):
    monkeypatch.setattr(console.ProgressLine, "min_gap_s", 0.2)
    monkeypatch.setattr(console, "VERBOSE", False)
    monkeypatch.setattr(progress, "_handle", False)  # no counters: the line says "running"
    yield
    console.ProgressLine.end()


def test_heartbeat_writes_the_line_while_ray_data_is_silent_and_stops_at_end(
        quick_heartbeat, caplog):
    caplog.set_level(logging.INFO, logger="craft_ray.console")
    console.ProgressLine.begin("train")
    time.sleep(1.0)
    console.ProgressLine.end()
    beats = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train:")]
    assert beats and all(b.startswith("train: running, ") for b in beats), beats
    n = len(beats)
    time.sleep(0.5)
    assert len([r for r in caplog.records if r.getMessage().startswith("train:")]) == n


def test_the_counters_outlive_a_stage(ray_local, monkeypatch):
    # Ray ends an actor once the handle that created it is gone: a second stage's start must
    # not drop it (seen: evaluate's line stayed "running" after train in the demo)
    monkeypatch.setattr(progress, "_handle", None)
    for stage in range(3):
        progress.start_progress()
        progress.report_progress(total=40 + stage, unit="items")
        deadline = time.time() + 10
        while not progress.read_progress() and time.time() < deadline:
            time.sleep(0.05)
        assert progress.read_progress() == {"total": 40 + stage, "unit": "items"}
