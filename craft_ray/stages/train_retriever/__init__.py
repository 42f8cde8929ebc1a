"""The train-retriever stage: fine-tune the embedder LLM-Embedder style on Ray Train."""

from craft_ray.stages.train_retriever.config import TrainRetrieverConfig
from craft_ray.stages.train_retriever.data import RetrieverDataError
from craft_ray.stages.train_retriever.stage import run_train_retriever

__all__ = ["RetrieverDataError", "TrainRetrieverConfig", "run_train_retriever"]
