"""Build hook: the wheel carries the repo's ``configs/`` and ``data/`` as package data.

The repo's ``configs/`` and ``data/`` are the one source of truth; building a wheel copies them
into ``craft_ray/_bundled/`` inside the wheel (never into the source tree), so an installed
``craft-ray demo`` / ``craft-ray init`` find them wherever the package lives. A source checkout
(editable install or ``PYTHONPATH``) reads them in place (``craft_ray.bundled``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
BUNDLED = ("configs", "data")


class BuildPyWithBundled(build_py):
    """``build_py`` plus a copy of ``configs/`` and ``data/`` under ``craft_ray/_bundled``."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout itself
            return
        target = Path(self.build_lib) / "craft_ray" / "_bundled"
        for name in BUNDLED:
            src = HERE / name
            if not src.is_dir():
                raise SystemExit(f"cannot build craft-ray: {src} is missing (the wheel ships it)")
            dst = target / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithBundled})
