"""The files that ship with craft-ray: example configs, CRAFT's few-shots, the demo's corpora and
eval slice, and the starter of ``craft-ray init``.

In a source checkout they are the repo's ``configs/`` and ``data/`` (the one source of truth);
a wheel carries copies of both under ``craft_ray/_bundled/`` (made by ``setup.py`` at build
time). :func:`bundled_root` finds whichever exists, so the demo and ``init`` work from an
installed wheel in any directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import craft_ray
from craft_ray.config import PATH_KEYS, ConfigError

DEMO_CONFIG = "configs/demo.yaml"
STARTER_CONFIG = "configs/starter.yaml"
STARTER_FEWSHOTS = "data/starter/fewshots.jsonl"
STARTER_EVAL = "data/starter/eval.jsonl"
# Strings of the starter config that `init` rewrites for the new task.
_STARTER_RUN_DIR = "runs/starter"
_STARTER_CORPUS = "data/stackexchange"


def bundled_root() -> Path:
    """The folder holding ``configs/`` and ``data/``: the wheel's copy, else the checkout."""
    pkg = Path(craft_ray.__file__).resolve().parent
    for root in (pkg / "_bundled", pkg.parent):
        if (root / "configs").is_dir() and (root / "data").is_dir():
            return root
    raise FileNotFoundError(
        f"craft-ray's bundled configs/ and data/ are neither in {pkg / '_bundled'} (a wheel) "
        f"nor in {pkg.parent} (a source checkout); reinstall the package (pip install craft-ray)"
    )


def bundled_path(rel: str) -> Path:
    """A bundled file or folder, e.g. ``bundled_path('data/fewshots/medqa.jsonl')``."""
    p = bundled_root() / rel
    if not p.exists():
        raise FileNotFoundError(f"bundled file {rel} not found under {bundled_root()}")
    return p


def resolve_bundled_paths(data: Any, _key: str | None = None) -> Any:
    """Point relative path values that name a bundled file (``data/...``) at the bundled copy.

    Other relative paths (``runs/demo/...``) are left alone: the caller resolves them against
    the working directory, where the run's outputs go.
    """
    if isinstance(data, dict):
        return {k: resolve_bundled_paths(v, k) for k, v in data.items()}
    if isinstance(data, list):
        return [resolve_bundled_paths(v, _key) for v in data]
    if (isinstance(data, str) and _key in PATH_KEYS and _key != "run_dir" and data
            and not Path(data).is_absolute() and "://" not in data
            and (data.startswith("data/") or data.startswith("configs/"))):
        p = bundled_root() / data
        if p.exists():
            return str(p)
    return data


def init_task(name: str, dest: Path | None = None) -> list[Path]:
    """``craft-ray init NAME``: write ``NAME.yaml``, ``NAME.fewshots.jsonl`` and
    ``NAME.eval.jsonl`` (a held-out custom eval set) into ``dest``.

    The config is the bundled starter (a custom FAQ task over the bundled StackExchange dumps)
    with its few-shot and eval paths, run directory and corpus pointed at the new files and
    the installed data; nothing is overwritten.
    """
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"task name {name!r}: use letters, digits, '_', '-', '.'")
    dest = Path(dest or Path.cwd())
    config, fewshots = dest / f"{name}.yaml", dest / f"{name}.fewshots.jsonl"
    evalset = dest / f"{name}.eval.jsonl"
    for p in (config, fewshots, evalset):
        if p.exists():
            raise ConfigError(f"{p} already exists; pick another name or remove it")
    text = bundled_path(STARTER_CONFIG).read_text(encoding="utf-8")
    text = (text.replace(STARTER_FEWSHOTS, fewshots.name)
            .replace(STARTER_EVAL, evalset.name)
            .replace(_STARTER_RUN_DIR, f"runs/{name}")
            .replace(f"[{_STARTER_CORPUS}]", json.dumps([str(bundled_path(_STARTER_CORPUS))]))
            .replace(STARTER_CONFIG, config.name))
    dest.mkdir(parents=True, exist_ok=True)
    config.write_text(text, encoding="utf-8")
    for src, dst in ((STARTER_FEWSHOTS, fewshots), (STARTER_EVAL, evalset)):
        dst.write_text(bundled_path(src).read_text(encoding="utf-8"), encoding="utf-8")
    return [config, fewshots, evalset]
