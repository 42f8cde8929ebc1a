"""The train stage: LoRA/QLoRA fine-tuning with Ray Train."""

from craft_ray.stages.train.config import (
    TrainConfig,
    TrainStageConfig,
    check_resources,
    dataset_path,
)
from craft_ray.stages.train.lora import merge_adapter
from craft_ray.stages.train.stage import run_train, trial_dir_of

__all__ = [
    "TrainConfig",
    "TrainStageConfig",
    "check_resources",
    "dataset_path",
    "merge_adapter",
    "run_train",
    "trial_dir_of",
]
