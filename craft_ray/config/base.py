"""Base models shared by every config section: StrictModel, RayConfig, ConfigError; hashing and
dumping.
"""

from __future__ import annotations

import hashlib
import json

import yaml
from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and how to fix it."""


class RayConfig(StrictModel):
    """Where Ray runs. Embedded (a local Ray started in-process) unless an address is given."""

    address: str | None = Field(
        default=None,
        description="Ray cluster address ('auto', 'ray://host:10001', 'host:6379'). Empty: use "
        "RAY_ADDRESS if set, else start an embedded local Ray.",
    )
    num_cpus: int | None = Field(
        default=None, ge=1, description="CPUs of the embedded local Ray (default: all)."
    )
    num_gpus: int | None = Field(
        default=None, ge=0, description="GPUs of the embedded local Ray (default: detected)."
    )
    log_to_driver: bool = Field(
        default=True, description="Stream worker logs to the driver's terminal."
    )


def config_hash(cfg: BaseModel) -> str:
    """Stable hash of a resolved config; equal configs give equal hashes across runs."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dump_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML (what is written next to a stage's outputs)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
