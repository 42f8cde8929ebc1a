"""LoRA fine-tuning on Ray Train: task dataset -> Ray Data -> TorchTrainer workers -> adapter.

The recipe, top to bottom::

    RUN_DIR/filter/datasets/{size}/hf        datasets.load_from_disk (driver, small)
      -> held-out eval split, CRAFT's 25k subsample (fixed seed)
      -> ray.data: TokenizeRows actor       Task.training_pair + chat/plain template
      -> length statistics, max_length (fixed or a percentile), overlong rows dropped
      -> TorchTrainer(train_loop_per_worker, datasets={"train", "eval"})
           each worker: get_dataset_shard("train") -> dynamic-padding collate
           -> LoRA model (DDP over gloo on CPU / NCCL on GPU, or DeepSpeed ZeRO-2/3)
           -> train_step (loss normalised by the global number of answer tokens)
           -> ray.train.report(metrics, checkpoint) every N steps / each epoch
      -> RUN_DIR/train/{trial}/adapter/     PEFT format (PeftModel.from_pretrained)

Invariants:

* The loss of one optimizer step is the mean over every label token of the *global* batch
  (all workers, all accumulation micro-batches), so N workers x batch b and 1 worker x N*b
  give the same update (tested).
* The Ray Train run is named after a hash of the settings that change the result, so a rerun
  with the same settings resumes from its last reported checkpoint and a changed config starts
  afresh. ``stop_after_steps`` and logging knobs are not in that hash.
* ``_SUCCESS`` in the trial folder is written last, after the adapter folder is in place.
* A checkpoint holds everything a resume needs: adapter, data position and optimizer state.
  Under DeepSpeed the optimizer state is ZeRO-partitioned, so every rank reports its own
  folder and the checkpoint is their union (Ray Train merges them under one name).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from craft_ray.models.tokenizers import load_train_tokenizer
from craft_ray.resources import torch_threads
from craft_ray.runtime import storage
from craft_ray.runtime.progress import report_progress
from craft_ray.stages.train.checkpoint import (
    CHECKPOINT_STATE,
    DEEPSPEED_DIR,
    deepspeed_config,
    load_deepspeed_state,
    save_deepspeed_state,
    zero_stage_of,
)
from craft_ray.stages.train.config import TrainConfig
from craft_ray.stages.train.data import IGNORE_INDEX
from craft_ray.stages.train.lora import (
    build_lora_model,
    build_optimizer,
    lora_state_dict,
    save_adapter,
)
from craft_ray.stages.train.step import (
    dist_ready,
    group,
    iter_micro_batches,
    token_loss_sum,
    train_step,
)

logger = logging.getLogger(__name__)


def _save_checkpoint(dirpath: Path, peft_model: Any, optimizer: Any, scheduler: Any,
                     state: dict[str, Any], tokenizer: Any | None = None,
                     state_dict: dict[str, Any] | None = None) -> None:
    """Rank 0's part of a checkpoint: the adapter (PEFT format), data position and, without
    DeepSpeed (``optimizer`` not None), optimizer + schedule state in ``optim.pt``."""
    import torch

    if state_dict is None:
        state_dict = lora_state_dict(peft_model)
    save_adapter(dirpath / "adapter", peft_model, state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(dirpath / "adapter")
    if optimizer is not None:  # DeepSpeed: in save_deepspeed_state's files instead
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None},
                   dirpath / "optim.pt")
    (dirpath / CHECKPOINT_STATE).write_text(json.dumps(state))


def _evaluate(model: Any, shard: Any, cfg: TrainConfig, pad_id: int, device: Any) -> float | None:
    """Mean token loss over this worker's eval shard, summed over all workers."""
    import torch
    import torch.distributed as dist

    if shard is None:
        return None
    model.eval()
    tot = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for mb in iter_micro_batches(
                shard.iter_batches(batch_size=cfg.per_device_batch_size, batch_format="numpy"),
                pad_id, cfg.loss_on):
            out = model(input_ids=mb["input_ids"].to(device),
                        attention_mask=mb["attention_mask"].to(device))
            tot[0] += float(token_loss_sum(out.logits, mb["labels"].to(device)))
            tot[1] += float((mb["labels"][:, 1:] != IGNORE_INDEX).sum())
    model.train()
    if dist_ready():
        tot = tot.to(device)
        dist.all_reduce(tot)
        tot = tot.cpu()
    return float(tot[0] / tot[1]) if tot[1] > 0 else None


