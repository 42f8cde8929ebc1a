"""The LoRA model: building it (with QLoRA when asked), its optimizer, saving and merging the
adapter.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

from craft_ray.models.gguf import resolve_model_path
from craft_ray.runtime import atomic_path
from craft_ray.stages.train.config import TrainConfig

logger = logging.getLogger(__name__)


# --- model construction (worker side) ------------------------------------------------------


def torch_dtype(cfg: TrainConfig, on_gpu: bool) -> Any:
    import torch

    prec = cfg.precision
    if prec == "auto":
        prec = "bf16" if on_gpu else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[prec]


def build_lora_model(cfg: TrainConfig, device: Any, on_gpu: bool) -> Any:
    """Base model (optionally 4-bit) + fresh LoRA adapter, seeded by ``cfg.seed``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(cfg, on_gpu)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.qlora.enabled:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ImportError("QLoRA needs bitsandbytes: pip install 'craft-ray[qlora]'"
                              ) from exc
        if not on_gpu:
            logger.warning("qlora on a CPU worker: 4-bit matmuls run on bitsandbytes' CPU "
                           "backend (slow; for testing)")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.qlora.quant_type,
            bnb_4bit_use_double_quant=cfg.qlora.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, cfg.qlora.compute_dtype))
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.base_model), **kwargs)
    model.config.use_cache = False
    if cfg.qlora.enabled:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        # non-reentrant checkpointing works under DDP with frozen base weights
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(cfg.seed)  # the LoRA A matrices are drawn from this seed
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias=cfg.lora.bias,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def build_optimizer(cfg: TrainConfig, model: Any, total_steps: int) -> tuple[Any, Any]:
    """AdamW over the trainable (LoRA) parameters and the warm-up + decay schedule."""
    import torch
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = int(math.ceil(cfg.warmup_ratio * total_steps))
    if cfg.lr_schedule == "linear":
        sched = get_linear_schedule_with_warmup(opt, warmup, total_steps)
    elif cfg.lr_schedule == "cosine":
        sched = get_cosine_schedule_with_warmup(opt, warmup, total_steps)
    else:
        sched = get_constant_schedule_with_warmup(opt, warmup)
    return opt, sched


def lora_state_dict(peft_model: Any, zero_stage: int = 0) -> dict[str, Any]:
    """The adapter's weights as full CPU tensors, in PEFT's saved-adapter naming.

    Under ZeRO-3 each rank holds only a shard of every partitioned parameter (the module's
    own tensor is empty), so the trainable parameters are gathered from all ranks first with
    ``deepspeed.zero.GatheredParameters``. That gather is a collective: under ZeRO-3 *every*
    rank must call this function, in the same order.
    """
    from peft import get_peft_model_state_dict

    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            full = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
    else:
        full = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
    return get_peft_model_state_dict(peft_model, state_dict=full)


def save_adapter(out_dir: Path, peft_model: Any, state_dict: dict[str, Any]) -> None:
    """A PEFT adapter folder (``PeftModel.from_pretrained`` loads it) from a full state dict
    (see :func:`lora_state_dict`)."""
    import torch

    bad = [k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.numel() == 0]
    if bad:  # a ZeRO-3 shard placeholder would be saved as an empty tensor
        raise RuntimeError(f"adapter weights {bad[:3]} are empty (ZeRO-3 partitioned and not "
                           "gathered?)")
    peft_model.save_pretrained(out_dir, state_dict=state_dict)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None,
                  dtype: str = "auto") -> Path:
    """Fold a LoRA adapter into its base model and save the merged model + tokenizer."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter folder "
                                "(no adapter_config.json); pass RUN_DIR/train/TRIAL/adapter")
    base = resolve_model_path(
        base_model or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path)
    torch_dt = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dt)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(tok_src)).save_pretrained(tmp)
        if out_dir.exists():  # a rename does not replace a full folder
            shutil.rmtree(out_dir)
    logger.info("merged %s into %s -> %s", adapter_dir, base, out_dir)
    return out_dir
