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
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from craft_ray.config import ConfigError, RayConfig, StrictModel
from craft_ray.models.gguf import resolve_model_path
from craft_ray.resources import actor_cpus, torch_threads
from craft_ray.runtime import StageDir, StageStats, atomic_write_json, tmp_path_for

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECKPOINT_STATE = "train_state.json"
# DeepSpeed's own checkpoint inside a Ray Train checkpoint: DEEPSPEED_DIR/DEEPSPEED_TAG/...
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
ROW_COLUMN = "__source_row__"  # row number in the source dataset, carried through tokenising
# Fields that do not change what is learned: a rerun differing only in these resumes.
_RESUME_NEUTRAL = {"stop_after_steps", "max_failures", "log_every_steps", "report_every_steps",
                   "checkpoint_every_steps", "num_checkpoints_to_keep", "storage_path",
                   "trial_name", "tokenize_batch_size", "data_num_cpus", "cpus_per_worker",
                   "torch_threads"}


# --- configuration ------------------------------------------------------------------------


class LoraSettings(StrictModel):
    """PEFT LoRA adapter settings (defaults: CRAFT's)."""

    r: int = Field(default=64, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(default=64, gt=0, le=1e5, description="LoRA alpha (scale alpha/r).")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS), min_length=1,
        description="Module names that get adapters (Llama/Mistral projection names).",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        default="none", description="Which biases are trained.")


class QLoraSettings(StrictModel):
    """4-bit quantised base model (QLoRA, bitsandbytes).

    Meant for GPU workers. On CPU workers it runs through bitsandbytes' CPU 4-bit backend
    (verified with bitsandbytes 0.50.2): slow, for testing configs and small models only.
    """

    enabled: bool = Field(default=False, description="Load the base model in 4 bit.")
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(default=True, description="Quantise the quantisation constants.")
    compute_dtype: Literal["bfloat16", "float16"] = Field(
        default="bfloat16", description="Dtype of the matmuls on dequantised weights.")


class DeepSpeedSettings(StrictModel):
    """DeepSpeed ZeRO-2/3 (`pip install 'craft-ray[deepspeed]'`).

    On GPU workers DeepSpeed uses NCCL; on CPU workers its CPU accelerator over gloo (slow;
    for testing configs). Under ZeRO-3 the LoRA weights are gathered from all ranks before
    every save. Every checkpoint also holds DeepSpeed's own checkpoint of the engine (each
    rank's ZeRO partition of the fp32 LoRA weights and AdamW moments, the lr schedule), so a
    resumed run continues exactly; DeepSpeed resumes it only with the same number of workers
    (``num_workers`` is part of the run name, so a changed count starts afresh).
    """

    enabled: bool = Field(default=False, description="Train through a DeepSpeed engine.")
    stage: Literal[2, 3] = Field(default=2, description="ZeRO stage.")
    offload_optimizer: bool = Field(default=False, description="Optimizer state in CPU RAM.")
    offload_params: bool = Field(default=False, description="ZeRO-3 parameters in CPU RAM.")
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys merged (recursively) over the generated DeepSpeed config (expert "
        "escape hatch, e.g. {zero_optimization: {stage3_param_persistence_threshold: 0}}).")


