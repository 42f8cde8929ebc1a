"""DeepSpeed configuration and checkpoint state (worker side)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from craft_ray.stages.train.config import TrainConfig
from craft_ray.stages.train.lora import torch_dtype

CHECKPOINT_STATE = "train_state.json"

# DeepSpeed's own checkpoint inside a Ray Train checkpoint: DEEPSPEED_DIR/DEEPSPEED_TAG/...
DEEPSPEED_DIR = "deepspeed"

DEEPSPEED_TAG = "state"


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = (_deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict)
                  else v)
    return out


def deepspeed_config(cfg: TrainConfig, on_gpu: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed config generated from the train config (``deepspeed.extra`` merged
    over it). Precision follows :func:`torch_dtype` (fp32 on CPU workers)."""
    import torch

    dtype = torch_dtype(cfg, cfg.use_gpu if on_gpu is None else on_gpu)
    zero: dict[str, Any] = {"stage": cfg.deepspeed.stage, "overlap_comm": True,
                            "contiguous_gradients": True}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.deepspeed.offload_params and cfg.deepspeed.stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.per_device_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
    }
    if cfg.max_grad_norm is not None:
        ds["gradient_clipping"] = cfg.max_grad_norm
    return _deep_merge(ds, cfg.deepspeed.extra)


def unwrap(model: Any) -> Any:
    """The PEFT model inside a DDP wrapper or a DeepSpeed engine."""
    return getattr(model, "module", model)

# --- the per-worker loop -------------------------------------------------------------------


def zero_stage_of(engine: Any) -> int:
    """The ZeRO stage of a DeepSpeed engine (0 without one)."""
    if engine is None:
        return 0
    return int(engine.zero_optimization_stage())


def save_deepspeed_state(engine: Any, dirpath: Path) -> None:
    """This rank's part of a DeepSpeed engine's training state, under ``dirpath/deepspeed``.

    DeepSpeed's own checkpoint (``engine.save_checkpoint``): every rank writes its ZeRO
    partition of the fp32 trainable weights and AdamW moments
    (``zero_pp_rank_{r}_*optim_states.pt``); data-parallel rank 0 also writes the module
    state, lr schedule and step counters, and the ``latest`` tag file. Frozen base weights are
    left out (the base model is reloaded from ``base_model``). A collective: *every* rank must
    call it, each with its own ``dirpath`` or a shared one; the union of the ranks' files is
    the checkpoint (Ray Train merges the folders every rank reports into one).
    """
    engine.save_checkpoint(str(dirpath / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                           exclude_frozen_parameters=True)


def load_deepspeed_state(engine: Any, dirpath: Path, *, optimizer_states: bool = True) -> None:
    """Restore what :func:`save_deepspeed_state` wrote (all ranks' files under ``dirpath``)
    into a freshly initialised engine of the same world size; every rank calls it.

    ``optimizer_states=False`` restores weights and lr schedule only (AdamW moments start
    from zero); kept for tests that show the difference.
    """
    # strict=False: the saved module state holds the trainable (LoRA) weights only
    path, _ = engine.load_checkpoint(str(dirpath / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                     load_module_strict=False,
                                     load_optimizer_states=optimizer_states,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"no DeepSpeed checkpoint '{DEEPSPEED_TAG}' under "
                           f"{dirpath / DEEPSPEED_DIR}")
