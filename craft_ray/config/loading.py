"""Typed configuration: pydantic models validated on load, YAML files, dotted overrides.

Every stage has its own config model in its own module (``EmbedConfig`` in ``embed.py``...).
A YAML file holds the common keys (``run_dir``, ``ray``) and one section per stage; each
``craft-ray STAGE`` command reads the common keys and its own section, so one file can drive
one stage or the whole pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from craft_ray.config.base import ConfigError

M = TypeVar("M", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (``3`` -> int, ``[a, b]`` -> list)."""
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} is not of the form key=value (e.g. --set embed.batch_size=256)"
        )
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key part; write e.g. embed.batch_size=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each dotted ``key=value`` override set.

    A numeric part indexes a list: ``embed.corpora.0.paths=[data/c4]``.
    """
    data = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for item in overrides:
        path, value = parse_override(item)
        node: Any = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            where = ".".join(path[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"override {item!r}: {where} is not an index of a list of {len(node)}")
                key: Any = int(part)
            elif isinstance(node, dict):
                key = part
            else:
                raise ConfigError(f"override {item!r}: {'.'.join(path[:i])} is not a mapping")
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return data


# Keys whose values are filesystem paths (or hub ids). Relative ones are resolved against the
# directory the command runs in, because Ray workers (Ray Train's above all) run elsewhere.
PATH_KEYS = frozenset({
    "run_dir", "path", "paths", "model", "base_model", "tokenizer", "adapter", "store",
    "store_dir", "input", "input_path", "dataset_path", "eval_path", "output_dir",
    "storage_path", "doc_texts",
})


def absolutize_paths(data: Any, base: str | Path | None = None, *, _key: str | None = None
                     ) -> Any:
    """Make the relative paths in plain config data absolute (``base``: default cwd).

    ``run_dir`` always (it may not exist yet); any other path key when it looks local (see
    below), so hub ids such as ``mistralai/Mistral-7B-v0.1`` are left alone. URIs
    (``s3://...``) are left as they are.
    """
    base_p = Path(base) if base is not None else Path.cwd()
    if isinstance(data, dict):
        return {k: absolutize_paths(v, base_p, _key=k) for k, v in data.items()}
    if isinstance(data, list):
        return [absolutize_paths(v, base_p, _key=_key) for v in data]
    if isinstance(data, str) and _key in PATH_KEYS and data and "://" not in data:
        p = Path(data).expanduser()
        if p.is_absolute():
            return str(p)
        # Local-looking: exists, starts with ./ or ../, or its first folder exists here (e.g.
        # runs/demo/train/.../adapter before training made it). A hub id such as
        # mistralai/Mistral-7B-v0.1 has no such folder and is left alone.
        local = (_key == "run_dir" or data.startswith(("./", "../")) or (base_p / p).exists()
                 or (len(p.parts) > 1 and (base_p / p.parts[0]).is_dir()))
        if local:
            return str((base_p / p).resolve())
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One readable message: every failing key with what was expected."""
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            section = str(err["loc"][0]) if len(err["loc"]) > 1 else ""
            msg = ("unknown key (typo?); `craft-ray config show"
                   f"{' ' + section if section in STAGE_SECTIONS else ''}` lists the allowed keys")
        got = err.get("input")
        got_s = "" if err["type"] == "extra_forbidden" else f" (got {got!r})"
        if len(got_s) > 120:
            got_s = got_s[:117] + "...)"
        lines.append(f"  {loc}: {msg}{got_s}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping is a :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist (pass --config PATH to a YAML file)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def validate(model: type[M], data: dict[str, Any], source: str) -> M:
    """Validate ``data`` against ``model``; errors become one :class:`ConfigError`. A storage
    URI carrying credentials is refused first (pydantic's errors would echo the input)."""
    refuse_credentials_in_uris(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


# The sections of a whole-pipeline YAML; a single stage's command ignores the others.
STAGE_SECTIONS = frozenset({"embed", "retrieve", "generate", "filter", "train", "sweep",
                            "evaluate"})


def load_config(
    model: type[M], path: str | Path | None = None, overrides: Sequence[str] = (),
    *, absolute_paths: bool = False,
) -> M:
    """Load ``model`` from a YAML file (optional) plus dotted overrides, validated.

    ``absolute_paths`` resolves relative local paths against the working directory (see
    :func:`absolutize_paths`); the CLI does this so the config can travel to Ray workers.
    """
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    # One YAML can drive every stage: the sections of *other* stages are not this model's
    # business (a misspelt section name is still an unknown key).
    data = {k: v for k, v in data.items()
            if k not in STAGE_SECTIONS or k in model.model_fields}
    if absolute_paths:
        data = absolutize_paths(data)
    refuse_credentials_in_uris(data)
    return validate(model, data, str(path) if path else "<overrides>")


def refuse_credentials_in_uris(data: Any) -> None:
    """A URI in a config must not carry credentials (``s3://KEY:SECRET@bucket``): configs are
    written next to every stage's outputs and shipped to Ray workers. Raises ConfigError."""
    from craft_ray.runtime.storage import check_no_credentials

    if isinstance(data, dict):
        for value in data.values():
            refuse_credentials_in_uris(value)
    elif isinstance(data, list):
        for value in data:
            refuse_credentials_in_uris(value)
    elif isinstance(data, str) and "://" in data:
        check_no_credentials(data)