class TrainConfig(StrictModel):
    """Config of ``craft-ray train`` (one LoRA fine-tune of one dataset size and seed)."""

    base_model: str = Field(min_length=1, description="HF model id or local folder.")
    task: str | dict[str, Any] | None = Field(
        default=None,
        description="Task name (bioqa, medqa, csqa, recipegen, summarization) or a custom task "
        "config; rows are turned into (prompt, completion) by Task.training_pair. Empty: the "
        "dataset already has prompt/completion columns (prompt_field, completion_field).")
    prompt_field: str = Field(default="prompt", min_length=1,
                              description="Prompt column when no task is given.")
    completion_field: str = Field(default="completion", min_length=1,
                                  description="Completion column when no task is given.")
    dataset_size: str = Field(default="S", min_length=1,
                              description="Dataset size folder under RUN_DIR/filter/datasets.")
    dataset_path: str | None = Field(
        default=None, description="HF datasets folder; '{size}' is replaced by dataset_size "
        "(default RUN_DIR/filter/datasets/{size}/hf).")
    trial_name: str | None = Field(
        default=None, description="Output folder name under RUN_DIR/train "
        "(default {dataset_size}-seed{seed}).")
    seed: int = Field(default=1234, ge=0, le=2**31 - 1, description="Training seed.")
    max_train_samples: int | None = Field(
        default=25_000, ge=1, description="Random subsample of this many rows (CRAFT: 25k, "
        "drawn with data_seed). Empty: all rows.")
    data_seed: int = Field(default=1234, ge=0, le=2**31 - 1,
                           description="Seed of the subsample and of the eval split (fixed "
                           "across training seeds so seeds see the same data).")
    eval_path: str | None = Field(default=None,
                                  description="Held-out HF datasets folder for eval loss.")
    eval_fraction: float = Field(
        default=0.0, ge=0, lt=1,
        description="Without eval_path: hold out this fraction of the rows (at least 1) "
        "for eval loss. 0: no eval.")
    template: Literal["auto", "chat", "plain"] = Field(
        default="auto", description="chat: the tokenizer's chat template; plain: "
        "plain_template; auto: chat when the tokenizer has a template.")
    plain_template: str = Field(default="{prompt}\n",
                                description="Plain prompt template; the completion follows it.")
    system_prompt: str | None = Field(default=None,
                                      description="System message for the chat template.")
    loss_on: Literal["completion", "full"] = Field(
        default="completion", description="completion: loss on answer tokens only; full: on "
        "the whole sequence (CRAFT's SFTTrainer setting).")
    max_length: int | None = Field(default=None, ge=8, le=1_000_000,
                                   description="Tokens per example (prompt + completion).")
    max_length_percentile: float | None = Field(
        default=None, gt=0, le=100,
        description="Set max_length to this percentile of the dataset's lengths (e.g. 99).")
    overlong: Literal["drop", "truncate"] = Field(
        default="drop", description="Rows over max_length: dropped (counted) or truncated.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings.")
    qlora: QLoraSettings = Field(default_factory=QLoraSettings,
                                 description="QLoRA (GPU; CPU only for tests, slow).")
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings,
                                         description="DeepSpeed ZeRO-2/3 (GPU; CPU for tests).")
    epochs: int = Field(default=3, ge=1, le=1000, description="Passes over the data.")
    learning_rate: float = Field(default=1e-4, gt=0, le=1, description="AdamW peak lr.")
    weight_decay: float = Field(default=0.05, ge=0, le=1, description="AdamW weight decay.")
    warmup_ratio: float = Field(default=0.1, ge=0, le=1,
                                description="Fraction of steps with linear warm-up.")
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        default="linear", description="Decay after warm-up.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Gradient clipping.")
    batch_size: int = Field(
        default=16, ge=1, le=65_536,
        description="Effective batch: per_device_batch_size x grad accumulation x workers.")
    per_device_batch_size: int = Field(default=4, ge=1, le=65_536,
                                       description="Examples per forward pass per worker.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto: bf16 on GPU, fp32 on CPU.")
    gradient_checkpointing: bool = Field(default=False,
                                         description="Recompute activations (saves memory).")
    num_workers: int = Field(default=1, ge=1, le=4096, description="Ray Train workers.")
    use_gpu: bool = Field(default=False, description="One GPU per worker.")
    cpus_per_worker: float | None = Field(
        default=None, gt=0, le=1024,
        description="CPUs per worker (default: an equal share of the cluster's CPUs minus 0.5 "
        "left to the data tasks; 1 with a GPU). Torch threads follow (rounded up).")
    torch_threads: int | None = Field(
        default=None, ge=1, le=1024,
        description="Torch threads per worker (default: cpus_per_worker).")
    checkpoint_every_steps: int | None = Field(
        default=None, ge=1, description="Also checkpoint every N optimizer steps "
        "(always at each epoch's end).")
    num_checkpoints_to_keep: int = Field(default=2, ge=1, le=1000,
                                         description="Ray Train checkpoints kept.")
    max_failures: int = Field(default=0, ge=-1, le=1000,
                              description="Worker-group restarts from the last checkpoint "
                              "(-1: unlimited).")
    stop_after_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (the lr "
        "schedule still spans all epochs; a rerun without it resumes). For smoke runs.")
    log_every_steps: int = Field(default=1, ge=1, le=100_000,
                                 description="Steps between metrics.jsonl lines.")
    report_every_steps: int = Field(default=10, ge=1, le=100_000,
                                    description="Steps between ray.train.report calls.")
    shuffle_buffer_rows: int = Field(default=10_000, ge=1,
                                     description="Local shuffle buffer per worker.")
    tokenize_batch_size: int = Field(default=256, ge=1, description="Rows per tokenize call.")
    data_num_cpus: float = Field(default=0.25, gt=0, le=64,
                                 description="CPUs per Ray Data tokenize actor / task.")
    storage_path: str | None = Field(
        default=None, description="Ray Train storage (checkpoints); must be shared by all "
        "nodes (NFS path or s3://). Default RUN_DIR/train/{trial}/ray.")

    @field_validator("plain_template")
    @classmethod
    def _has_prompt(cls, v: str) -> str:
        if "{prompt}" not in v:
            raise ValueError("plain_template must contain {prompt}")
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        per_step = self.per_device_batch_size * self.num_workers
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of per_device_batch_size x "
                f"num_workers = {self.per_device_batch_size} x {self.num_workers}; change one "
                "of them (gradient accumulation = batch_size / (per_device x workers))")
        if self.max_length is not None and self.max_length_percentile is not None:
            raise ValueError("set max_length or max_length_percentile, not both")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError(
                "precision=fp16: GPU only (fp16 mixed precision needs CUDA); set use_gpu: true "
                "on a GPU cluster, or precision: auto to train on CPU")
        if self.deepspeed.enabled and not self.use_gpu and self.precision == "bf16":
            raise ValueError("deepspeed on CPU workers trains in fp32; set precision: auto "
                             "or fp32 (or use_gpu: true)")
        if self.qlora.enabled and self.deepspeed.enabled and self.deepspeed.stage == 3:
            raise ValueError("QLoRA with DeepSpeed ZeRO-3 is not supported; use stage 2")
        return self

    @property
    def grad_accum(self) -> int:
        return self.batch_size // (self.per_device_batch_size * self.num_workers)

    def name(self) -> str:
        """The trial folder name."""
        return self.trial_name or f"{self.dataset_size}-seed{self.seed}"


