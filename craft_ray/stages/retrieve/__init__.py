"""The retrieve stage: the corpus documents most similar to the few-shots."""

from craft_ray.stages.retrieve.actors import StoreSearcher, search_store
from craft_ray.stages.retrieve.config import RetrieveConfig, RetrieveError, RetrieveStageConfig
from craft_ray.stages.retrieve.ranking import ranked_lists
from craft_ray.stages.retrieve.scan import cache_file
from craft_ray.stages.retrieve.stage import prepare_retrieve, run_retrieve

__all__ = [
    "RetrieveConfig",
    "RetrieveError",
    "RetrieveStageConfig",
    "StoreSearcher",
    "cache_file",
    "prepare_retrieve",
    "ranked_lists",
    "run_retrieve",
    "search_store",
]