@dataclass
class _Engine:
    """What a worker trains with: the LoRA model, the wrapper stepped (DDP, DeepSpeed engine or
    the model itself), the optimizer and the schedule."""

    model: Any
    net: Any
    optimizer: Any
    scheduler: Any
    engine: Any = None  # the DeepSpeed engine, when DeepSpeed is on


@dataclass
class _Progress:
    """Where training stands: steps done, the (epoch, batch) to resume from, throughput."""

    step: int
    pos: tuple[int, int]
    tokens_done: float = 0.0
    step_seconds: float = 0.0
    last_loss: float = float("nan")
    first_step_s: float | None = None


def _load_checkpoint(ckpt: Any, ckpt_dir: Path, model: Any, rank: int
                     ) -> tuple[dict[str, int], dict[str, Any] | None]:
    """(data position, optimizer state or None) of a checkpoint; its adapter goes into model."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((ckpt_dir / CHECKPOINT_STATE).read_text())
    loaded = set_peft_model_state_dict(
        model, load_file(ckpt_dir / "adapter" / "adapter_model.safetensors"))
    if getattr(loaded, "unexpected_keys", None):
        raise RuntimeError(f"checkpoint {ckpt.path} does not match the LoRA model: "
                           f"unexpected keys {loaded.unexpected_keys[:5]}")
    optim_state = None
    if (ckpt_dir / "optim.pt").is_file():
        # weights_only: never unpickle arbitrary objects from a run directory
        optim_state = torch.load(ckpt_dir / "optim.pt", map_location="cpu", weights_only=True)
    logger.info("rank %d: resuming from checkpoint at step %d (epoch %d)", rank,
                state["global_step"], state["epoch"])
    return state, optim_state


def _deepspeed_engine(cfg: TrainConfig, model: Any, total_steps: int, on_gpu: bool, ckpt: Any,
                      ckpt_dir: Path | None, optim_state: dict[str, Any] | None) -> _Engine:
    """The DeepSpeed engine over the LoRA model, restored from the checkpoint folder if any."""
    if not on_gpu:  # before deepspeed's first import: its accelerator is chosen then
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError("DeepSpeed needs: pip install 'craft-ray[deepspeed]'") from exc
    optimizer, scheduler = build_optimizer(cfg, model, total_steps)
    legacy = ckpt_dir is not None and not (ckpt_dir / DEEPSPEED_DIR).is_dir()
    if legacy and optim_state is not None and optim_state.get("scheduler") is not None:
        scheduler.load_state_dict(optim_state["scheduler"])
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, on_gpu))
    if legacy:  # written before checkpoints held DeepSpeed's state
        logger.warning("checkpoint %s has no DeepSpeed state (%s/): resuming with its "
                       "adapter weights and lr schedule, AdamW moments start from zero",
                       ckpt.path, DEEPSPEED_DIR)
    elif ckpt_dir is not None:
        load_deepspeed_state(engine, ckpt_dir)
    return _Engine(model, engine, optimizer, scheduler, engine)


def _torch_engine(cfg: TrainConfig, model: Any, total_steps: int, device: Any,
                  world_size: int, optim_state: dict[str, Any] | None) -> _Engine:
    """The LoRA model on its device (DDP-wrapped over several workers), its optimizer."""
    import ray.train.torch

    if not cfg.qlora.enabled:  # a 4-bit model is placed at load time and cannot move
        model.to(device)
    optimizer, scheduler = build_optimizer(cfg, model, total_steps)
    net = model
    if world_size > 1:
        net = ray.train.torch.prepare_model(model, move_to_device=not cfg.qlora.enabled)
    if optim_state is not None and optim_state.get("optimizer") is not None:
        optimizer.load_state_dict(optim_state["optimizer"])
        if optim_state.get("scheduler") is not None:
            scheduler.load_state_dict(optim_state["scheduler"])
    return _Engine(model, net, optimizer, scheduler)


def _setup_engine(cfg: TrainConfig, model: Any, total_steps: int, on_gpu: bool, device: Any,
                  world_size: int, rank: int) -> tuple[_Engine, dict[str, int]]:
    """The engine to train with and the data position, resumed from Ray Train's checkpoint."""
    import ray.train

    state = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0}
    ckpt = ray.train.get_checkpoint()
    optim_state = None
    # the checkpoint folder stays open until the DeepSpeed engine exists (it restores from it)
    with contextlib.ExitStack() as stack:
        ckpt_dir = Path(stack.enter_context(ckpt.as_directory())) if ckpt is not None else None
        if ckpt_dir is not None:
            state, optim_state = _load_checkpoint(ckpt, ckpt_dir, model, rank)
        if cfg.deepspeed.enabled:
            eng = _deepspeed_engine(cfg, model, total_steps, on_gpu, ckpt, ckpt_dir, optim_state)
        else:
            eng = _torch_engine(cfg, model, total_steps, device, world_size, optim_state)
    return eng, state