class TrainStageConfig(StrictModel):
    """A YAML file for ``craft-ray train``: common keys plus the ``train`` section."""

    run_dir: str = Field(default="runs/default", description="Run directory.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    train: TrainConfig
    sweep: dict[str, Any] | None = Field(
        default=None, description="The sweep section of a shared YAML (read by craft-ray "
        "sweep, ignored by craft-ray train).")


def check_resources(cfg: TrainConfig, gpu_available: bool | None = None) -> None:
    """Fail before any work when the config asks for what this setup cannot do."""
    if gpu_available is None:
        import torch

        gpu_available = torch.cuda.is_available()
    if cfg.use_gpu and not gpu_available:
        import ray

        if not ray.is_initialized() or not ray.cluster_resources().get("GPU"):
            raise ConfigError("train.use_gpu=true but the Ray cluster has no GPUs; set "
                              "train.use_gpu=false to train on CPU workers")
    if cfg.qlora.enabled and not cfg.use_gpu:
        logger.warning("qlora on CPU workers: bitsandbytes' CPU 4-bit path is slow; use it to "
                       "test a config on a small model, and use_gpu: true for real training")


def resume_key(cfg: TrainConfig) -> str:
    """Hash of the settings that change what is learned (names the Ray Train run)."""
    import hashlib

    data = cfg.model_dump(mode="json", exclude=_RESUME_NEUTRAL)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --- formatting and tokenisation (plain functions) -----------------------------------------


def load_tokenizer(path: str) -> Any:
    """The base model's tokenizer, with a pad token (EOS when the model has none).

    Padding positions are masked out of loss and attention by the collate function, so
    reusing EOS as pad never hides a real EOS from the loss.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"tokenizer of {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def resolve_template(cfg: TrainConfig, tokenizer: Any) -> str:
    """'chat' or 'plain' for this tokenizer; error if chat is asked of a template-less one."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if cfg.template == "chat" and not has_chat:
        raise ConfigError(f"train.template=chat but the tokenizer of {cfg.base_model} has no "
                          "chat template (a base model?); set train.template=plain")
    if cfg.template == "auto":
        return "chat" if has_chat else "plain"
    return cfg.template


def encode_example(tokenizer: Any, prompt: str, completion: str, *, template: str,
                   plain_template: str = "{prompt}\n", system_prompt: str | None = None
                   ) -> tuple[list[int], int]:
    """Token ids of prompt + completion + EOS, and the number of prompt tokens.

    The prompt and the completion are tokenised separately, so the boundary is exact: the
    first ``prompt_len`` ids are what the model is given at inference, the rest is the answer.
    """
    if template == "chat":
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
        prompt_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        prompt_ids = list(tokenizer(plain_template.format(prompt=prompt),
                                    add_special_tokens=False)["input_ids"])
        if tokenizer.bos_token_id is not None:
            prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids + completion_ids, len(prompt_ids)


def make_labels(input_ids: Sequence[int], prompt_len: int, loss_on: str) -> list[int]:
    """Labels for one example: prompt tokens are IGNORE_INDEX unless ``loss_on='full'``."""
    labels = list(input_ids)
    if loss_on == "completion":
        labels[:prompt_len] = [IGNORE_INDEX] * min(prompt_len, len(labels))
    return labels


def collate_batch(input_ids: Sequence[Sequence[int]], prompt_lens: Sequence[int], pad_id: int,
                  loss_on: str = "completion") -> dict[str, Any]:
    """Dynamic padding to the longest example of the batch (right padding).

    Returns torch tensors ``input_ids``, ``attention_mask`` and ``labels``; padded positions
    have attention 0 and label IGNORE_INDEX.
    """
    import torch

    n = len(input_ids)
    width = max(len(x) for x in input_ids)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, plen) in enumerate(zip(input_ids, prompt_lens)):
        k = len(row)
        ids[i, :k] = torch.from_numpy(np.array(row, dtype=np.int64))  # a writable copy
        mask[i, :k] = 1
        labels[i, :k] = torch.as_tensor(make_labels(list(map(int, row)), int(plen), loss_on))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _plain(v: Any) -> Any:
    """numpy / pandas cell -> plain Python (tasks expect lists, str, int)."""
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def get_training_pair_fn(task: str | dict[str, Any] | None, prompt_field: str,
                         completion_field: str) -> Callable[[dict[str, Any]], tuple[str, str]]:
    """``record -> (prompt, completion)``: the task's training_pair, or two columns."""
    if task is not None:
        from craft_ray.tasks import get_task

        return get_task(task).training_pair

    def pair(record: dict[str, Any]) -> tuple[str, str]:
        missing = [f for f in (prompt_field, completion_field) if f not in record]
        if missing:
            raise KeyError(f"row has no column(s) {missing}; set train.task or "
                           "train.prompt_field / train.completion_field")
        return str(record[prompt_field]), str(record[completion_field])

    return pair


