"""Evaluation prompts, rendered exactly as training rendered the prompt part."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from craft_ray.evalsets.base import EvalItem, EvalSetConfig
from craft_ray.models.chat import resolve_template
from craft_ray.stages.evaluate.config import EvaluateConfig, ModelSpec

# --- prompts ---------------------------------------------------------------------------------


def item_record(item: EvalItem) -> dict[str, Any]:
    """The eval item as a CRAFT multiple-choice task record (question, options, answer)."""
    return {"question": item.question, "options": item.options, "answer": item.gold}


def craft_eval_prompt(item: EvalItem) -> str:
    """CRAFT's evaluation text without a task: question, then one 'X. choice' per line."""
    return item.question + "\n" + "\n".join(item.options)


def task_prompt(item: EvalItem, task: Any | None) -> str:
    """Prompt text as the task formats it for training (``Task.training_pair(record)[0]``).

    The record is not put through ``Task.validate``: a real eval item may legitimately have
    another number of options than generated samples (ScienceQA: 2-5). Where the task pins
    option texts (csqa: "Yes"/"No") and the item's choices are the same words, the task's
    spelling is used, so the prompt reads exactly as in training.
    """
    if task is None:
        return craft_eval_prompt(item)
    if list(getattr(task, "record_fields", [])) != ["question", "options", "answer"]:
        raise ValueError(f"task {task.name!r} has record fields {task.record_fields}; "
                         "evaluation needs a multiple-choice task with question/options/answer "
                         "records (or task: null for CRAFT's plain evaluation format)")
    record = item_record(item)
    fixed = getattr(task, "fixed_options", None)
    if fixed and [c.lower() for c in item.choices] == [f.lower() for f in fixed]:
        record["options"] = [f"{ltr}. {txt}" for ltr, txt in zip(item.letters, fixed)]
    return task.training_pair(record)[0]


def render_prompts(texts: Sequence[str], tokenizer: Any, template: str,
                   plain_template: str = "{prompt}\n", system_prompt: str | None = None
                   ) -> tuple[list[str], list[list[int]]]:
    """(prompt strings, prompt token ids) exactly as training builds the prompt part.

    The ids come from ``craft_ray.models.chat.encode_example`` (the prompt part), so they are the
    very sequence training conditioned the answer on: chat = the chat template over [system?,
    user] with the generation prompt; plain = ``plain_template`` with BOS. The strings are kept
    for the per-item outputs.
    """
    from craft_ray.models.chat import chat_messages, chat_text, encode_example

    template = resolve_template(template, tokenizer)
    rendered: list[str] = []
    ids: list[list[int]] = []
    for t in texts:
        # train's own encoder, so the prompt ids are those the adapter was trained on
        full, n_prompt = encode_example(tokenizer, t, "", template=template,
                                        plain_template=plain_template,
                                        system_prompt=system_prompt)
        if template == "chat":
            text = chat_text(tokenizer, chat_messages(t, system_prompt))
        else:
            text = plain_template.format(prompt=t)
        rendered.append(text)
        ids.append(list(full[:n_prompt]))
    return rendered, ids


def load_task(name: str | None) -> Any | None:
    """The task object for ``name`` (None: CRAFT's plain evaluation format)."""
    if name is None:
        return None
    from craft_ray.tasks.registry import get_task

    return get_task(name)


def generative_task(cfg: EvaluateConfig, es: EvalSetConfig) -> Any:
    """The task formatting a generative set: the set's CRAFT task (``evaluate.task``, when it
    names a generative task, must be that one)."""
    from craft_ray.config import ConfigError
    from craft_ray.evalsets.base import GENERATIVE_SETS

    if cfg.task in set(GENERATIVE_SETS.values()) and cfg.task != es.task:
        raise ConfigError(f"eval set {es.display_name!r} holds {es.task} records but "
                          f"evaluate.task is {cfg.task!r}")
    return load_task(es.task)


def fit_generative_prompts(texts: Sequence[str], tokenizer: Any, max_tokens: int,
                           template: str, plain_template: str = "{prompt}\n",
                           system_prompt: str | None = None
                           ) -> tuple[list[str], list[list[int]], list[bool]]:
    """:func:`render_prompts`, but a prompt over ``max_tokens`` loses the end of its text.

    A generative instruction starts with what to do ("Please summarize the text below:") and
    goes on with the document, and the chat template closes it with the generation prompt;
    cutting the token sequence from the left (as the multiple-choice path does, to keep the
    answer position) would drop the instruction. Here the instruction text is shortened from
    its end instead and the prompt rendered again. Returns (prompts, ids, truncated flags).
    """
    prompts, ids = render_prompts(texts, tokenizer, template, plain_template, system_prompt)
    cut = [False] * len(texts)
    for i, t in enumerate(texts):
        text = t
        for _ in range(4):  # re-tokenising a decoded cut can differ by a few tokens
            over = len(ids[i]) - max_tokens
            if over <= 0:
                break
            tt = tokenizer(text, add_special_tokens=False)["input_ids"]
            keep = max(0, len(tt) - over - 8)
            text = tokenizer.decode(tt[:keep], skip_special_tokens=True)
            (p,), (x,) = render_prompts([text], tokenizer, template, plain_template,
                                        system_prompt)
            prompts[i], ids[i], cut[i] = p, x, True
    return prompts, ids, cut


def prompt_rows(model: ModelSpec, name: str, prompts: list[str], ids: list[list[int]],
                 cfg: EvaluateConfig, extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for p, x, e in zip(prompts, ids, extra):
        # keep the end when too long: the answer position must stay
        rows.append({"eval_set": name, "model_name": model.name, "prompt": p,
                     "tokenized_prompt": x[-cfg.max_prompt_tokens:],
                     "truncated": len(x) > cfg.max_prompt_tokens, **e})
    return rows
