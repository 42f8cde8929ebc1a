"""transformers causal LMs: loading a model (with an optional LoRA adapter) for inference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from craft_ray.models.gguf import resolve_model_path

# --- hf backend ------------------------------------------------------------------------------


def _torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_hf_model(model: str, adapter: str | None, merge_adapter: bool, dtype: str,
                  device: str) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode; the adapter loaded with ``PeftModel.from_pretrained``."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = resolve_model_path(model)
    if os.path.isdir(model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    adapter = local_adapter(adapter)
    tok = AutoTokenizer.from_pretrained(adapter if adapter and has_tokenizer(adapter)
                                        else model)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=_torch_dtype(dtype, device))
    if adapter:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter)
        if merge_adapter:
            _check_mergeable(net, adapter)
            net = net.merge_and_unload()
    net.to(device)
    net.eval()
    return net, tok


def _check_mergeable(net: Any, adapter: str) -> None:
    """Refuse a merge that would silently change the model: a LoRA on a tied output layer.

    With tied word embeddings, merging a LoRA on ``lm_head`` (or ``embed_tokens``) writes the
    delta into the one shared matrix, so the input embeddings change too and the merged model
    no longer equals base + adapter.
    """
    targets = net.peft_config[net.active_adapter].target_modules or []
    targets = {targets} if isinstance(targets, str) else set(targets)
    tied = bool(getattr(net.get_base_model().config, "tie_word_embeddings", False))
    bad = sorted(targets & {"lm_head", "embed_tokens"})
    if tied and bad:
        raise ValueError(f"adapter {adapter} has a LoRA on {bad} of a model with tied word "
                         "embeddings: merging would change the input embeddings too; "
                         "evaluate it unmerged (merge_adapter: false)")


def local_adapter(adapter: str | None) -> str | None:
    """The adapter as a local folder: an object-store URI (``s3://RUN/train/TRIAL/adapter``)
    is downloaded into this machine's cache (``from_pretrained`` reads local folders)."""
    from craft_ray.runtime import storage

    return str(storage.local_copy(adapter)) if adapter and storage.is_uri(adapter) else adapter


def has_tokenizer(path: str) -> bool:
    p = Path(path)
    return (p / "tokenizer_config.json").is_file()


def generate_new_tokens(model: Any, tok: Any, ids: list[list[int]], device: Any,
                        **generate_kwargs: Any) -> list[list[int]]:
    """The HF generate loop of every stage: left-pad the prompts (so generation starts at the
    same position for all), ``model.generate``, and each row's new tokens (EOS and padding
    after it included; callers trim)."""
    import torch

    from craft_ray.models.tokenizers import pad_token_ids

    inp, att = pad_token_ids(tok, ids, "left", device)
    with torch.inference_mode():
        out = model.generate(input_ids=inp, attention_mask=att, **generate_kwargs)
    return out[:, inp.shape[1]:].tolist()