class TokenizeRows:
    """Ray Data actor: task record -> (input_ids, prompt_len, length) or a reject reason."""

    def __init__(self, tokenizer_path: str, template: str, plain_template: str,
                 system_prompt: str | None, task: str | dict[str, Any] | None,
                 prompt_field: str, completion_field: str) -> None:
        self.tok = load_tokenizer(tokenizer_path)
        self.template = template
        self.plain_template = plain_template
        self.system_prompt = system_prompt
        self.pair = get_training_pair_fn(task, prompt_field, completion_field)

    def __call__(self, batch: Any) -> Any:
        import pandas as pd

        out: dict[str, list[Any]] = {"row": [], "input_ids": [], "prompt_len": [],
                                     "length": [], "reject_reason": []}
        for rec in batch.to_dict("records"):
            rec = {k: _plain(v) for k, v in rec.items()}
            out["row"].append(int(rec.pop(ROW_COLUMN, -1)))
            ids: list[int] = []
            plen, reason = 0, ""
            try:
                prompt, completion = self.pair(rec)
                if not str(completion).strip():
                    reason = "empty_completion"
                else:
                    ids, plen = encode_example(
                        self.tok, prompt, completion, template=self.template,
                        plain_template=self.plain_template, system_prompt=self.system_prompt)
            except Exception as exc:  # a bad row is rejected, never kills the stage
                reason = f"format_error: {type(exc).__name__}: {exc}"[:300]
            out["input_ids"].append(ids)
            out["prompt_len"].append(plen)
            out["length"].append(len(ids))
            out["reject_reason"].append(reason)
        return pd.DataFrame(out)


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    """Token-length statistics printed before training."""
    if len(lengths) == 0:
        return {"count": 0}
    q = np.percentile(lengths, [50, 90, 95, 99])
    return {"count": int(len(lengths)), "mean": round(float(lengths.mean()), 1),
            "min": int(lengths.min()), "p50": float(q[0]), "p90": float(q[1]),
            "p95": float(q[2]), "p99": float(q[3]), "max": int(lengths.max())}


def choose_max_length(cfg: TrainConfig, lengths: np.ndarray) -> int | None:
    """``max_length`` from the config, or the configured percentile of ``lengths``."""
    if cfg.max_length is not None:
        return cfg.max_length
    if cfg.max_length_percentile is not None and len(lengths):
        return int(math.ceil(float(np.percentile(lengths, cfg.max_length_percentile))))
    return None


def apply_max_length(input_ids: list[int], prompt_len: int, max_length: int | None,
                     overlong: str) -> tuple[list[int], int] | None:
    """Truncate (keeping the prompt boundary) or drop (None) an example over max_length."""
    if max_length is None or len(input_ids) <= max_length:
        return input_ids, prompt_len
    if overlong == "drop":
        return None
    return input_ids[:max_length], min(prompt_len, max_length)


# --- the training step (plain torch; run by each worker, tested with torch.distributed) -----


