"""The offline demo: the whole pipeline on this machine, with nothing from a hub.

It uses the bundled StackExchange dumps, the offline MiniLM embedder, CRAFT's MedQA few-shots,
and a tiny random-init causal LM built here as generator and as LoRA base. That generator is
untrained: its samples are schema-valid (guided decoding) but meaningless, so the demo
exercises the pipeline, it does not produce a useful dataset. For a real model change
``generate.model`` (and ``train.base_model``) — see ``configs/medqa.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from craft_ray.bundled import DEMO_CONFIG, bundled_path, resolve_bundled_paths
from craft_ray.config import (
    absolutize_paths,
    apply_overrides,
    read_yaml,
    validate,
)


def load_demo_config(overrides: Sequence[str] = ()) -> Any:
    """The bundled ``configs/demo.yaml`` plus overrides, validated.

    Its ``data/...`` paths point at the bundled data (wherever the package is installed);
    every other relative path (``run_dir``, the models and adapters under ``runs/demo``) is
    taken from the working directory, so the demo writes ``./runs/demo`` where it is run.
    """
    from craft_ray.pipeline import PipelineConfig

    path = bundled_path(DEMO_CONFIG)
    data = apply_overrides(read_yaml(path), overrides)
    data = absolutize_paths(resolve_bundled_paths(data))
    return validate(PipelineConfig, data, str(path))


def prepare_demo_models(generator: str, base_model: str) -> list[Path]:
    """Build the tiny offline model(s) the demo config points at, if missing."""
    from craft_ray.models.tiny import build_tiny_causal_lm

    built = []
    for path in dict.fromkeys([generator, base_model]):
        p = Path(path)
        if not p.is_absolute():
            p = Path.cwd() / p
        built.append(build_tiny_causal_lm(p))
    return built


def demo_with_run_dir(cfg: Any) -> Any:
    """Point the demo's evaluation at the adapter of *this* run directory.

    ``configs/demo.yaml`` names ``runs/demo/train/...``; with ``--set run_dir=...`` the adapter
    is trained elsewhere, so adapter paths under the default run directory follow it.
    """
    default = str((Path.cwd() / "runs" / "demo").resolve())
    run_dir = str(Path(cfg.run_dir).resolve())
    if cfg.evaluate is None or run_dir == default:
        return cfg
    data = cfg.model_dump(mode="json")
    for spec in data["evaluate"]["models"]:
        adapter = spec.get("adapter")
        if adapter:
            a = str(Path(adapter) if Path(adapter).is_absolute() else Path.cwd() / adapter)
            if a.startswith(default + "/"):
                spec["adapter"] = run_dir + a[len(default):]
    return type(cfg).model_validate(data)
