"""Runtime: Ray connection, stage directories and markers, retry-safe file writes."""

from craft_ray.runtime.cluster import (
    ClusterUnreachableError,
    check_reachable,
    init_ray,
    quiet_ray_data,
)
from craft_ray.runtime.files import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    tmp_path_for,
)
from craft_ray.runtime.stagedir import (
    SUCCESS,
    StageDir,
    StageStats,
)

__all__ = [
    "atomic_path",
    "ClusterUnreachableError",
    "SUCCESS",
    "StageDir",
    "StageStats",
    "atomic_write_json",
    "atomic_write_text",
    "check_reachable",
    "init_ray",
    "quiet_ray_data",
    "tmp_path_for",
]
