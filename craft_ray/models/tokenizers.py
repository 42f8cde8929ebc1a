"""Tokenizers: local paths made absolute, chat tokenizers for prompt rendering."""

from __future__ import annotations

from typing import Any

from craft_ray.config import ConfigError
from craft_ray.models.gguf import resolve_model_path


def local_ref(name: str | None) -> str | None:
    """A model reference resolved for workers: a local path made absolute (Ray workers may run
    elsewhere), a GGUF file or ``pkg://`` spec converted to its cached HF folder; ids unchanged."""
    return resolve_model_path(name) if name is not None else None


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
