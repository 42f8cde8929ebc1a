"""Evaluation stage: base models, adapters and merged models on multiple-choice and generative
evaluation sets.

Multiple-choice sets (accuracy) follow CRAFT's method: one greedy next token after the prompt;
the prediction is the argmax of the next-token log-probability over the letters the item has
(A-D, A-E, A/B). A letter that is not among the scored tokens counts as -inf; an item with no
usable letter is wrong.

- ``backend: hf``: a Ray Data actor pool, each actor loading the model (+ PEFT adapter) once;
  the letter scores come straight from the last position's logits (full vocabulary, so no
  letter is ever missing there).
- ``backend: vllm``: ``ray.data.llm`` vLLM engines, ``max_tokens=1`` and the top-k logprobs
  of that token; letters outside the top k are -inf, as in CRAFT. Adapters are served as
  LoRA requests (no merge needed).

Generative sets (``cnn_dailymail`` -> summarization, ``recipenlg`` -> recipegen): the evaluated
model answers each prompt itself (greedy by default, ``generation.max_new_tokens`` or the task's
CRAFT budget), on the same backends and with the model loaded the same way (hf actors; vLLM
through :mod:`craft_ray.backends.vllm` with the adapter as a LoRA request). Every answer gets
ROUGE-L F1 against the reference; with ``judge`` set, all (model, set) pairs then go to the LLM
judge in one call (:func:`craft_ray.judge.judge_groups`: pairwise vs the reference, seeded
order swap), and the win rate is reported CRAFT's way (ties and unparsable as losses, the
metric) and over decided pairs only.

Models: ``models`` lists them; ``sweep`` adds every finished trial of a sweep (base model +
the trial's adapter, with its size and seed) read from ``RUN_DIR/sweep/results.jsonl``.

Prompts are built exactly as training built them: the eval item becomes a task record
(``question``, ``options`` ["A. ...", ...], ``answer``), ``Task.training_pair(record)[0]`` is
the prompt text, and the model's chat template (or the plain template) is applied on top and
tokenised as training does (``template``, ``plain_template``, ``system_prompt``: the same keys
as ``train``), so a fine-tuned adapter is scored on exactly the token sequence it learned.

Outputs under ``RUN_DIR/evaluate/``::

    {model}/{set}/predictions.parquet|.jsonl   MC: prompt, letter scores, prediction, gold,
                                               correct; generative: instruction, prompt,
                                               prediction, reference, rougeL_f1, judge verdict
    {model}/{set}/results.json                 MC: accuracy, n, 95% CI, gold/prediction counts;
                                               generative: rougeL_f1 (+CI), win rates (+CI),
                                               wins/losses/ties/unparsable
    rejects/{set}.jsonl                        eval rows that could not be parsed, with reason
    results.json, results.md, accuracy.png, report.md    all (model, set) pairs together
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from craft_ray.config import RayConfig, StrictModel, config_hash
from craft_ray.evalsets import LETTERS, EvalItem, EvalSetConfig, load_eval_set
from craft_ray.judge import JUDGE_TEMPLATE, JudgeModelConfig
from craft_ray.models.gguf import resolve_model_path
from craft_ray.resources import actor_cpus, torch_threads
from craft_ray.runtime import StageDir, StageStats, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

NEG_INF = float("-inf")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


# --- config ----------------------------------------------------------------------------------


class ModelSpec(StrictModel):
    """One model to evaluate: a base (or merged) checkpoint, optionally with a PEFT adapter."""

    name: str = Field(description="Name in outputs (folder name: letters, digits, _ . -).",
                      min_length=1, max_length=120)
    model: str = Field(description="Base or merged model: local path or hub id.", min_length=1)
    adapter: str | None = Field(
        default=None, description="PEFT adapter folder (RUN_DIR/train/TRIAL/adapter)."
    )
    merge_adapter: bool = Field(
        default=False,
        description="hf backend: merge the adapter into the weights after loading (faster "
        "forward passes, same scores up to rounding).",
    )
    group: str | None = Field(
        default=None,
        description="Series in sweep tables and plots (e.g. base, fewshot, craft); default: "
        "'base' without an adapter, else 'adapter'.",
    )
    size: str | None = Field(
        default=None, description="Training-set size label (S, M, L, XL or a number) for plots."
    )
    seed: int | None = Field(default=None, description="Training seed (repeats are averaged).")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("name must match [A-Za-z0-9][A-Za-z0-9_.-]* (it is a folder name)")
        return v

    @property
    def series(self) -> str:
        return self.group or ("adapter" if self.adapter else "base")


class VLLMScoreConfig(StrictModel):
    """vLLM engine settings of ``backend: vllm``."""

    top_logprobs: int = Field(
        default=20, ge=1, le=1000,
        description="Logprobs returned for the one generated token; letters outside them "
        "count as -inf (CRAFT's setting).",
    )
    max_model_len: int | None = Field(default=None, ge=16, description="vLLM max_model_len.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="GPUs per engine.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1,
                                          description="vLLM gpu_memory_utilization.")
    max_lora_rank: int = Field(default=64, ge=1, le=1024,
                               description="Largest LoRA rank served (adapters as LoRA).")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra vllm engine arguments (override the above)."
    )


class GenerationConfig(StrictModel):
    """How generative sets are answered by the evaluated model (greedy by default)."""

    max_new_tokens: int | None = Field(
        default=None, ge=1, le=65_536,
        description="Answer budget (default: the task's CRAFT budget: summarization 1536, "
        "recipegen 1280).")
    temperature: float = Field(
        default=0.0, ge=0, le=5,
        description="0: greedy (reproducible). CRAFT's run_eval.py sampled at 0.7 / top_p "
        "0.9 / top_k 40.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling (temperature > 0).")
    top_k: int = Field(default=-1, ge=-1, le=100_000,
                       description="Top-k sampling (temperature > 0; -1: off).")
    seed: int = Field(default=0, ge=0, le=2**31 - 1,
                      description="Sampling seed per item (temperature > 0).")
    generate_batch_size: int = Field(default=4, ge=1, le=1024,
                                     description="hf: prompts per generate() call (left-padded).")


class SweepModelsConfig(StrictModel):
    """Evaluate every finished trial of a sweep: its adapters are found in the sweep output."""

    path: str | None = Field(
        default=None, description="The sweep folder (default RUN_DIR/sweep; it holds "
        "results.jsonl, one row per trial, written by `craft-ray sweep`).")
    base_model: str | None = Field(
        default=None, description="Base model of the adapters (default: train.base_model "
        "in the sweep's config.yaml).")
    group: str = Field(default="craft", min_length=1,
                       description="Series name of the trials in tables and plots.")
    sizes: list[str] | None = Field(default=None,
                                    description="Only trials of these sizes (default: all).")
    merge_adapter: bool = Field(default=False,
                                description="As ModelSpec.merge_adapter, for every trial.")


class EvaluateConfig(StrictModel):
    """Config of ``craft-ray evaluate``."""

    task: str | None = Field(
        default=None,
        description="Task whose Task.training_pair formats the prompt (bioqa, medqa, csqa or "
        "a custom multiple-choice task). Empty: CRAFT's evaluation format "
        "'question\\nA. ...\\nB. ...'.",
    )
    models: list[ModelSpec] = Field(
        default_factory=list,
        description="Models to evaluate (with or instead of the trials found by `sweep`).")
    sweep: SweepModelsConfig | None = Field(
        default=None, description="Also evaluate every finished trial of a sweep.")
    sets: list[EvalSetConfig] = Field(
        min_length=1, description="Evaluation sets: multiple-choice (accuracy) and generative "
        "(ROUGE-L, plus the judge's win rate when `judge` is set).")
    generation: GenerationConfig = Field(default_factory=GenerationConfig,
                                         description="Generative sets: decoding settings.")
    judge: JudgeModelConfig | None = Field(
        default=None, description="Generative sets: the LLM judge comparing each output with "
        "the reference (win rate); none: ROUGE-L only.")
    judge_seed: int = Field(default=1234, ge=0, le=2**31 - 1,
                            description="Seed of the judge's random order swap (CRAFT: 1234).")
    judge_template: str = Field(
        default=JUDGE_TEMPLATE, min_length=1,
        description="Judge prompt with {instruction}, {output_1}, {output_2}.")
    backend: Literal["hf", "vllm"] = Field(
        default="hf", description="hf: logits from transformers; vllm: ray.data.llm logprobs."
    )
    template: Literal["auto", "chat", "plain"] = Field(
        default="auto",
        description="As train.template (must match it): chat: the tokenizer's chat template "
        "(optional system turn, user turn, generation prompt); plain: plain_template with BOS; "
        "auto: chat when the tokenizer has a template.",
    )
    plain_template: str = Field(default="{prompt}\n",
                                description="As train.plain_template (plain prompts).")
    system_prompt: str | None = Field(default=None,
                                      description="As train.system_prompt (chat prompts).")
    letter_prefixes: list[str] = Field(
        default_factory=lambda: ["", " "],
        description="Surface forms of a letter token: prefix + letter (e.g. 'A' and ' A'); "
        "a letter's score is its best single-token form. [''] is CRAFT's exact setting.",
        min_length=1,
    )
    batch_size: int = Field(default=32, ge=1, le=100_000,
                            description="Items per Ray Data batch handed to an actor.")
    forward_batch_size: int = Field(default=8, ge=1, le=4096,
                                    description="hf: prompts per forward pass.")
    max_prompt_tokens: int = Field(
        default=4096, ge=8, le=1_000_000,
        description="Longer prompts are cut from the left (the answer position stays); "
        "counted in results as 'truncated'.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="hf weights dtype (auto: bfloat16 on GPU, float32 on CPU)."
    )
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per scoring actor/engine.")
    num_cpus: float | None = Field(
        default=None, gt=0,
        description="CPUs per scoring actor (default: an equal share of the cluster's CPUs "
        "minus 0.5 left to the stage's own tasks; 1 with a GPU).")
    torch_threads: int | None = Field(default=None, ge=1,
                                      description="hf: torch threads per actor (default num_cpus).")
    concurrency: int = Field(default=1, ge=1, le=4096,
                             description="Scoring actors (hf) or vLLM engines per model.")
    vllm: VLLMScoreConfig = Field(default_factory=VLLMScoreConfig,
                                  description="vLLM settings (backend: vllm).")
    ci_level: float = Field(default=0.95, gt=0, lt=1, description="Confidence level of the CI.")
    plot: bool = Field(default=True, description="Write accuracy.png and report.md.")
    output_dir: str | None = Field(default=None,
                                   description="Where outputs go (default RUN_DIR/evaluate).")

    @model_validator(mode="after")
    def _unique(self) -> EvaluateConfig:
        if not self.models and self.sweep is None:
            raise ValueError("nothing to evaluate: list `models` and/or set `sweep` (every "
                             "finished trial of a sweep)")
        for key in ("{instruction}", "{output_1}", "{output_2}"):
            if key not in self.judge_template:
                raise ValueError(f"judge_template must contain {key}")
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {dup}")
        sets = [s.display_name for s in self.sets]
        dup = sorted({n for n in sets if sets.count(n) > 1})
        if dup:
            raise ValueError(f"eval set names must be unique (set `label`); repeated: {dup}")
        for p in self.letter_prefixes:
            if len(p) > 4:
                raise ValueError(f"letter prefix {p!r} is too long (use '', ' ', '\\n')")
        if "{prompt}" not in self.plain_template:
            raise ValueError("plain_template must contain '{prompt}'")
        return self


class EvaluateStageConfig(StrictModel):
    """A YAML file for ``craft-ray evaluate``: common keys plus the ``evaluate`` section."""

    run_dir: str = Field(default="runs/default", description="Run directory.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    evaluate: EvaluateConfig


# --- letter scoring (pure functions) ---------------------------------------------------------


def letter_token_ids(tokenizer: Any, letters: Sequence[str] = LETTERS,
                     prefixes: Sequence[str] = ("", " ")) -> dict[str, list[int]]:
    """Token ids that spell each letter as one token (``prefix + letter``, e.g. 'A', ' A').

    Only single-token encodings count: a letter that never is one token cannot be the one
    greedy token CRAFT's method reads. Raises ``ValueError`` for a letter with no such token.
    """
    out: dict[str, list[int]] = {}
    for letter in letters:
        ids: list[int] = []
        for p in prefixes:
            enc = tokenizer.encode(p + letter, add_special_tokens=False)
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(int(enc[0]))
        # SentencePiece tokenizers encode 'A' as '▁A'; the bare piece is another surface form.
        bare = tokenizer.convert_tokens_to_ids(letter)
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(bare, int) and bare >= 0 and bare != unk and bare not in ids:
            ids.append(bare)
        if not ids:
            raise ValueError(f"tokenizer has no single token for letter {letter!r} "
                             f"(tried prefixes {list(prefixes)})")
        out[letter] = ids
    shared = Counter(i for ids in out.values() for i in ids)
    clash = [i for i, n in shared.items() if n > 1]
    if clash:
        raise ValueError(f"token ids {clash} stand for more than one letter")
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (float64)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def scores_from_logprobs(logprobs: np.ndarray | Mapping[Any, Any], letters: Sequence[str],
                         letter_ids: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Each letter's score: the best log-prob among its token ids.

    ``logprobs`` is either a full-vocabulary vector (hf) or a sparse top-k map token id ->
    log-prob (vLLM; ids may be ints or strings, values floats or ``{"logprob": x}``). An id
    absent from a sparse map, or a non-finite value, is -inf.
    """
    out: dict[str, float] = {}
    if isinstance(logprobs, np.ndarray):
        vocab = logprobs.shape[-1]
        for letter in letters:
            vals = [float(logprobs[i]) for i in letter_ids[letter] if 0 <= i < vocab]
            vals = [v for v in vals if math.isfinite(v)]
            out[letter] = max(vals) if vals else NEG_INF
        return out
    sparse = _normalise_sparse(logprobs)
    for letter in letters:
        vals = [sparse[i] for i in letter_ids[letter] if i in sparse]
        vals = [v for v in vals if math.isfinite(v)]
        out[letter] = max(vals) if vals else NEG_INF
    return out


