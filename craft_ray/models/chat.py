"""Chat templates: rendering (one place for every stage), which template a tokenizer gets, and
the prompt/completion encoding training and evaluation share.
"""

from __future__ import annotations

from typing import Any


def chat_messages(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The [system?, user] messages of one prompt."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return messages


def chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template over ``messages``, ending with the generation prompt."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
    """(chat-templated text, its token ids): the one chat-template rendering of every stage.

    The template already holds the special tokens (BOS...), so none are added again.
    """
    text = chat_text(tokenizer, messages)
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def resolve_template(template: str, tokenizer: Any) -> str:
    """'chat' or 'plain' (as train resolves it); chat without a template is an error."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise ValueError("template: chat but the tokenizer has no chat template (a base "
                         "model?); use template: plain, as in training")
    if template == "auto":
        return "chat" if has_chat else "plain"
    return template


def encode_example(tokenizer: Any, prompt: str, completion: str, *, template: str,
                   plain_template: str = "{prompt}\n", system_prompt: str | None = None
                   ) -> tuple[list[int], int]:
    """Token ids of prompt + completion + EOS, and the number of prompt tokens.

    The prompt and the completion are tokenised separately, so the boundary is exact: the
    first ``prompt_len`` ids are what the model is given at inference, the rest is the answer.
    """
    if template == "chat":
        _, prompt_ids = render_chat(tokenizer, chat_messages(prompt, system_prompt))
    else:
        prompt_ids = list(tokenizer(plain_template.format(prompt=prompt),
                                    add_special_tokens=False)["input_ids"])
        if tokenizer.bos_token_id is not None:
            prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids + completion_ids, len(prompt_ids)
