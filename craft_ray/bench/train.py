"""``craft-ray bench train``: a plain single-process PEFT loop vs the Ray Train path.

All three runs train the same tiny Llama-style model (built offline) with LoRA on the same
real CRAFT few-shots (bioqa, repeated to ``rows`` examples), same effective batch, same number
of optimizer steps:

(a) plain: one process, the library's ``train_step`` over pre-tokenised, padded batches;
(b) Ray Train, 1 worker: :func:`craft_ray.stages.train.run_train` (Ray Data shard, TorchTrainer);
(c) Ray Train, 2 workers (DDP over gloo).

Each runs ``repeats`` times, interleaved (a b c a b c ...) after a warm-up of each
(:mod:`craft_ray.bench.measure`); ``ratio`` is the median of (b)/(a) pair by pair. The figure
compared is steady-state training tokens/s (non-padding tokens per second of
optimizer steps, each step timed from the end of the previous one, so fetching and collating
its batches count; the first step is left out as warm-up), measured the same way on each side;
start-up (Ray Train worker group, Ray Data tokenisation) is reported separately as wall time.
On a 2-core machine (c) measures data-parallel overhead, not speed-up: both workers share the
cores the single process had.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from craft_ray.bench.measure import (
    conditions,
    interleave,
    load_average,
    paired_ratio,
    summary,
    thread_report,
)
from craft_ray.config import apply_overrides, validate
from craft_ray.resources import torch_threads
from craft_ray.runtime import init_ray

logger = logging.getLogger(__name__)

FEWSHOTS = Path(os.environ.get("CRAFT_RAY_SHARED_DATA", Path(__file__).resolve().parents[2].parent
                               / "shared" / "data")) / "craft-fewshots"


def _records(rows: int, fewshots: Path) -> list[dict[str, Any]]:
    from craft_ray.tasks.fewshots import FewShotConfig, load_fewshots
    from craft_ray.tasks.registry import get_task

    if not fewshots.is_file():
        raise FileNotFoundError(f"few-shots {fewshots} not found; pass --fewshots to a CRAFT "
                                "bioqa few-shot jsonl")
    task = get_task("bioqa")
    base = [task.fewshot_record(s) for s in load_fewshots(FewShotConfig(path=str(fewshots)))]
    return [dict(base[i % len(base)]) for i in range(rows)]


def plain_loop(cfg: Any, records: list[dict[str, Any]], steps: int) -> dict[str, float]:
    """Baseline: the same model, LoRA, optimizer and step function in this process."""
    import torch

    from craft_ray.models.chat import encode_example
    from craft_ray.models.tokenizers import load_train_tokenizer
    from craft_ray.stages.train.data import collate_batch, resolve_train_template
    from craft_ray.stages.train.lora import build_lora_model, build_optimizer
    from craft_ray.stages.train.step import group, train_step
    from craft_ray.tasks.registry import get_task

    torch.set_num_threads(torch_threads(cfg.cpus_per_worker or 1.0, cfg.torch_threads))
    tok = load_train_tokenizer(cfg.base_model)
    template = resolve_train_template(cfg, tok)
    task = get_task("bioqa")
    ex = [encode_example(tok, *task.training_pair(r), template=template) for r in records]
    b = cfg.per_device_batch_size
    model = build_lora_model(cfg, "cpu", False)
    opt, sched = build_optimizer(cfg, model, steps)
    tokens = seconds = 0.0
    done = 0
    while done < steps:
        for rows in group(ex, cfg.batch_size):
            t0 = time.perf_counter()  # a step: collate its micro-batches, then train
            mbs = [collate_batch([e[0] for e in rows[i:i + b]], [e[1] for e in rows[i:i + b]],
                                 tok.pad_token_id, cfg.loss_on) for i in range(0, len(rows), b)]
            out = train_step(model, mbs, opt, sched, device="cpu",
                             max_grad_norm=cfg.max_grad_norm)
            dt = time.perf_counter() - t0
            if done > 0:  # the first step is warm-up, as in the Ray worker
                tokens += out["tokens"]
                seconds += dt
            done += 1
            if done >= steps:
                break
    return {"tokens_per_s": tokens / seconds, "train_seconds": seconds}


def run_bench_train(*, rows: int = 64, steps: int = 30, overrides: list[str] | None = None,
                    fewshots: Path | None = None, hidden_size: int = 128,
                    repeats: int = 3, warmup: bool = True) -> dict[str, Any]:
    """Run (a), (b), (c) ``repeats`` times interleaved after a warm-up of each (``warmup=False``:
    none, for smoke tests) and return the figures (the CLI prints them as one JSON line)."""
    import datasets

    from craft_ray.models.tiny import build_tiny_causal_lm
    from craft_ray.stages.train import TrainStageConfig, run_train

    load_before = load_average()
    records = _records(rows, fewshots or FEWSHOTS / "bioqa.jsonl")
    with tempfile.TemporaryDirectory(prefix="craft-bench-train-") as tmp:
        model = build_tiny_causal_lm(Path(tmp) / "model", hidden_size=hidden_size)
        hf_dir = Path(tmp) / "data"
        datasets.Dataset.from_list(records).save_to_disk(str(hf_dir))
        base = apply_overrides({"run_dir": str(Path(tmp) / "run"), "train": {
            "base_model": str(model), "task": "bioqa", "dataset_path": str(hf_dir),
            "per_device_batch_size": 4, "batch_size": 16, "epochs": 100,
            "stop_after_steps": steps, "max_train_samples": None, "report_every_steps": 1000,
            "num_workers": 1}}, overrides or [])
        cfg1 = validate(TrainStageConfig, base, "bench train")
        init_ray(cfg1.ray)
        runs = iter(range(10_000))
        walls: dict[int, list[float]] = {1: [], 2: []}

        def ray_side(workers: int) -> float:
            data = apply_overrides(base, [f"train.num_workers={workers}",
                                          f"train.trial_name=workers{workers}-{next(runs)}"])
            t0 = time.perf_counter()
            stats = run_train(validate(TrainStageConfig, data, "bench train"))
            walls[workers].append(time.perf_counter() - t0)
            return float(stats["tokens_per_s"])

        tps = interleave({"plain": lambda: plain_loop(cfg1.train, records, steps)["tokens_per_s"],
                          "ray_1worker": lambda: ray_side(1),
                          "ray_2workers": lambda: ray_side(2)}, repeats=repeats,
                         warmup=warmup)
    out = _train_figures(tps, walls, cfg1.train, hidden_size, rows, steps, repeats)
    out.update(conditions(load_before))
    logger.info("bench train: plain %.0f tok/s, Ray 1 worker %.0f tok/s (%.3f), "
                "2 workers %.0f tok/s (%.3f)", out["a_plain_tokens_per_s"]["median"],
                out["b_ray_1worker_tokens_per_s"]["median"], out["ratio"],
                out["c_ray_2workers_tokens_per_s"]["median"], out["ratio_c_over_a"]["median"])
    return out


def _train_figures(tps: dict[str, list[float]], walls: dict[int, list[float]], cfg: Any,
                   hidden_size: int, rows: int, steps: int, repeats: int) -> dict[str, Any]:
    """The JSON figures: tokens/s of each side, ratios pair by pair, Ray's wall times."""
    b = paired_ratio(tps["ray_1worker"], tps["plain"])
    c = paired_ratio(tps["ray_2workers"], tps["plain"])
    return {
        "model": f"tiny llama, 2 layers, hidden {hidden_size}, LoRA r={cfg.lora.r}",
        "rows": rows, "steps": steps, "repeats": repeats, "batch_size": cfg.batch_size,
        "per_device_batch_size": cfg.per_device_batch_size,
        "baseline": "plain single-process PEFT loop (same model, LoRA, AdamW, train_step; "
                    "collation timed)",
        "a_plain_tokens_per_s": summary(tps["plain"], 1),
        "b_ray_1worker_tokens_per_s": summary(tps["ray_1worker"], 1),
        "c_ray_2workers_tokens_per_s": summary(tps["ray_2workers"], 1),
        "ratio": b["median"], "ratio_b_over_a": b, "ratio_c_over_a": c,
        "ray_1worker_wall_s": summary(walls[1][-repeats:], 1),  # the warm-up run left out
        "ray_2workers_wall_s": summary(walls[2][-repeats:], 1),
        "threads_plain": thread_report(),
        "note": "c on a 2-core machine measures data-parallel overhead, not speed-up",
    }