def _normalise_sparse(logprobs: Mapping[Any, Any]) -> dict[int, float]:
    out: dict[int, float] = {}
    for k, v in logprobs.items():
        if v is None:
            continue
        try:
            key = int(k)
        except (TypeError, ValueError):
            continue
        if isinstance(v, Mapping):
            v = v.get("logprob")
        elif hasattr(v, "logprob"):
            v = v.logprob
        try:
            out[key] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def predict_letter(scores: Mapping[str, float], letters: Sequence[str]) -> str | None:
    """Argmax over the item's ``letters`` (others are ignored); None when none is finite.

    Ties go to the earliest letter in ``letters`` (what CRAFT's ``list.index(max)`` does).
    """
    best: str | None = None
    best_val = NEG_INF
    for letter in letters:
        v = scores.get(letter, NEG_INF)
        if v is None or not math.isfinite(v):
            continue
        if best is None or v > best_val:
            best, best_val = letter, v
    return best


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (0, 0 when n == 0)."""
    if n == 0:
        return 0.0, 0.0
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


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


def resolve_template(template: str, tokenizer: Any) -> str:
    """'chat' or 'plain' (as train resolves it); chat without a template is an error."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise ValueError("template: chat but the tokenizer has no chat template (a base "
                         "model?); use template: plain, as in training")
    if template == "auto":
        return "chat" if has_chat else "plain"
    return template


