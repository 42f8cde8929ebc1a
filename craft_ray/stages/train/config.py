"""Config of the train stage (LoRA, QLoRA, DeepSpeed settings) and checks on it."""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from craft_ray.config import ConfigError, RayConfig, StrictModel

logger = logging.getLogger(__name__)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

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
        description="CPUs per worker (default: an equal share of the cluster's CPUs minus 1 "
        "left to the data tasks, lowered until the workers fit the nodes; 1 with a GPU). "
        "Torch threads: the share of the cores. Workers that cannot fit fail before work.")
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

# --- data preparation (driver side; lazy Ray Data until the length statistics) --------------


def dataset_path(stage_cfg: TrainStageConfig) -> str:
    """The training set's folder (a local path or an object-store URI)."""
    from craft_ray.runtime import storage

    cfg = stage_cfg.train
    if cfg.dataset_path:
        return cfg.dataset_path.replace("{size}", cfg.dataset_size)
    return storage.join(stage_cfg.run_dir, "filter", "datasets", cfg.dataset_size, "hf")
