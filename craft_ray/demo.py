"""The offline demo: the whole pipeline on this machine, with nothing from a hub.

It uses the bundled StackExchange dumps, the offline MiniLM embedder, CRAFT's MedQA few-shots,
and a tiny random-init causal LM built here as generator and as LoRA base. That generator is
untrained: its samples are schema-valid (guided decoding) but meaningless, so the demo
exercises the pipeline, it does not produce a useful dataset. For a real model change
``generate.model`` (and ``train.base_model``) — see ``configs/medqa.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import craft_ray

DEMO_CONFIG = "configs/demo.yaml"


def project_root() -> Path:
    """The source checkout holding ``configs/`` and ``data/`` (the demo runs from there)."""
    return Path(craft_ray.__file__).resolve().parents[1]


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
    default = str((project_root() / "runs" / "demo").resolve())
    run_dir = str(Path(cfg.run_dir).resolve())
    if cfg.evaluate is None or run_dir == default:
        return cfg
    data = cfg.model_dump(mode="json")
    for spec in data["evaluate"]["models"]:
        adapter = spec.get("adapter")
        if adapter:
            a = str(Path(adapter) if Path(adapter).is_absolute() else project_root() / adapter)
            if a.startswith(default + "/"):
                spec["adapter"] = run_dir + a[len(default):]
    return type(cfg).model_validate(data)
