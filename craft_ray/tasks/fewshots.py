"""Few-shot files: CRAFT's jsonl (``Text``, ``Instruction``, ``Output``) or any jsonl.

Every few-shot gets a stable id ``{file stem}:{line}`` (0-based line number in the file, blank
lines counted), used as provenance by retrieval and generation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from craft_ray.config import StrictModel

CRAFT_TEMPLATE = "Text: {Text}\n\nInstruction: {Instruction}\n\nOutput: {Output}"


class FewShotError(ValueError):
    """A few-shot file is missing, empty, or lacks the configured fields."""


class FewShotConfig(StrictModel):
    """Where the few-shots are and how they read."""

    path: str = Field(description="jsonl file of few-shots (CRAFT: Text, Instruction, Output).")
    text_field: str = Field(default="Text", description="Field with the source text.")
    instruction_field: str = Field(default="Instruction", description="Field with the task.")
    output_field: str = Field(default="Output", description="Field with the answer.")
    embed_template: str = Field(
        default=CRAFT_TEMPLATE,
        description="How a few-shot is written out for embedding; {Field} names any field of "
        "the record (CRAFT: 'Text: ...\\n\\nInstruction: ...\\n\\nOutput: ...').",
    )
    limit: int | None = Field(
        default=None, ge=1, description="Use only the first N few-shots (CRAFT: 8 or 32)."
    )


@dataclass(frozen=True)
class FewShot:
    """One few-shot with its stable id and the original record."""

    id: str
    text: str
    instruction: str
    output: str
    record: dict[str, Any] = field(default_factory=dict)


def read_json_lines(path: str | Path, base_dir: str | Path | None, error: type[Exception],
                    label: str) -> Iterator[tuple[int, Any]]:
    """``(line index, parsed JSON)`` of each non-blank line of a jsonl file.

    A relative ``path`` is taken from ``base_dir``; a missing file or a line that is not JSON
    raises ``error`` with ``label`` (e.g. ``"few-shot file"``) and the line number.
    """
    from craft_ray.runtime import storage

    if storage.is_uri(path):  # s3://, gs://: read from a local copy
        if not storage.is_file(str(path)):
            raise error(f"{label} {storage.redact(path)} does not exist")
        p = storage.local_copy(str(path))
    else:
        p = Path(path)
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    if not p.is_file():
        raise error(f"{label} {p} does not exist")
    with p.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{label} {p}:{i + 1}: not valid JSON ({exc})") from None


def load_fewshots(cfg: FewShotConfig, base_dir: str | Path | None = None) -> list[FewShot]:
    """Read and check a few-shot file; every problem is one clear :class:`FewShotError`."""
    p = Path(cfg.path.rsplit("/", 1)[-1]) if "://" in cfg.path else Path(cfg.path)
    shots: list[FewShot] = []
    needed = (cfg.text_field, cfg.instruction_field, cfg.output_field)
    for i, rec in read_json_lines(cfg.path, base_dir, FewShotError, "few-shot file"):
        if not isinstance(rec, dict):
            raise FewShotError(f"{p}:{i + 1}: a few-shot must be a JSON object")
        missing = [f for f in needed if not isinstance(rec.get(f), str)]
        if missing:
            raise FewShotError(
                f"{p}:{i + 1}: few-shot lacks string field(s) {missing} (has {sorted(rec)}); "
                "set text_field/instruction_field/output_field to the file's field names"
            )
        shots.append(FewShot(f"{p.stem}:{i}", rec[cfg.text_field],
                             rec[cfg.instruction_field], rec[cfg.output_field], rec))
        if cfg.limit is not None and len(shots) >= cfg.limit:
            break
    if not shots:
        raise FewShotError(f"few-shot file {p} holds no few-shots")
    return shots


def embed_text(shot: FewShot, template: str = CRAFT_TEMPLATE) -> str:
    """The text embedded for a few-shot (CRAFT: Text/Instruction/Output joined)."""
    try:
        return template.format(**shot.record)
    except KeyError as exc:
        raise FewShotError(
            f"embed_template names field {exc} that few-shot {shot.id} does not have"
        ) from None