def render_prompts(texts: Sequence[str], tokenizer: Any, template: str,
                   plain_template: str = "{prompt}\n", system_prompt: str | None = None
                   ) -> tuple[list[str], list[list[int]]]:
    """(prompt strings, prompt token ids) exactly as training builds the prompt part.

    The ids come from ``craft_ray.train.encode_example`` (the prompt part), so they are the
    very sequence training conditioned the answer on: chat = the chat template over [system?,
    user] with the generation prompt; plain = ``plain_template`` with BOS. The strings are kept
    for the per-item outputs.
    """
    from craft_ray.train import encode_example

    template = resolve_template(template, tokenizer)
    rendered: list[str] = []
    ids: list[list[int]] = []
    for t in texts:
        # train's own encoder, so the prompt ids are those the adapter was trained on
        full, n_prompt = encode_example(tokenizer, t, "", template=template,
                                        plain_template=plain_template,
                                        system_prompt=system_prompt)
        if template == "chat":
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt
                        else [])
            messages.append({"role": "user", "content": t})
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        else:
            text = plain_template.format(prompt=t)
        rendered.append(text)
        ids.append(list(full[:n_prompt]))
    return rendered, ids


def load_task(name: str | None) -> Any | None:
    """The task object for ``name`` (None: CRAFT's plain evaluation format)."""
    if name is None:
        return None
    from craft_ray.tasks import get_task

    return get_task(name)


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
    tok = AutoTokenizer.from_pretrained(adapter if adapter and _has_tokenizer(adapter)
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


def _has_tokenizer(path: str) -> bool:
    p = Path(path)
    return (p / "tokenizer_config.json").is_file()


def _actor_model(model: str, adapter: str | None, merge_adapter: bool, dtype: str,
                 num_gpus: float, torch_threads: int | None) -> tuple[str, Any, Any]:
    """(device, model, tokenizer) for an hf actor: threads set, GPU when asked and present."""
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    device = "cuda" if num_gpus and torch.cuda.is_available() else "cpu"
    return (device, *load_hf_model(model, adapter, merge_adapter, dtype, device))


class HFLetterScorer:
    """Ray Data actor: loads the model (+ adapter) once; scores letters from last logits."""

    def __init__(self, model: str, adapter: str | None, merge_adapter: bool, dtype: str,
                 num_gpus: float, torch_threads: int | None, letter_ids: dict[str, list[int]],
                 forward_batch_size: int, max_prompt_tokens: int) -> None:
        self.device, self.model, self.tok = _actor_model(model, adapter, merge_adapter, dtype,
                                                         num_gpus, torch_threads)
        self.letter_ids = letter_ids
        self.forward_batch_size = forward_batch_size
        self.max_prompt_tokens = max_prompt_tokens

    def last_logprobs(self, ids: list[list[int]]) -> np.ndarray:
        """Next-token log-probs [N, V] after each prompt (given as token ids)."""
        import torch

        pad = self.tok.pad_token_id
        if pad is None:
            pad = self.tok.eos_token_id if self.tok.eos_token_id is not None else 0
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # less padding per pass
        out: list[np.ndarray | None] = [None] * len(ids)
        for s in range(0, len(order), self.forward_batch_size):
            chunk = order[s:s + self.forward_batch_size]
            width = max(len(ids[i]) for i in chunk)
            # Right padding + explicit last index: positions stay 0..len-1 as in training.
            inp = torch.full((len(chunk), width), pad, dtype=torch.long)
            att = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                inp[r, : len(ids[i])] = torch.tensor(ids[i])
                att[r, : len(ids[i])] = 1
            with torch.no_grad():
                logits = self.model(input_ids=inp.to(self.device),
                                    attention_mask=att.to(self.device)).logits
            last = torch.tensor([len(ids[i]) - 1 for i in chunk], device=logits.device)
            rows = logits[torch.arange(len(chunk), device=logits.device), last].float()
            lp = torch.log_softmax(rows, dim=-1).cpu().numpy()
            for r, i in enumerate(chunk):
                out[i] = lp[r]
        return np.stack(out)  # type: ignore[arg-type]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [[int(t) for t in x] for x in batch["tokenized_prompt"]]
        lp = self.last_logprobs(ids)
        scores = [scores_from_logprobs(lp[i], LETTERS, self.letter_ids) for i in range(len(ids))]
        out = {k: v for k, v in batch.items() if k != "tokenized_prompt"}
        out.update(score_columns(scores, batch["letters"]))
        out["prompt_tokens"] = np.array([len(x) for x in ids], dtype=np.int64)
        return out


def score_columns(scores: list[dict[str, float]], letters_col: Sequence[Any]
                  ) -> dict[str, np.ndarray]:
    """Per-letter score columns (NaN for letters the item lacks) and the prediction.

    ``letters_col`` holds each item's letters as a string ("ABCD") or a list.
    """
    cols: dict[str, np.ndarray] = {}
    item_letters = [list(x) for x in letters_col]
    for letter in LETTERS:
        cols[f"score_{letter}"] = np.array(
            [s[letter] if letter in ls else np.nan for s, ls in zip(scores, item_letters)],
            dtype=np.float64)
    preds = [predict_letter(s, ls) for s, ls in zip(scores, item_letters)]
    cols["prediction"] = np.array([p or "" for p in preds], dtype=object)
    return cols


# --- vllm backend ----------------------------------------------------------------------------


def vllm_processor_config(cfg: EvaluateConfig, model: ModelSpec) -> Any:
    """The ``ray.data.llm`` vLLM processor config scoring one token with top-k logprobs."""
    from ray.data.llm import vLLMEngineProcessorConfig

    engine: dict[str, Any] = {
        "max_logprobs": cfg.vllm.top_logprobs,
        "tensor_parallel_size": cfg.vllm.tensor_parallel_size,
        "gpu_memory_utilization": cfg.vllm.gpu_memory_utilization,
        "enable_prefix_caching": True,
    }
    if cfg.vllm.max_model_len:
        engine["max_model_len"] = cfg.vllm.max_model_len
    if model.adapter:
        engine.update(enable_lora=True, max_lora_rank=cfg.vllm.max_lora_rank, max_loras=1)
    engine.update(cfg.vllm.engine_kwargs)
    return vLLMEngineProcessorConfig(
        model_source=resolve_model_path(model.model), engine_kwargs=engine,
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency, accelerator_type=None,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
    )


def vllm_request(row: dict[str, Any], top_logprobs: int, adapter: str | None
                 ) -> dict[str, Any]:
    """Preprocess: one greedy token with its top-k logprobs (the adapter as a LoRA request)."""
    out = dict(row)
    out["sampling_params"] = {"temperature": 0.0, "max_tokens": 1, "logprobs": top_logprobs}
    if adapter:
        out["model"] = adapter
    return out


def vllm_scores(row: dict[str, Any], letter_ids: dict[str, list[int]]) -> dict[str, Any]:
    """Postprocess: letter scores from the first generated token's logprobs."""
    first: Any = {}
    lps = row.get("logprobs")
    if lps is not None and len(lps) > 0:
        first = lps[0] or {}
    if isinstance(first, list):  # [{"token_id"|"id": i, "logprob": x}, ...] after a round trip
        first = {d.get("token_id", d.get("id")): d for d in first if isinstance(d, Mapping)}
    scores = scores_from_logprobs(first, LETTERS, letter_ids)
    keep = {k: v for k, v in row.items()
            if k not in ("logprobs", "prompt_logprobs", "sampling_params", "generated_tokens",
                         "metrics", "model", "tokenized_prompt", "prompt_token_ids")}
    cols = score_columns([scores], [row["letters"]])
    keep.update({k: v[0] for k, v in cols.items()})
    keep["prompt_tokens"] = int(row.get("num_input_tokens") or 0)
    return keep


# --- generative sets: the evaluated model answers, then ROUGE-L and the judge ---------------


def trim_at_eos(tokens: Sequence[int], eos_ids: set[int], limit: int
                ) -> tuple[list[int], bool]:
    """Generated tokens up to (not including) the first EOS, at most ``limit``; (tokens,
    stopped): stopped is True when the model ended the answer itself."""
    out: list[int] = []
    for t in list(tokens)[:limit]:
        if t in eos_ids:
            return out, True
        out.append(int(t))
    return out, False


def sampling_of(gen: GenerationConfig) -> dict[str, Any]:
    """The generation backends' sampling dict (craft_ray.backends) for ``gen``."""
    return {"temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k,
            "seed": gen.seed, "guided": False}


class HFTextGenerator:
    """Ray Data actor: loads the model (+ adapter, merged or not) once, as the scorer does,
    and answers batches of tokenized prompts (greedy unless a temperature is set)."""

    def __init__(self, model: str, adapter: str | None, merge_adapter: bool, dtype: str,
                 num_gpus: float, torch_threads: int | None, generate_batch_size: int,
                 sampling: dict[str, Any]) -> None:
        self.device, self.model, self.tok = _actor_model(model, adapter, merge_adapter, dtype,
                                                         num_gpus, torch_threads)
        self.generate_batch_size = generate_batch_size
        self.sampling = sampling
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tok.eos_token_id is not None:
            self.eos_ids.add(self.tok.eos_token_id)
        pad = self.tok.pad_token_id
        self.pad = pad if pad is not None else (self.tok.eos_token_id or 0)

    def generate(self, ids: list[list[int]], max_new: list[int], keys: list[str]
                 ) -> list[tuple[str, int, str]]:
        """(text, generated tokens, finish reason) per prompt, in input order."""
        import torch

        from craft_ray.backends import row_seed

        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # less padding per call
        out: list[tuple[str, int, str] | None] = [None] * len(ids)
        for s in range(0, len(order), self.generate_batch_size):
            chunk = order[s:s + self.generate_batch_size]
            width = max(len(ids[i]) for i in chunk)
            # Left padding: all prompts end at the same position; generation starts after it.
            inp = torch.tensor([[self.pad] * (width - len(ids[i])) + ids[i] for i in chunk],
                               device=self.device)
            att = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i])
                                for i in chunk], device=self.device)
            kwargs: dict[str, Any] = {"max_new_tokens": max(max_new[i] for i in chunk),
                                      "pad_token_id": self.pad}
            if self.sampling["temperature"] > 0:
                kwargs.update(do_sample=True, temperature=self.sampling["temperature"],
                              top_p=self.sampling["top_p"])
                if self.sampling["top_k"] > 0:
                    kwargs["top_k"] = self.sampling["top_k"]
                torch.manual_seed(row_seed(int(self.sampling["seed"]), keys[chunk[0]]))
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.inference_mode():
                gen = self.model.generate(input_ids=inp, attention_mask=att, **kwargs)
            for r, i in enumerate(chunk):
                toks, stopped = trim_at_eos(gen[r, width:].tolist(), self.eos_ids, max_new[i])
                out[i] = (self.tok.decode(toks, skip_special_tokens=True).strip(),
                          len(toks) + int(stopped), "stop" if stopped else "length")
        return out  # type: ignore[return-value]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [[int(t) for t in x] for x in batch["tokenized_prompt"]]
        keys = [f"{m}/{e}/{i}" for m, e, i in zip(batch["model_name"], batch["eval_set"],
                                                   batch["id"])]
        res = self.generate(ids, [int(x) for x in batch["max_new_tokens"]], keys)
        out = {k: v for k, v in batch.items() if k != "tokenized_prompt"}
        out["prediction"] = np.array([r[0] for r in res], dtype=object)
        out["tokens_out"] = np.array([r[1] for r in res], dtype=np.int64)
        out["finish_reason"] = np.array([r[2] for r in res], dtype=object)
        out["prompt_tokens"] = np.array([len(x) for x in ids], dtype=np.int64)
        return out


