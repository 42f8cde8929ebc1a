"""The ``craft-ray`` command line: one subcommand per stage, each a few lines over the library.

- :mod:`.common`: the Typer apps, shared options, global flags, user errors and summaries;
- :mod:`.stages`: ``run`` and one command per stage, plus merge, aggregate, report, export-h5;
- :mod:`.start`: ``demo``, ``init``, ``config show`` / ``config validate``;
- :mod:`.retrieval`: ``eval-retrieval``, ``mine-negatives``, ``train-retriever``;
- :mod:`.bench`: ``craft-ray bench …``.
"""

from __future__ import annotations

# Registration order is the order of `craft-ray --help`: getting started first.
# isort: off
from craft_ray.cli import start  # noqa: F401
from craft_ray.cli import stages  # noqa: F401
from craft_ray.cli import retrieval  # noqa: F401
from craft_ray.cli import bench  # noqa: F401
# isort: on
from craft_ray.cli.common import app, user_error_in, user_errors

__all__ = ["app", "user_error_in", "user_errors"]
