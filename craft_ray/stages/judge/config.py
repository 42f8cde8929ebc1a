"""Config of the judge stage."""

from __future__ import annotations

from pydantic import Field

from craft_ray.config import RayConfig, StrictModel
from craft_ray.judging import JUDGE_TEMPLATE, JudgeModelConfig


class JudgeConfig(StrictModel):
    """Config of ``craft-ray judge``: win rate of predictions against references."""

    name: str = Field(default="judge", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Output folder name under RUN_DIR/evaluate/judge.")
    input_path: str = Field(
        min_length=1,
        description="Per-item predictions (.jsonl or .parquet) with an instruction, the model's "
        "prediction and the reference (CRAFT's evaluation output format).")
    instruction_field: str = Field(default="instruction", min_length=1,
                                   description="Column of the instruction.")
    prediction_field: str = Field(default="prediction", min_length=1,
                                  description="Column of the model's output.")
    reference_field: str = Field(default="reference", min_length=1,
                                 description="Column of the reference output.")
    limit: int | None = Field(default=None, ge=1, description="Judge only the first N items.")
    seed: int = Field(default=1234, ge=0, le=2**31 - 1,
                      description="Seed of the random order swap (CRAFT: 1234).")
    template: str = Field(default=JUDGE_TEMPLATE, min_length=1,
                          description="Judge prompt with {instruction}, {output_1}, {output_2}.")
    judge: JudgeModelConfig = Field(description="The judge model and its backend.")
    output_dir: str | None = Field(default=None, description="Default RUN_DIR/evaluate/judge.")


class JudgeStageConfig(StrictModel):
    """A YAML file for ``craft-ray judge``: common keys plus the ``judge`` section."""

    run_dir: str = Field(default="runs/default", description="Run directory.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    judge: JudgeConfig