def vllm_generation_config(cfg: EvaluateConfig, model: ModelSpec) -> Any:
    """The generation backend's vLLM settings (craft_ray.backends.vllm) for one model: the
    adapter is served as a LoRA request, so base and adapter share the engine settings."""
    from craft_ray.backends.vllm import VLLMBackendConfig

    engine: dict[str, Any] = {}
    if cfg.vllm.max_model_len:
        engine["max_model_len"] = cfg.vllm.max_model_len
    if model.adapter:
        engine.update(enable_lora=True, max_lora_rank=cfg.vllm.max_lora_rank, max_loras=1)
    engine.update(cfg.vllm.engine_kwargs)
    return VLLMBackendConfig(
        tensor_parallel_size=cfg.vllm.tensor_parallel_size,
        gpu_memory_utilization=cfg.vllm.gpu_memory_utilization,
        concurrency=cfg.concurrency, batch_size=cfg.batch_size, engine_kwargs=engine)


def vllm_generation_request(row: dict[str, Any], sampling: dict[str, Any],
                            adapter: str | None) -> dict[str, Any]:
    """Preprocess: the backend's request (token ids in, sampling params) + the LoRA adapter."""
    from craft_ray.backends.vllm import preprocess

    out = preprocess(row, sampling)
    if adapter:
        out["model"] = adapter
    return out


