"""Tokenizers: local paths made absolute, chat tokenizers for prompt rendering."""

from __future__ import annotations

from typing import Any

from craft_ray.config import ConfigError
from craft_ray.models.gguf import PKG_SCHEME, resolve_model_path


def local_ref(name: str | None) -> str | None:
    """A model reference for a Ray actor that resolves it on its own node
    (:func:`resolve_model_path`: the hf backend, evaluation, tokenizers): a local path made
    absolute (Ray workers may run in another directory), a ``.gguf`` file included; ids,
    ``pkg://`` specs and object-store URIs unchanged. Each node then converts the GGUF of its
    installed package or downloads the URI into its own cache: no node needs a path that only
    the driver's disk holds."""
    from pathlib import Path

    from craft_ray.runtime import storage

    if name is None or storage.is_uri(name):
        return name
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def engine_ref(name: str | None) -> str | None:
    """A model reference for an engine that loads it itself (vLLM through Ray Data LLM):
    ids and object-store URIs unchanged (Ray Data LLM downloads a URI on each engine's node);
    a ``pkg://`` spec or ``.gguf`` file converted here into its cached HF folder, which an
    engine on another node finds only in a model cache every node shares
    (``$CRAFT_RAY_MODEL_CACHE``)."""
    from craft_ray.runtime import storage

    if name is None or (storage.is_uri(name) and not name.startswith(PKG_SCHEME)):
        return name
    return resolve_model_path(name)


def load_chat_tokenizer(name: str | None) -> Any | None:
    """A transformers tokenizer with a chat template, or None."""
    if name is None:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            f"tokenizer {name!r} has no chat template; prompts are rendered with the "
            "generator's own template. Use an instruct/chat model, or set generate.tokenizer "
            "to one that has a template."
        )
    # Prompt length is governed by the stage's own rule (max_prompt_tokens); silence the
    # tokenizer's "longer than model_max_length" warning when counting long prompts.
    tok.model_max_length = 10**12
    return tok


def load_train_tokenizer(path: str) -> Any:
    """The base model's tokenizer, with a pad token (EOS when the model has none).

    Padding positions are masked out of loss and attention by the collate function, so
    reusing EOS as pad never hides a real EOS from the loss.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"tokenizer of {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def ensure_pad_token(tok: Any) -> int:
    """The tokenizer's pad id, set to EOS (or id 0) when it has none; returns the pad id.

    Padded positions are masked out of attention (and of the loss in training), so which id
    fills them does not change any result.
    """
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else \
            tok.convert_ids_to_tokens(0)
    return int(tok.pad_token_id)


def pad_token_ids(tok: Any, ids: list[list[int]], side: str, device: Any = "cpu"
                  ) -> tuple[Any, Any]:
    """(input_ids, attention_mask) torch tensors: ``ids`` padded by the tokenizer itself.

    ``side="left"`` for generation (every prompt ends at the same position, so generation
    starts after it); ``side="right"`` for scoring (positions stay 0..len-1, as in training).
    """
    from transformers.data.data_collator import pad_without_fast_tokenizer_warning

    batch = pad_without_fast_tokenizer_warning(tok, {"input_ids": ids}, padding="longest",
                                               padding_side=side, return_tensors="pt")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)
