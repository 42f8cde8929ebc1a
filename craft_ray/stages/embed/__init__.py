"""The embed stage: corpus shards -> normalised embeddings in the store."""

from craft_ray.stages.embed.config import EmbedConfig, EmbedStageConfig
from craft_ray.stages.embed.stage import preflight, run_embed

__all__ = ["EmbedConfig", "EmbedStageConfig", "preflight", "run_embed"]
