"""The filter stage: leakage, decontamination, dedup and an optional judge; train/eval datasets
out.
"""

from craft_ray.stages.filter.config import FilterConfig, FilterStageConfig
from craft_ray.stages.filter.stage import run_filter, too_few_message

__all__ = ["FilterConfig", "FilterStageConfig", "run_filter", "too_few_message"]