def token_loss_sum(logits: Any, labels: Any) -> Any:
    """Sum of next-token cross-entropy over positions whose label is not IGNORE_INDEX."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                           shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _dist_ready() -> bool:
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

    dist_on = _dist_ready()
    world = dist.get_world_size() if dist_on else 1
    counts = torch.zeros(2, dtype=torch.float64)
    for mb in micro_batches:
        counts[0] += (mb["labels"][:, 1:] != IGNORE_INDEX).sum()
        counts[1] += mb["attention_mask"].sum()
    if dist_on:
        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    n_label = max(float(counts[0]), 1.0)
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
            scaled = lsum * (world / n_label)
            if engine is not None:
                engine.set_gradient_accumulation_boundary(last)
                engine.backward(scaled, scale_wrt_gas=False)
                engine.step()  # an optimizer step only at the boundary
            else:
                scaled.backward()
        loss_sum += lsum.detach().double().cpu()
    grad_norm = float("nan")
    if engine is not None:
        norm = engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else grad_norm
    else:
        if max_grad_norm is not None:
            params = [p for p in model.parameters() if p.requires_grad]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if dist_on:
        loss_sum = loss_sum.to(device)
        dist.all_reduce(loss_sum)
        loss_sum = loss_sum.cpu()
    return {"loss": float(loss_sum) / n_label, "label_tokens": float(counts[0]),
            "tokens": float(counts[1]), "grad_norm": grad_norm}


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
    if _dist_ready():
        tot = tot.to(device)
        dist.all_reduce(tot)
        tot = tot.cpu()
    return float(tot[0] / tot[1]) if tot[1] > 0 else None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: LoRA fine-tune on this worker's shard of the Ray dataset.

    ``config``: ``train`` (TrainConfig as JSON), ``plan`` (steps per epoch, total steps),
    ``trial_dir`` (where rank 0 writes metrics.jsonl).
    """
    import ray.train
    import ray.train.torch
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = TrainConfig.model_validate(config["train"])
    plan = config["plan"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(torch_threads(cfg.cpus_per_worker or 1.0, cfg.torch_threads))
    on_gpu = cfg.use_gpu and torch.cuda.is_available()
    device = ray.train.torch.get_device()
    tokenizer = load_tokenizer(cfg.base_model)
    pad_id = int(tokenizer.pad_token_id)

    model = build_lora_model(cfg, device, on_gpu)
    state = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0}
    ckpt = ray.train.get_checkpoint()
    optim_state = None
    total_steps = plan["total_steps"]
    engine = None
    # the checkpoint folder stays open until the DeepSpeed engine exists (it restores from it)
    with contextlib.ExitStack() as stack:
        ckpt_dir = Path(stack.enter_context(ckpt.as_directory())) if ckpt is not None else None
        if ckpt_dir is not None:
            state = json.loads((ckpt_dir / CHECKPOINT_STATE).read_text())
            loaded = set_peft_model_state_dict(
                model, load_file(ckpt_dir / "adapter" / "adapter_model.safetensors"))
            if getattr(loaded, "unexpected_keys", None):
                raise RuntimeError(f"checkpoint {ckpt.path} does not match the LoRA model: "
                                   f"unexpected keys {loaded.unexpected_keys[:5]}")
            if (ckpt_dir / "optim.pt").is_file():
                # weights_only: never unpickle arbitrary objects from a run directory
                optim_state = torch.load(ckpt_dir / "optim.pt", map_location="cpu",
                                         weights_only=True)
            logger.info("rank %d: resuming from checkpoint at step %d (epoch %d)", rank,
                        state["global_step"], state["epoch"])
        if cfg.deepspeed.enabled:
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
            net = engine
            if legacy:  # written before checkpoints held DeepSpeed's state
                logger.warning("checkpoint %s has no DeepSpeed state (%s/): resuming with its "
                               "adapter weights and lr schedule, AdamW moments start from zero",
                               ckpt.path, DEEPSPEED_DIR)
            elif ckpt_dir is not None:
                load_deepspeed_state(engine, ckpt_dir)
        else:
            if not cfg.qlora.enabled:  # a 4-bit model is placed at load time and cannot move
                model.to(device)
            optimizer, scheduler = build_optimizer(cfg, model, total_steps)
            net = model
            if ctx.get_world_size() > 1:
                net = ray.train.torch.prepare_model(model, move_to_device=not cfg.qlora.enabled)
            if optim_state is not None and optim_state.get("optimizer") is not None:
                optimizer.load_state_dict(optim_state["optimizer"])
                if optim_state.get("scheduler") is not None:
                    scheduler.load_state_dict(optim_state["scheduler"])
    net.train()

    metrics_path = Path(config["trial_dir"]) / "metrics.jsonl"
    if rank == 0:
        _trim_metrics(metrics_path, state["global_step"])
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if config.get("has_eval") else None
    step = state["global_step"]
    stop_at = min(total_steps, cfg.stop_after_steps or total_steps)
    tokens_done, step_seconds, last_loss = 0.0, 0.0, float("nan")
    first_step_s: float | None = None

    def report(metrics: dict[str, Any], nxt: tuple[int, int], save: bool) -> None:
        """ray.train.report on every rank; with ``save`` rank 0 attaches a checkpoint."""
        if not save:
            ray.train.report(metrics)
            return
        # every rank: under ZeRO-3 gathering the LoRA weights is a collective
        weights = lora_state_dict(model, zero_stage_of(engine))
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_obj = None
            if engine is not None:
                # every rank writes its ZeRO shard to its own folder and reports it: Ray Train
                # merges the folders of all ranks into one checkpoint (same directory name)
                save_deepspeed_state(engine, Path(tmp))
                ckpt_obj = ray.train.Checkpoint.from_directory(tmp)
            if rank == 0:
                _save_checkpoint(Path(tmp), model, optimizer if engine is None else None,
                                 scheduler, {"epoch": nxt[0], "batch_in_epoch": nxt[1],
                                             "global_step": metrics["step"]}, tokenizer,
                                 state_dict=weights)
                ckpt_obj = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt_obj)

    # (epoch, batch) of the next optimizer step: what a checkpoint must resume from
    pos = (state["epoch"], state["batch_in_epoch"])
    for epoch in range(state["epoch"], cfg.epochs):
        if step >= stop_at:
            break
        skip = state["batch_in_epoch"] if epoch == state["epoch"] else 0
        batches = train_shard.iter_batches(
            batch_size=cfg.per_device_batch_size, batch_format="numpy",
            local_shuffle_buffer_size=min(cfg.shuffle_buffer_rows,
                                          max(plan["rows_per_worker"], 1)),
            local_shuffle_seed=cfg.seed * 1000 + epoch)
        groups = group(iter_micro_batches(batches, pad_id, cfg.loss_on), cfg.grad_accum)
        t_last = time.perf_counter()
        for gi, mbs in enumerate(groups):
            if gi < skip:
                t_last = time.perf_counter()
                continue  # trained before the checkpoint we resumed from
            out = train_step(net, mbs, optimizer, scheduler, device=device,
                             max_grad_norm=cfg.max_grad_norm, engine=engine)
            # wall time of the step including fetching and collating its batches
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            step += 1
            end_of_epoch = gi + 1 == plan["steps_per_epoch"]
            pos = (epoch + 1, 0) if end_of_epoch else (epoch, gi + 1)
            last_loss = out["loss"]
            if first_step_s is None:
                first_step_s = dt  # warm-up step: left out of the steady-state rate
            else:
                tokens_done += out["tokens"]
                step_seconds += dt
            lr = float(scheduler.get_last_lr()[0]) if scheduler is not None else cfg.learning_rate
            row = {"step": step, "epoch": epoch + (gi + 1) / plan["steps_per_epoch"],
                   "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
                   "tokens": out["tokens"], "tokens_per_s": out["tokens"] / dt, "step_s": dt}
            if rank == 0 and (step % cfg.log_every_steps == 0 or step == stop_at):
                with metrics_path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps({**row, "time": time.time()}) + "\n")
            if step >= stop_at:
                break  # the final report below checkpoints
            ckpt_now = end_of_epoch or (cfg.checkpoint_every_steps is not None
                                        and step % cfg.checkpoint_every_steps == 0)
            if ckpt_now or step % cfg.report_every_steps == 0:
                report(row, pos, ckpt_now)
                t_last = time.perf_counter()  # reporting/checkpointing is not a step
    eval_loss = _evaluate(net, eval_shard, cfg, pad_id, device)
    final = {"step": step, "loss": last_loss, "final": True,
             "tokens_per_s": tokens_done / step_seconds if step_seconds > 0 else float("nan"),
             "train_tokens": tokens_done, "train_seconds": step_seconds}
    if eval_loss is not None:
        final["eval_loss"] = eval_loss
    if rank == 0:
        with metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({**final, "time": time.time()}) + "\n")
    report(final, pos, True)