def _map_hf_actors(ds: Any, cfg: EvaluateConfig, model: ModelSpec, actor: type,
                   extra: dict[str, Any]) -> Any:
    """``ds`` through a pool of hf actors that each load ``model`` (+ adapter) once."""
    import ray.data

    cpus = actor_cpus(cfg.num_cpus, cfg.concurrency, cfg.num_gpus)
    return ds.map_batches(
        actor, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_gpus=cfg.num_gpus or None, num_cpus=cpus,
        fn_constructor_kwargs={
            "model": model.model, "adapter": model.adapter,
            "merge_adapter": model.merge_adapter, "dtype": cfg.dtype,
            "num_gpus": cfg.num_gpus,
            "torch_threads": torch_threads(cpus, cfg.torch_threads),
            **extra,
        })


def _generate_rows(cfg: EvaluateConfig, model: ModelSpec, rows: list[dict[str, Any]]
                   ) -> list[dict[str, Any]]:
    """Answers of ``model`` to the prompt rows (columns: prediction, tokens_out, finish_reason,
    prompt_tokens added)."""
    import ray.data

    sampling = sampling_of(cfg.generation)
    ds = ray.data.from_items(rows)
    if cfg.backend == "hf":
        return _map_hf_actors(ds, cfg, model, HFTextGenerator, {
            "generate_batch_size": cfg.generation.generate_batch_size,
            "sampling": sampling}).take_all()
    from functools import partial

    from craft_ray.backends.vllm import postprocess, processor_config

    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ImportError("backend: vllm needs vLLM on the workers: pip install "
                          "'craft-ray[gpu]' (or pip install vllm)") from exc
    from ray.data.llm import build_processor

    vrows = [{**r, "sample_id": f"{r['model_name']}/{r['eval_set']}/{r['id']}",
              "prompt_token_ids": r["tokenized_prompt"], "schema": ""} for r in rows]
    processor = build_processor(
        processor_config(vllm_generation_config(cfg, model), resolve_model_path(model.model)),
        preprocess=partial(vllm_generation_request, sampling=sampling, adapter=model.adapter),
        postprocess=postprocess)
    got = []
    for r in processor(ray.data.from_items(vrows)).take_all():
        got.append({**r, "prediction": str(r.get("text") or "").strip(),
                    "prompt_tokens": int(r.get("tokens_in") or 0)})
    return got


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): normal-approximation CI of a mean (sample std), clipped to [0, 1]."""
    from statistics import NormalDist

    n = len(values)
    if n == 0:
        return 0.0, 0.0, 0.0
    mean = float(np.mean(values))
    if n == 1:
        return mean, mean, mean
    half = NormalDist().inv_cdf(0.5 + level / 2) * float(np.std(values, ddof=1)) / math.sqrt(n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def summarise_generative(rows: list[dict[str, Any]], level: float,
                         judged: dict[str, Any] | None) -> dict[str, Any]:
    """ROUGE-L (mean, CI) always; with a judge summary, the win rates (both ways) and their
    Wilson CIs, the win rate (CRAFT's: ties and unparsable as losses) being the metric."""
    n = len(rows)
    mean, lo, hi = mean_ci([r["rougeL_f1"] for r in rows], level)
    out: dict[str, Any] = {
        "metric": "rougeL_f1", "rougeL_f1": mean, "n": n, "ci_low": lo, "ci_high": hi,
        "ci_level": level, "ci_method": "normal", "rougeL_ci_low": lo, "rougeL_ci_high": hi,
        "empty_predictions": sum(1 for r in rows if not r["prediction"]),
        "truncated": sum(1 for r in rows if r.get("truncated")),
        "finish_reasons": dict(sorted(Counter(r["finish_reason"] for r in rows).items())),
    }
    if judged is not None:
        w, d = judged["wins"], judged["wins"] + judged["losses"]
        lo_w, hi_w = wilson_interval(w, n, level)
        lo_d, hi_d = wilson_interval(w, d, level)
        out.update({k: judged[k] for k in ("wins", "losses", "ties", "unparsable", "win_rate",
                                           "win_rate_decided", "win_rate_ties_half",
                                           "swapped")})
        out.update(metric="win_rate", ci_low=lo_w, ci_high=hi_w, ci_method="wilson",
                   win_rate_decided_ci_low=lo_d, win_rate_decided_ci_high=hi_d,
                   judge_seed=judged["seed"])
    return out


# --- sweep discovery ---------------------------------------------------------------------------


def discover_sweep_models(sweep: SweepModelsConfig, run_dir: str | Path) -> list[ModelSpec]:
    """One model per finished sweep trial: base model + the trial's adapter, with its size,
    seed and series (``sweep.group``). Read from the sweep's ``results.jsonl``.

    An adapter folder recorded at sweep time that has moved is looked up again at
    ``{sweep folder}/../train/{trial}/adapter``; a trial without an adapter is skipped with a
    warning.
    """
    from craft_ray.config import ConfigError

    sdir = Path(sweep.path) if sweep.path else Path(run_dir) / "sweep"
    table = sdir / "results.jsonl"
    if not table.is_file():
        raise ConfigError(f"evaluate.sweep: no sweep results at {table}; run `craft-ray "
                          "sweep` first or point evaluate.sweep.path at the sweep folder")
    base = sweep.base_model
    if base is None:
        import yaml

        conf = sdir / "config.yaml"
        data = yaml.safe_load(conf.read_text()) if conf.is_file() else None
        base = ((data or {}).get("train") or {}).get("base_model")
        if not base:
            raise ConfigError(f"evaluate.sweep: cannot read train.base_model from {conf}; "
                              "set evaluate.sweep.base_model")
    models = []
    for line in table.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        size = str(row["size"])
        if sweep.sizes is not None and size not in sweep.sizes:
            continue
        if row.get("status") != "finished":
            logger.warning("evaluate.sweep: trial %s did not finish (%s); not evaluated",
                           row.get("trial"), row.get("error") or row.get("status"))
            continue
        trial = str(row["trial"])
        candidates = [Path(row["adapter"])] if row.get("adapter") else []
        candidates.append(sdir.parent / "train" / trial / "adapter")
        adapter = next((c for c in candidates if (c / "adapter_config.json").is_file()), None)
        if adapter is None:
            logger.warning("evaluate.sweep: trial %s has no adapter at %s; not evaluated",
                           trial, " or ".join(map(str, candidates)))
            continue
        models.append(ModelSpec(name=trial, model=base, adapter=str(adapter.resolve()),
                                group=sweep.group, size=size, seed=row.get("seed"),
                                merge_adapter=sweep.merge_adapter))
    if not models:
        raise ConfigError(f"evaluate.sweep: no finished trial with an adapter in {table}")
    logger.info("evaluate.sweep: %d trials from %s", len(models), table)
    return models


def resolve_models(cfg: EvaluateConfig, run_dir: str | Path) -> list[ModelSpec]:
    """The listed models followed by the sweep's trials; names must stay unique."""
    from craft_ray.config import ConfigError

    models = list(cfg.models)
    if cfg.sweep is not None:
        models += discover_sweep_models(cfg.sweep, run_dir)
    names = [m.name for m in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"evaluate: model names {dup} are listed and also sweep trials; "
                          "rename the listed ones")
    return models


# --- stage -----------------------------------------------------------------------------------


def _stage_root(stage_cfg: EvaluateStageConfig) -> Path:
    cfg = stage_cfg.evaluate
    return Path(cfg.output_dir) if cfg.output_dir else Path(stage_cfg.run_dir) / "evaluate"


def _pair_hash(cfg: EvaluateConfig, model: ModelSpec, es: EvalSetConfig) -> str:
    class _Key(StrictModel):
        model: ModelSpec
        eval_set: EvalSetConfig
        task: str | None
        backend: str
        template: str
        plain_template: str
        system_prompt: str | None
        letter_prefixes: list[str]
        top_logprobs: int | None
        max_prompt_tokens: int

    return config_hash(_Key(model=model, eval_set=es, task=cfg.task, backend=cfg.backend,
                            template=cfg.template, plain_template=cfg.plain_template,
                            system_prompt=cfg.system_prompt,
                            letter_prefixes=cfg.letter_prefixes,
                            top_logprobs=cfg.vllm.top_logprobs if cfg.backend == "vllm" else None,
                            max_prompt_tokens=cfg.max_prompt_tokens))


def summarise(rows: list[dict[str, Any]], level: float) -> dict[str, Any]:
    """accuracy, n, CI, correct, unanswered (no usable letter), gold/prediction counts."""
    n = len(rows)
    k = sum(1 for r in rows if r["correct"])
    lo, hi = wilson_interval(k, n, level)
    return {
        "metric": "accuracy", "accuracy": k / n if n else 0.0, "n": n, "correct": k,
        "ci_low": lo, "ci_high": hi, "ci_level": level, "ci_method": "wilson",
        "unanswered": sum(1 for r in rows if not r["prediction"]),
        "truncated": sum(1 for r in rows if r.get("truncated")),
        "gold_counts": dict(sorted(Counter(r["gold"] for r in rows).items())),
        "prediction_counts": dict(sorted(Counter(r["prediction"] or "none"
                                                 for r in rows).items())),
    }


def _write_predictions(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from craft_ray.runtime import tmp_path_for

    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    tmp = tmp_path_for(out_dir / "predictions.parquet")
    pq.write_table(table, tmp)
    tmp.replace(out_dir / "predictions.parquet")
    atomic_write_text(out_dir / "predictions.jsonl", "".join(
        json.dumps(r, default=_json_default) + "\n" for r in rows))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _clean_row(r: dict[str, Any]) -> dict[str, Any]:
    """One per-item output row with plain Python values; None for absent letters' scores."""
    letters = [str(x) for x in r["letters"]]
    scores = {}
    for letter in LETTERS:
        v = r.get(f"score_{letter}")
        if letter in letters:
            fv = float(v) if v is not None else NEG_INF
            scores[letter] = fv if math.isfinite(fv) else None  # -inf -> null in JSON
    pred = str(r["prediction"]) or None
    return {
        "id": str(r["id"]), "eval_set": str(r["eval_set"]), "model": str(r["model_name"]),
        "prompt": str(r["prompt"]), "letters": letters,
        "letter_scores": json.dumps(scores), "prediction": pred, "gold": str(r["gold"]),
        "correct": pred == str(r["gold"]), "prompt_tokens": int(r.get("prompt_tokens") or 0),
        "truncated": bool(r.get("truncated", False)),
    }


def _score_rows(cfg: EvaluateConfig, model: ModelSpec, rows: list[dict[str, Any]],
                letter_ids: dict[str, list[int]]) -> list[dict[str, Any]]:
    import ray.data

    ds = ray.data.from_items(rows)
    if cfg.backend == "hf":
        scored = _map_hf_actors(ds, cfg, model, HFLetterScorer, {
            "letter_ids": letter_ids, "forward_batch_size": cfg.forward_batch_size,
            "max_prompt_tokens": cfg.max_prompt_tokens})
    else:
        from functools import partial

        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise ImportError("backend: vllm needs vLLM on the workers: pip install "
                              "'craft-ray[gpu]' (or pip install vllm)") from exc
        from ray.data.llm import build_processor

        processor = build_processor(
            vllm_processor_config(cfg, model),
            preprocess=partial(vllm_request, top_logprobs=cfg.vllm.top_logprobs,
                               adapter=model.adapter),
            postprocess=partial(vllm_scores, letter_ids=letter_ids),
        )
        scored = processor(ds)
    return [_clean_row(r) for r in scored.take_all()]


def _gen_pair_hash(cfg: EvaluateConfig, model: ModelSpec, es: EvalSetConfig,
                   max_new_tokens: int) -> str:
    class _Key(StrictModel):
        model: ModelSpec
        eval_set: EvalSetConfig
        backend: str
        template: str
        plain_template: str
        system_prompt: str | None
        max_prompt_tokens: int
        max_new_tokens: int
        generation: GenerationConfig
        judge: JudgeModelConfig | None
        judge_seed: int | None
        judge_template: str | None

    judged = cfg.judge is not None
    return config_hash(_Key(model=model, eval_set=es, backend=cfg.backend, template=cfg.template,
                            plain_template=cfg.plain_template, system_prompt=cfg.system_prompt,
                            max_prompt_tokens=cfg.max_prompt_tokens,
                            max_new_tokens=max_new_tokens, generation=cfg.generation,
                            judge=cfg.judge, judge_seed=cfg.judge_seed if judged else None,
                            judge_template=cfg.judge_template if judged else None))


def _generative_task(cfg: EvaluateConfig, es: EvalSetConfig) -> Any:
    """The task formatting a generative set: the set's CRAFT task (``evaluate.task``, when it
    names a generative task, must be that one)."""
    from craft_ray.config import ConfigError
    from craft_ray.evalsets import GENERATIVE_SETS

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


def _prompt_rows(model: ModelSpec, name: str, prompts: list[str], ids: list[list[int]],
                 cfg: EvaluateConfig, extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for p, x, e in zip(prompts, ids, extra):
        # keep the end when too long: the answer position must stay
        rows.append({"eval_set": name, "model_name": model.name, "prompt": p,
                     "tokenized_prompt": x[-cfg.max_prompt_tokens:],
                     "truncated": len(x) > cfg.max_prompt_tokens, **e})
    return rows


def run_evaluate(stage_cfg: EvaluateStageConfig, *, force: bool = False,
                 base_dir: str | Path | None = None,
                 judge_generate: Any | None = None) -> dict[str, Any]:
    """Run the evaluation stage (Ray must be initialised). Returns the stage's stats.

    Multiple-choice sets are scored by letter log-probs; on generative sets each model
    writes its answers, scored by ROUGE-L and (with ``judge``) the judge's win rate, all
    (model, set) pairs in one judge call. Every pair whose results exist for the same
    settings is kept (resume); ``force`` recomputes all. The summary files are rewritten from
    all pairs at the end. ``judge_generate`` (prompts -> answers) replaces the configured
    judge backend (tests, custom judges).
    """
    from transformers import AutoTokenizer

    cfg = stage_cfg.evaluate
    root = _stage_root(stage_cfg)
    stage = StageDir(root.parent, root.name)
    models = resolve_models(cfg, stage_cfg.run_dir)
    names = [m.name for m in models]
    if not force and stage.is_complete(cfg):
        done = json.loads((stage.path / "stats.json").read_text())
        if done.get("models", names) == names:
            logger.info("evaluate: already complete in %s (same config); skipping", stage.path)
            return done
        logger.info("evaluate: the sweep has other trials than last time; updating")
    task = load_task(cfg.task) if cfg.task and any(
        es.kind == "multiple_choice" for es in cfg.sets) else None
    # Load every set first: a missing file or an unreachable hub stops before any model loads.
    loaded = {}
    for es in cfg.sets:
        items, rejects = load_eval_set(es, base_dir)
        gtask = _generative_task(cfg, es) if es.kind == "generative" else None
        loaded[es.display_name] = (es, items, rejects, gtask)
    _check_models(cfg, models)
    stage.begin(cfg)
    stats = StageStats("evaluate")
    for name, (_es, items, rejects, _t) in loaded.items():
        stats.rows_in += len(items) + len(rejects)
        stats.rejects.update(f"{name}:{r.reason}" for r in rejects)
        atomic_write_text(stage.path / "rejects" / f"{name}.jsonl", "".join(
            json.dumps(r.__dict__) + "\n" for r in rejects))

    results: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []  # generated pairs waiting for ROUGE-L / the judge
    for model in models:
        tok = AutoTokenizer.from_pretrained(model.adapter if model.adapter and _has_tokenizer(
            model.adapter) else resolve_model_path(model.model))
        mc_rows: list[dict[str, Any]] = []
        gen_rows: list[dict[str, Any]] = []
        mc_sets, gen_sets = [], []
        for name, (es, items, _r, gtask) in loaded.items():
            pair_dir = stage.path / model.name / name
            max_new = (cfg.generation.max_new_tokens or gtask.max_new_tokens) if gtask else 0
            key = (_gen_pair_hash(cfg, model, es, max_new) if gtask
                   else _pair_hash(cfg, model, es))
            res_path = pair_dir / "results.json"
            if not force and res_path.is_file() and \
                    json.loads(res_path.read_text()).get("pair_hash") == key:
                logger.info("evaluate: %s on %s already done; keeping it", model.name, name)
                results.append(json.loads(res_path.read_text()))
                continue
            if gtask is None:
                prompts, ids = render_prompts([task_prompt(it, task) for it in items], tok,
                                              cfg.template, cfg.plain_template,
                                              cfg.system_prompt)
                mc_sets.append((name, es, key))
                mc_rows += _prompt_rows(model, name, prompts, ids, cfg, [
                    {"id": it.id, "letters": "".join(it.letters), "gold": it.gold}
                    for it in items])
            else:
                pairs = [gtask.training_pair(it.record) for it in items]
                prompts, ids, cut = fit_generative_prompts(
                    [p for p, _ in pairs], tok, cfg.max_prompt_tokens, cfg.template,
                    cfg.plain_template, cfg.system_prompt)
                gen_sets.append((name, es, key))
                gen_rows += _prompt_rows(model, name, prompts, ids, cfg, [
                    {"id": it.id, "instruction": p, "reference": ref, "max_new_tokens": max_new,
                     "truncated": c}
                    for it, (p, ref), c in zip(items, pairs, cut)])
        if mc_rows:
            logger.info("evaluate: scoring %s (%s%s) on %d items with %s", model.name,
                        model.model, f" + {model.adapter}" if model.adapter else "",
                        len(mc_rows), cfg.backend)
            scored = _score_rows(cfg, model, mc_rows, _letter_ids(tok, cfg))
            stats.rows_out += len(scored)
            for name, es, key in mc_sets:
                rows = sorted((r for r in scored if r["eval_set"] == name),
                              key=lambda r: r["id"])
                pair_dir = stage.path / model.name / name
                _write_predictions(pair_dir, rows)
                res = {**_result_head(cfg, model, es, name, key),
                       **summarise(rows, cfg.ci_level)}
                atomic_write_json(pair_dir / "results.json", res)
                logger.info("evaluate: %s on %s: accuracy %.4f (n=%d, %.0f%% CI %.4f-%.4f)",
                            model.name, name, res["accuracy"], res["n"], 100 * cfg.ci_level,
                            res["ci_low"], res["ci_high"])
                results.append(res)
        if gen_rows:
            logger.info("evaluate: %s (%s%s) answers %d generative items with %s",
                        model.name, model.model, f" + {model.adapter}" if model.adapter
                        else "", len(gen_rows), cfg.backend)
            answered = _generate_rows(cfg, model, gen_rows)
            stats.rows_out += len(answered)
            for name, es, key in gen_sets:
                rows = sorted((_clean_gen_row(r) for r in answered if r["eval_set"] == name),
                              key=lambda r: r["id"])
                pending.append({"model": model, "name": name, "es": es, "key": key,
                                "rows": rows})

    results += _finish_generative(cfg, stage.path, pending, judge_generate)
    write_summary(stage.path, results, plot=cfg.plot)
    from craft_ray.plots import metric_of

    stats.extra["results"] = [{"model": r["model"], "eval_set": r["eval_set"],
                               "metric": metric_of(r)[0], "value": metric_of(r)[1],
                               "n": r["n"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}
                              for r in results]
    stats.extra["models"] = names
    stats.extra["outputs"] = str(stage.path)
    return stage.finish(cfg, stats)


def _letter_ids(tok: Any, cfg: EvaluateConfig) -> dict[str, list[int]]:
    return letter_token_ids(tok, LETTERS, cfg.letter_prefixes)


def _result_head(cfg: EvaluateConfig, model: ModelSpec, es: EvalSetConfig, name: str,
                 key: str) -> dict[str, Any]:
    return {"model": model.name, "base_model": model.model, "adapter": model.adapter,
            "group": model.series, "size": model.size, "seed": model.seed,
            "eval_set": name, "eval_source": es.name, "kind": es.kind, "backend": cfg.backend,
            "task": es.task or cfg.task, "pair_hash": key}


def _clean_gen_row(r: dict[str, Any]) -> dict[str, Any]:
    """One generated item with plain Python values (scores are added later)."""
    return {"id": str(r["id"]), "eval_set": str(r["eval_set"]), "model": str(r["model_name"]),
            "instruction": str(r["instruction"]), "prompt": str(r["prompt"]),
            "prediction": str(r.get("prediction") or ""), "reference": str(r["reference"]),
            "prompt_tokens": int(r.get("prompt_tokens") or 0),
            "tokens_out": int(r.get("tokens_out") or 0),
            "finish_reason": str(r.get("finish_reason") or ""),
            "truncated": bool(r.get("truncated", False))}


def _finish_generative(cfg: EvaluateConfig, out: Path, pending: list[dict[str, Any]],
                       judge_generate: Any | None) -> list[dict[str, Any]]:
    """ROUGE-L of every generated pair, then (with a judge) one judge call over all pairs;
    writes each pair's predictions and results; returns the results."""
    from craft_ray.judge import backend_generate, judge_groups, rouge_l

    if not pending:
        return []
    for p in pending:
        rouge = rouge_l([r["prediction"] for r in p["rows"]], [r["reference"] for r in p["rows"]])
        for r, f1 in zip(p["rows"], rouge["per_item"]):
            r["rougeL_f1"] = float(f1)
    judged: list[dict[str, Any] | None] = [None] * len(pending)
    if cfg.judge is not None or judge_generate is not None:
        gen = judge_generate
        if gen is None:
            assert cfg.judge is not None
            gen = backend_generate(cfg.judge, cfg.judge_seed)
        logger.info("evaluate: judging %d pairs (%d items)", len(pending),
                    sum(len(p["rows"]) for p in pending))
        groups = [([r["instruction"] for r in p["rows"]], [r["reference"] for r in p["rows"]],
                   [r["prediction"] for r in p["rows"]]) for p in pending]
        for i, (summary, jrows) in enumerate(judge_groups(groups, gen, cfg.judge_seed,
                                                          cfg.judge_template)):
            judged[i] = summary
            for r, j in zip(pending[i]["rows"], jrows):
                r.update({k: j[k] for k in ("swapped", "judge_answer", "verdict", "outcome")})
    results = []
    for p, summary in zip(pending, judged):
        model, name = p["model"], p["name"]
        pair_dir = out / model.name / name
        _write_predictions(pair_dir, p["rows"])
        res = {**_result_head(cfg, model, p["es"], name, p["key"]),
               **summarise_generative(p["rows"], cfg.ci_level, summary)}
        if summary is not None:
            res["judge_model"] = cfg.judge.model if cfg.judge else "custom"
        atomic_write_json(pair_dir / "results.json", res)
        logger.info("evaluate: %s on %s: ROUGE-L %.4f%s (n=%d)", model.name, name,
                    res["rougeL_f1"], f", win rate {res['win_rate']:.4f}"
                    if summary is not None else "", res["n"])
        results.append(res)
    return results


def _check_models(cfg: EvaluateConfig, models: Sequence[ModelSpec] | None = None) -> None:
    from craft_ray.config import ConfigError

    for m in (cfg.models if models is None else models):
        if m.adapter and not (Path(m.adapter) / "adapter_config.json").is_file():
            raise ConfigError(f"model {m.name!r}: adapter {m.adapter} has no adapter_config.json "
                              "(point adapter at a PEFT folder, e.g. RUN_DIR/train/TRIAL/adapter)")
        if m.model.startswith((".", "/")) and not Path(m.model).exists():
            raise ConfigError(f"model {m.name!r}: {m.model} does not exist")


def write_summary(out_dir: Path, results: list[dict[str, Any]], plot: bool = True) -> None:
    """results.json (all pairs), results.md (mean ± std table), accuracy.png and report.md."""
    from craft_ray.plots import aggregate, markdown_table, plot_vs_size, write_report

    results = sorted(results, key=lambda r: (r["eval_set"], r["model"]))
    atomic_write_json(out_dir / "results.json", results)
    rows = aggregate(results)
    atomic_write_text(out_dir / "results.md", markdown_table(rows))
    if plot:
        png = plot_vs_size(rows, out_dir / "accuracy.png")
        write_report(out_dir / "report.md", rows, png, results)
