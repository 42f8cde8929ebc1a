"""Retrieval tools beside the pipeline: evaluation on BEIR-style sets and hard-negative mining."""