def _trim_metrics(path: Path, keep_upto_step: int) -> None:
    """On resume, drop metrics lines of steps after the checkpoint (they are redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not row.get("final") and row.get("step", 0) <= keep_upto_step:
            keep.append(line)
    path.write_text("".join(x + "\n" for x in keep), encoding="utf-8")


# --- data preparation (driver side; lazy Ray Data until the length statistics) --------------


def dataset_path(stage_cfg: TrainStageConfig) -> Path:
    cfg = stage_cfg.train
    if cfg.dataset_path:
        return Path(cfg.dataset_path.replace("{size}", cfg.dataset_size))
    return Path(stage_cfg.run_dir) / "filter" / "datasets" / cfg.dataset_size / "hf"


def _load_hf(path: Path, what: str) -> Any:
    import datasets

    if not path.exists():
        raise FileNotFoundError(
            f"{what} {path} does not exist; run `craft-ray filter` first or set "
            "train.dataset_path / train.eval_path to a datasets.save_to_disk folder")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise ConfigError(f"{what} {path} is not a datasets.save_to_disk folder: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError(f"{what} {path} is a DatasetDict without a 'train' split")
        ds = ds["train"]
    return ds


def split_rows(n: int, cfg: TrainConfig, has_eval_path: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row indices for training and for held-out eval (fixed ``data_seed``)."""
    rng = np.random.default_rng(cfg.data_seed)
    perm = rng.permutation(n)
    n_eval = 0
    if not has_eval_path and cfg.eval_fraction > 0:
        n_eval = min(max(1, int(round(cfg.eval_fraction * n))), n - 1)
    eval_idx, train_idx = perm[:n_eval], perm[n_eval:]
    if cfg.max_train_samples is not None and len(train_idx) > cfg.max_train_samples:
        train_idx = train_idx[: cfg.max_train_samples]
    return np.sort(train_idx), np.sort(eval_idx)