def _report(eng: _Engine, tokenizer: Any, rank: int, metrics: dict[str, Any],
            nxt: tuple[int, int], save: bool) -> None:
    """ray.train.report on every rank; with ``save`` rank 0 attaches a checkpoint."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    # every rank: under ZeRO-3 gathering the LoRA weights is a collective
    weights = lora_state_dict(eng.model, zero_stage_of(eng.engine))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_obj = None
        if eng.engine is not None:
            # every rank writes its ZeRO shard to its own folder and reports it: Ray Train
            # merges the folders of all ranks into one checkpoint (same directory name)
            save_deepspeed_state(eng.engine, Path(tmp))
            ckpt_obj = ray.train.Checkpoint.from_directory(tmp)
        if rank == 0:
            _save_checkpoint(Path(tmp), eng.model,
                             eng.optimizer if eng.engine is None else None, eng.scheduler,
                             {"epoch": nxt[0], "batch_in_epoch": nxt[1],
                              "global_step": metrics["step"]}, tokenizer, state_dict=weights)
            ckpt_obj = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt_obj)


def _append_metrics(path: str, row: dict[str, Any]) -> None:
    storage.append_text(path, json.dumps({**row, "time": time.time()}) + "\n")


def _train_epoch(epoch: int, skip: int, groups: Iterable[list[dict[str, Any]]], eng: _Engine,
                 prog: _Progress, ctx: dict[str, Any]) -> bool:
    """Optimizer steps over one epoch's batch groups; True once ``stop_at`` is reached.

    ``ctx``: cfg, plan, stop_at, device, rank, metrics_path, report (metrics, pos, save).
    """
    cfg, plan = ctx["cfg"], ctx["plan"]
    t_last = time.perf_counter()
    for gi, mbs in enumerate(groups):
        if gi < skip:
            t_last = time.perf_counter()
            continue  # trained before the checkpoint we resumed from
        out = train_step(eng.net, mbs, eng.optimizer, eng.scheduler, device=ctx["device"],
                         max_grad_norm=cfg.max_grad_norm, engine=eng.engine)
        # wall time of the step including fetching and collating its batches
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        prog.step += 1
        if ctx["rank"] == 0:  # the console's line: steps done, tokens/s
            report_progress(done=1, total=ctx["stop_at"], unit="steps", tokens=out["tokens"])
        end_of_epoch = gi + 1 == plan["steps_per_epoch"]
        prog.pos = (epoch + 1, 0) if end_of_epoch else (epoch, gi + 1)
        prog.last_loss = out["loss"]
        if prog.first_step_s is None:
            prog.first_step_s = dt  # warm-up step: left out of the steady-state rate
        else:
            prog.tokens_done += out["tokens"]
            prog.step_seconds += dt
        lr = (float(eng.scheduler.get_last_lr()[0]) if eng.scheduler is not None
              else cfg.learning_rate)
        row = {"step": prog.step, "epoch": epoch + (gi + 1) / plan["steps_per_epoch"],
               "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
               "tokens": out["tokens"], "tokens_per_s": out["tokens"] / dt, "step_s": dt}
        if ctx["rank"] == 0 and (prog.step % cfg.log_every_steps == 0
                                 or prog.step == ctx["stop_at"]):
            _append_metrics(ctx["metrics_path"], row)
        if prog.step >= ctx["stop_at"]:
            return True  # the final report checkpoints
        ckpt_now = end_of_epoch or (cfg.checkpoint_every_steps is not None
                                    and prog.step % cfg.checkpoint_every_steps == 0)
        if ckpt_now or prog.step % cfg.report_every_steps == 0:
            ctx["report"](row, prog.pos, ckpt_now)
            t_last = time.perf_counter()  # reporting/checkpointing is not a step
    return False


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: LoRA fine-tune on this worker's shard of the Ray dataset.

    ``config``: ``train`` (TrainConfig as JSON), ``plan`` (steps per epoch, total steps),
    ``trial_dir`` (where rank 0 writes metrics.jsonl).
    """
    import ray.train
    import ray.train.torch
    import torch

    cfg = TrainConfig.model_validate(config["train"])
    plan = config["plan"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(torch_threads(cfg.cpus_per_worker or 1.0, cfg.torch_threads))
    on_gpu = cfg.use_gpu and torch.cuda.is_available()
    device = ray.train.torch.get_device()
    tokenizer = load_train_tokenizer(cfg.base_model)
    pad_id = int(tokenizer.pad_token_id)

    model = build_lora_model(cfg, device, on_gpu)
    eng, state = _setup_engine(cfg, model, plan["total_steps"], on_gpu, device,
                               ctx.get_world_size(), rank)
    eng.net.train()

    # rank 0 writes the run's metrics to the trial folder itself (local, shared or an object
    # store): the driver never reads a worker's disk
    metrics_path = storage.join(config["trial_dir"], "metrics.jsonl")
    if rank == 0:
        _trim_metrics(metrics_path, state["global_step"])
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if config.get("has_eval") else None
    # pos: (epoch, batch) of the next optimizer step, what a checkpoint must resume from
    prog = _Progress(step=state["global_step"], pos=(state["epoch"], state["batch_in_epoch"]))
    step_ctx = {"cfg": cfg, "plan": plan, "device": device, "rank": rank,
                "stop_at": min(plan["total_steps"], cfg.stop_after_steps or plan["total_steps"]),
                "metrics_path": metrics_path,
                "report": functools.partial(_report, eng, tokenizer, rank)}
    for epoch in range(state["epoch"], cfg.epochs):
        if prog.step >= step_ctx["stop_at"]:
            break
        batches = train_shard.iter_batches(
            batch_size=cfg.per_device_batch_size, batch_format="numpy",
            local_shuffle_buffer_size=min(cfg.shuffle_buffer_rows,
                                          max(plan["rows_per_worker"], 1)),
            local_shuffle_seed=cfg.seed * 1000 + epoch)
        groups = group(iter_micro_batches(batches, pad_id, cfg.loss_on), cfg.grad_accum)
        skip = state["batch_in_epoch"] if epoch == state["epoch"] else 0
        if _train_epoch(epoch, skip, groups, eng, prog, step_ctx):
            break
    eval_loss = _evaluate(eng.net, eval_shard, cfg, pad_id, device)
    final = {"step": prog.step, "loss": prog.last_loss, "final": True,
             "tokens_per_s": (prog.tokens_done / prog.step_seconds if prog.step_seconds > 0
                              else float("nan")),
             "train_tokens": prog.tokens_done, "train_seconds": prog.step_seconds}
    if eval_loss is not None:
        final["eval_loss"] = eval_loss
    if rank == 0:
        _append_metrics(metrics_path, final)
    _report(eng, tokenizer, rank, final, prog.pos, True)


def _trim_metrics(path: str, keep_upto_step: int) -> None:
    """On resume, drop metrics lines of steps after the checkpoint (they are redone)."""
    if not storage.is_file(path):
        return
    keep = []
    for line in storage.read_text(path).splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not row.get("final") and row.get("step", 0) <= keep_upto_step:
            keep.append(line)
    storage.write_text(path, "".join(x + "\n" for x in keep))
