"""Generation backends: same input columns in, same output columns out.

Each backend turns a Ray Dataset of prompt rows (built by :mod:`craft_ray.stages.generate`) into the
same rows plus the generation columns of :data:`OUTPUT_COLUMNS`:

========================  ============================================================
``text``                  the generated text ("" when the request failed)
``tokens_in``             prompt tokens (as counted by the backend; -1 unknown)
``tokens_out``            generated tokens
``gen_seconds``           seconds spent on this row (a batch's time split over its rows
                          for batched backends)
``finish_reason``         ``stop`` (model ended), ``length`` (hit max tokens), ``error``
``error``                 "" or a fixed reason (counted in stats), e.g. "Server error
                          (HTTP 5xx) after retries."
``error_detail``          free text for the rejects file
========================  ============================================================

Input columns a backend reads: ``prompt`` (chat-templated text), ``prompt_token_ids``
(list[int], empty when no local tokenizer), ``messages`` (JSON list of chat messages),
``schema`` (JSON schema string for guided decoding), ``max_new_tokens`` (int),
``sample_id`` (str, seeds sampling).

Backends: ``hf`` (:mod:`.hf`, transformers on CPU or one GPU), ``openai``
(:mod:`.openai_compat`, any OpenAI-compatible server), ``vllm`` (:mod:`.vllm`,
``ray.data.llm`` on GPUs).
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

OUTPUT_COLUMNS = (
    "text", "tokens_in", "tokens_out", "gen_seconds", "finish_reason", "error", "error_detail",
)

# Fixed error reasons (the detail goes to error_detail).
ERR_SERVER = "Server error (HTTP 5xx/429) after retries."
ERR_TIMEOUT = "Request timed out after retries."
ERR_CONNECTION = "Connection failed after retries."
ERR_REJECTED = "Request rejected by the server (HTTP 4xx)."
ERR_BAD_RESPONSE = "Malformed server response."
ERR_ENGINE = "Inference failed in the engine."


def row_seed(base_seed: int, key: str) -> int:
    """A 31-bit seed from a base seed and a row key (stable across processes and runs)."""
    h = hashlib.sha256(f"{base_seed}:{key}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


_OPEN_REPEAT = re.compile(r"\{(\d+),\}")  # a regex repeat without upper bound: {14,}


def cap_string_lengths(schema: dict[str, Any], max_chars: int | None) -> dict[str, Any]:
    """A copy of ``schema`` whose free strings get ``maxLength`` (never below ``minLength``).

    Guided decoding forces valid JSON but not short strings; a cap bounds runaway
    generations (a string that never closes ends as a truncated row instead). A string with a
    ``pattern`` gets no ``maxLength`` (xgrammar ignores it beside a pattern, and a cut would
    drop the pattern's ending, e.g. a question's punctuation): its open repeats ``{m,}`` are
    bounded instead (``{m,max_chars}``), so it still ends as its pattern says.
    """
    if max_chars is None:
        return schema
    out = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "string" and "pattern" in node:
                node["pattern"] = _OPEN_REPEAT.sub(
                    lambda m: f"{{{m[1]},{max(int(m[1]), max_chars)}}}", node["pattern"])
            elif node.get("type") == "string" and not {"enum", "const"} & set(node):
                node["maxLength"] = max(max_chars, int(node.get("minLength", 0)))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(out)
    return out


def error_row(reason: str, detail: str, seconds: float = 0.0, tokens_in: int = -1
              ) -> dict[str, Any]:
    """Generation columns of a row whose request failed."""
    return {"text": "", "tokens_in": tokens_in, "tokens_out": 0, "gen_seconds": seconds,
            "finish_reason": "error", "error": reason, "error_detail": detail[:2000]}


def merge_outputs(batch: Any, outs: list[dict[str, Any]]) -> Any:
    """``batch`` (a pyarrow table) plus the generation columns, one dict per row in order."""
    import pyarrow as pa

    types = {"text": pa.string(), "tokens_in": pa.int64(), "tokens_out": pa.int64(),
             "gen_seconds": pa.float64(), "finish_reason": pa.string(), "error": pa.string(),
             "error_detail": pa.string()}
    for name in OUTPUT_COLUMNS:
        batch = batch.append_column(name, pa.array([o[name] for o in outs], type=types[name]))
    return batch


def batch_rows(batch: Any, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """The given columns of a pyarrow batch as one dict per row."""
    cols = {c: batch.column(c).to_pylist() for c in columns}
    return [{c: cols[c][i] for c in columns} for i in range(batch.num_rows)]


def check_backend(backend: str, model: str, settings: Any, section: str) -> None:
    """Check before any work that the backend can serve ``model``: for ``openai``, one
    ``GET /models`` (:func:`craft_ray.backends.openai_compat.preflight`: reachable, key
    accepted, model served; a :class:`~craft_ray.config.ConfigError` naming ``section``'s keys
    otherwise). The local backends (hf, vllm) load their model in their actors; nothing to ask.
    """
    if backend == "openai":
        from craft_ray.backends.openai_compat import preflight

        preflight(settings, model, section)


def run_backend(ds: Any, backend: str, model: str, settings: Any, sampling: dict[str, Any],
                tokenizer: str | None = None, key: str = "hf") -> Any:
    """Lazy: prompt rows -> the chosen backend -> output rows (the one backend dispatch).

    ``settings`` is the backend's own config section (``hf``, ``openai`` or ``vllm``);
    ``tokenizer`` is used by ``hf`` only (the others tokenise with the served model);
    ``key`` names the settings' config section in resource errors (``generate.hf``).
    """
    if backend == "hf":
        from craft_ray.backends.hf import hf_generate

        return hf_generate(ds, model, tokenizer, settings, sampling, key=key)
    if backend == "openai":
        from craft_ray.backends.openai_compat import openai_generate

        return openai_generate(ds, model, settings, sampling)
    if backend == "vllm":
        from craft_ray.backends.vllm import vllm_generate
        from craft_ray.models.tokenizers import engine_ref

        return vllm_generate(ds, engine_ref(model) or model, settings, sampling)
    raise ValueError(f"unknown generation backend {backend!r}; expected hf, openai or vllm")