def tokenize_dataset(table: Any, cfg: TrainConfig, template: str) -> Any:
    """Lazy Ray Data plan: an Arrow table of task records -> tokenised rows.

    The table enters as blocks of ``tokenize_batch_size`` rows (no shuffle operator, whose
    1-CPU tasks could starve next to running Train workers in a sweep).
    """
    import ray.data

    if ROW_COLUMN not in table.column_names:
        import pyarrow as pa

        table = table.append_column(ROW_COLUMN, pa.array(range(table.num_rows), pa.int64()))
    step = cfg.tokenize_batch_size
    blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)]
    return ray.data.from_arrow(blocks).map_batches(
        TokenizeRows, batch_size=step, batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.data_num_cpus,
        fn_constructor_kwargs={
            "tokenizer_path": cfg.base_model, "template": template,
            "plain_template": cfg.plain_template, "system_prompt": cfg.system_prompt,
            "task": cfg.task, "prompt_field": cfg.prompt_field,
            "completion_field": cfg.completion_field})


def _finalise_rows(batch: Any, max_length: int | None, overlong: str) -> Any:
    """Ray Data UDF: apply max_length, keep only good rows, keep the training columns."""
    import pandas as pd

    ids, plens, lens = [], [], []
    for row_ids, plen, reason in zip(batch["input_ids"], batch["prompt_len"],
                                     batch["reject_reason"]):
        if reason:
            continue
        kept = apply_max_length(list(map(int, row_ids)), int(plen), max_length, overlong)
        if kept is None:
            continue
        ids.append(kept[0])
        plens.append(kept[1])
        lens.append(len(kept[0]))
    return pd.DataFrame({"input_ids": ids, "prompt_len": plens, "length": lens})


