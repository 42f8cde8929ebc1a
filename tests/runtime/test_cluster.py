"""The embedded local Ray: its workers import ray.preload_modules as they start."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys, ray
from craft_ray.config import RayConfig
from craft_ray.runtime import init_ray

@ray.remote(num_cpus=0)
def preloaded():
    return "craft_ray.tasks.quality" in sys.modules

for modules in (["craft_ray.tasks.quality"], []):
    init_ray(RayConfig(num_cpus=1, log_to_driver=False, preload_modules=modules))
    print(modules, ray.get(preloaded.remote()), flush=True)
    ray.shutdown()
"""


def test_workers_of_the_embedded_ray_preload_the_configured_modules():
    """A module named in ray.preload_modules is in a fresh worker's sys.modules before any
    task imports it; with [] it is not (a module no worker imports on its own)."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("[")]
    assert lines == ["['craft_ray.tasks.quality'] True", "[] False"], out.stdout
