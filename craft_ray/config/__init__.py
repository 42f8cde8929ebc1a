"""Config: typed sections (StrictModel, RayConfig), YAML loading, dotted overrides, validation."""

from craft_ray.config.base import (
    ConfigError,
    RayConfig,
    StrictModel,
    config_hash,
    dump_yaml,
)
from craft_ray.config.loading import (
    PATH_KEYS,
    STAGE_SECTIONS,
    M,
    absolutize_paths,
    apply_overrides,
    format_validation_error,
    load_config,
    parse_override,
    read_yaml,
    refuse_credentials_in_uris,
    validate,
)

__all__ = [
    "ConfigError",
    "M",
    "PATH_KEYS",
    "RayConfig",
    "STAGE_SECTIONS",
    "StrictModel",
    "absolutize_paths",
    "refuse_credentials_in_uris",
    "apply_overrides",
    "config_hash",
    "dump_yaml",
    "format_validation_error",
    "load_config",
    "parse_override",
    "read_yaml",
    "validate",
]