def prepare_datasets(stage_cfg: TrainStageConfig, trial_dir: Path, template: str
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load, split, tokenise; write length stats and rejects; return Ray datasets + stats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = stage_cfg.train
    src = dataset_path(stage_cfg)
    hf = _load_hf(src, "train dataset")
    if len(hf) < 2:
        raise ConfigError(f"train dataset {src} has {len(hf)} rows; need at least 2")
    train_idx, eval_idx = split_rows(len(hf), cfg, cfg.eval_path is not None)
    table = hf.select(train_idx).flatten_indices().data.table  # row i = source train_idx[i]
    eval_table = None
    if cfg.eval_path:
        eval_table = _load_hf(Path(cfg.eval_path), "eval dataset").flatten_indices().data.table
    elif len(eval_idx):
        eval_table = hf.select(eval_idx).flatten_indices().data.table

    tok_train = tokenize_dataset(pa.table(table), cfg, template).materialize()
    meta = tok_train.select_columns(["row", "length", "reject_reason"]).to_pandas()
    bad = meta["reject_reason"] != ""
    good_lengths = meta.loc[~bad, "length"].to_numpy()
    if len(good_lengths) == 0:
        raise ConfigError(f"train dataset {src}: every row was rejected; first reason: "
                          f"{meta['reject_reason'].iloc[0]}")
    max_length = choose_max_length(cfg, good_lengths)
    over = int((good_lengths > max_length).sum()) if max_length else 0
    stats = {"rows_in": int(len(hf)), "train_rows_selected": int(len(train_idx)),
             "eval_rows": 0, "lengths": length_stats(good_lengths), "max_length": max_length,
             "overlong": over, "overlong_action": cfg.overlong,
             "rejects": dict(Counter(r.split(":")[0] for r in meta.loc[bad, "reject_reason"]))}
    logger.info("train: sequence lengths (tokens) %s; max_length=%s, %d over it (%s)",
                json.dumps(stats["lengths"]), max_length, over, cfg.overlong)
    if bad.any():
        rej = meta.loc[bad, ["row", "reject_reason"]].reset_index(drop=True)
        rej["row"] = train_idx[rej["row"].to_numpy()]  # position in the source dataset
        tmp = tmp_path_for(trial_dir / "rejects.parquet")
        pq.write_table(pa.Table.from_pandas(rej, preserve_index=False), tmp)
        os.replace(tmp, trial_dir / "rejects.parquet")
        logger.warning("train: %d rows rejected (%s); see %s", int(bad.sum()),
                       stats["rejects"], trial_dir / "rejects.parquet")
    datasets = {"train": tok_train.map_batches(
        _finalise_rows, batch_format="pandas", batch_size=None, num_cpus=cfg.data_num_cpus,
        fn_kwargs={"max_length": max_length, "overlong": cfg.overlong}).materialize()}
    stats["train_rows"] = datasets["train"].count()
    if eval_table is not None:
        datasets["eval"] = tokenize_dataset(pa.table(eval_table), cfg, template).map_batches(
            _finalise_rows, batch_format="pandas", batch_size=None, num_cpus=cfg.data_num_cpus,
            fn_kwargs={"max_length": max_length, "overlong": "truncate"}).materialize()
        stats["eval_rows"] = datasets["eval"].count()
    atomic_write_json(trial_dir / "length_stats.json", stats)
    return datasets, stats


def make_plan(cfg: TrainConfig, train_rows: int) -> dict[str, int]:
    """Steps per epoch and in total; every worker does the same number of steps.

    Ray Train's split gives every worker ``floor(rows / workers)`` rows (equal split).
    """
    rows_per_worker = train_rows // cfg.num_workers
    if rows_per_worker < 1:
        raise ConfigError(f"train: {train_rows} training rows for {cfg.num_workers} workers; "
                          "need at least one row per worker")
    micro = math.ceil(rows_per_worker / cfg.per_device_batch_size)
    steps_per_epoch = math.ceil(micro / cfg.grad_accum)
    return {"rows_per_worker": rows_per_worker, "micro_batches_per_epoch": micro,
            "steps_per_epoch": steps_per_epoch, "total_steps": steps_per_epoch * cfg.epochs,
            "grad_accum": cfg.grad_accum}


# --- the stage -----------------------------------------------------------------------------


def build_trainer(stage_cfg: TrainStageConfig, datasets: dict[str, Any], plan: dict[str, int],
                  trial_dir: Path, callbacks: list[Any] | None = None) -> Any:
    """The TorchTrainer of one fine-tune (gloo on CPU, NCCL on GPU)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = stage_cfg.train
    cfg = cfg.model_copy(update={"cpus_per_worker": actor_cpus(  # workers read it too
        cfg.cpus_per_worker, cfg.num_workers, float(cfg.use_gpu))})
    storage = cfg.storage_path or str((trial_dir / "ray").resolve())
    resources = {"CPU": cfg.cpus_per_worker}  # resolved by the driver (actor_cpus)
    if cfg.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(mode="json"), "plan": plan,
                           "trial_dir": str(trial_dir.resolve()),
                           "has_eval": "eval" in datasets},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers,
                                               use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"{cfg.name()}-{resume_key(cfg)}", storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.num_checkpoints_to_keep),
            callbacks=callbacks or None),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
    )


def trial_dir_of(stage_cfg: TrainStageConfig) -> Path:
    return Path(stage_cfg.run_dir) / "train" / stage_cfg.train.name()


def run_train(stage_cfg: TrainStageConfig, *, force: bool = False,
              callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Fine-tune one LoRA adapter (Ray must be initialised). Returns the trial's stats.

    A finished trial with the same config is not redone (unless ``force``); an unfinished one
    resumes from its last Ray Train checkpoint.
    """
    cfg = stage_cfg.train
    check_resources(cfg)
    trial_dir = trial_dir_of(stage_cfg)
    stage = StageDir(trial_dir.parent, trial_dir.name)
    if not force and stage.is_complete(cfg):
        logger.info("train: %s already complete (same config); skipping", trial_dir)
        return {**json.loads((trial_dir / "stats.json").read_text()), "skipped": True}
    if force:
        shutil.rmtree(trial_dir, ignore_errors=True)
    stage.begin(cfg)
    tokenizer = load_tokenizer(cfg.base_model)
    template = resolve_template(cfg, tokenizer)
    stats = StageStats("train")
    datasets, data_stats = prepare_datasets(stage_cfg, trial_dir, template)
    plan = make_plan(cfg, data_stats["train_rows"])
    logger.info("train %s: %d rows, %d workers x batch %d x accumulation %d = %d; "
                "%d steps/epoch, %d steps", cfg.name(), data_stats["train_rows"],
                cfg.num_workers, cfg.per_device_batch_size, cfg.grad_accum, cfg.batch_size,
                plan["steps_per_epoch"], plan["total_steps"])
    trainer = build_trainer(stage_cfg, datasets, plan, trial_dir, callbacks)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    final = dict(result.metrics or {})
    finished = final.get("step", 0) >= plan["total_steps"]
    adapter_dir = trial_dir / "adapter" if finished else trial_dir / "adapter_partial"
    tmp = tmp_path_for(adapter_dir)
    result.checkpoint.to_directory(str(tmp))
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.replace(tmp / "adapter", adapter_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    stats.rows_in = data_stats["rows_in"]
    stats.rows_out = data_stats["train_rows"]
    stats.rejects.update(data_stats["rejects"])
    stats.extra.update({
        "trial": cfg.name(), "seed": cfg.seed, "dataset_size": cfg.dataset_size,
        "adapter": str(adapter_dir.resolve()), "finished": finished,
        "steps": final.get("step"), "total_steps": plan["total_steps"],
        "train_loss": final.get("loss"), "eval_loss": final.get("eval_loss"),
        "tokens_per_s": final.get("tokens_per_s"), "max_length": data_stats["max_length"],
        "eval_rows": data_stats["eval_rows"], "checkpoint": result.checkpoint.path,
    })
    if finished:
        return stage.finish(cfg, stats)
    data = stats.finish()
    atomic_write_json(trial_dir / "stats.json", data)
    logger.info("train %s: stopped after %s of %d steps; rerun to resume (partial adapter "
                "in %s)", cfg.name(), final.get("step"), plan["total_steps"], adapter_dir)
    return data


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
    tmp = tmp_path_for(out_dir)
    merged.save_pretrained(tmp)
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(str(tok_src)).save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    logger.info("merged %s into %s -> %s", adapter_dir, base, out_dir)
    return out_dir
