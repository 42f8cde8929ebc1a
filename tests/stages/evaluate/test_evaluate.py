"""Multiple-choice scoring: letter extraction, vLLM parsing, and an end-to-end run on Ray."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from craft_ray.evalsets.base import LETTERS, EvalItem, EvalSetConfig
from craft_ray.evalsets.loading import gold_distribution, load_eval_set
from craft_ray.stages.evaluate.config import EvaluateConfig, EvaluateStageConfig, ModelSpec
from craft_ray.stages.evaluate.prompts import craft_eval_prompt, render_prompts, task_prompt
from craft_ray.stages.evaluate.scoring import (
    letter_token_ids,
    log_softmax,
    predict_letter,
    scores_from_logprobs,
    wilson_interval,
)
from craft_ray.stages.evaluate.vllm import vllm_processor_config, vllm_request, vllm_scores
from tests.conftest import FIXTURES

EVAL = FIXTURES / "eval"
TINY_SEED = 1
NEG = float("-inf")

# Letter i has token id 10 + i; the "space" form of A is id 30.
IDS = {ltr: [10 + i] for i, ltr in enumerate(LETTERS)}
IDS["A"] = [10, 30]


def logits_with(values: dict[int, float], vocab: int = 40) -> np.ndarray:
    x = np.full(vocab, -5.0)
    for i, v in values.items():
        x[i] = v
    return log_softmax(x)


# --- letter extraction on constructed logits ------------------------------------------------


def test_argmax_over_item_letters_only():
    lp = logits_with({10: 1.0, 11: 2.0, 12: 9.0})  # C is best overall, item has only A/B
    s = scores_from_logprobs(lp, ["A", "B"], IDS)
    assert set(s) == {"A", "B"}
    assert predict_letter(s, ["A", "B"]) == "B"
    assert predict_letter(scores_from_logprobs(lp, LETTERS[:4], IDS), LETTERS[:4]) == "C"


def test_letter_score_is_best_surface_form():
    lp = logits_with({10: 0.0, 30: 6.0, 11: 3.0})  # " A" beats "B", bare "A" does not
    s = scores_from_logprobs(lp, ["A", "B"], IDS)
    assert s["A"] == pytest.approx(lp[30])
    assert predict_letter(s, ["A", "B"]) == "A"


def test_ties_go_to_the_first_letter():
    lp = logits_with({10: 2.0, 11: 4.0, 12: 4.0, 13: 4.0})
    assert predict_letter(scores_from_logprobs(lp, LETTERS[:4], IDS), LETTERS[:4]) == "B"
    assert predict_letter({"A": -1.0, "B": -1.0}, ["B", "A"]) == "B"


def test_missing_letters_in_sparse_logprobs_are_minus_inf():
    top = {12: {"logprob": -0.3}, "13": -1.2, 99: {"logprob": -0.1}}  # C, D present
    s = scores_from_logprobs(top, LETTERS[:4], IDS)
    assert s["A"] == NEG and s["B"] == NEG
    assert predict_letter(s, LETTERS[:4]) == "C"
    # only letters outside the item are present -> nothing usable -> no prediction (wrong)
    s2 = scores_from_logprobs({14: -0.1}, ["A", "B"], IDS)
    assert predict_letter(s2, ["A", "B"]) is None
    assert predict_letter({"A": float("nan"), "B": NEG}, ["A", "B"]) is None
    assert predict_letter({}, ["A"]) is None


def test_vllm_postprocess_row():
    row = {"id": "q1", "letters": ["A", "B", "C", "D"], "gold": "D", "prompt": "p",
           "generated_text": "D", "num_input_tokens": 17,
           "logprobs": [{13: {"logprob": -0.2, "rank": 1, "decoded_token": "D"},
                         10: {"logprob": -2.5, "rank": 2, "decoded_token": "A"}}]}
    out = vllm_scores(row, IDS)
    assert out["prediction"] == "D"
    assert out["score_D"] == pytest.approx(-0.2) and out["score_A"] == pytest.approx(-2.5)
    assert out["score_B"] == NEG and math.isnan(out["score_E"])
    assert out["prompt_tokens"] == 17 and "logprobs" not in out
    empty = vllm_scores({**row, "logprobs": None}, IDS)
    assert empty["prediction"] == ""


def test_vllm_config_construction_on_cpu():
    cfg = EvaluateConfig(
        models=[ModelSpec(name="m", model="/models/base", adapter="/runs/x/adapter")],
        sets=[EvalSetConfig(name="medmcqa")], backend="vllm", batch_size=16,
        vllm={"top_logprobs": 20, "max_model_len": 4096, "engine_kwargs": {"seed": 3}})
    pc = vllm_processor_config(cfg, cfg.models[0])
    assert pc.model_source == "/models/base" and pc.batch_size == 16
    # a model in a bucket stays a URI (no download on the driver): Ray Data LLM fetches it on
    # each engine's node
    remote = ModelSpec(name="r", model="s3://no-such-bucket-xyz/models/base")
    assert vllm_processor_config(cfg, remote).model_source == remote.model
    assert pc.engine_kwargs["max_logprobs"] == 20 and pc.engine_kwargs["enable_lora"]
    assert pc.engine_kwargs["max_model_len"] == 4096 and pc.engine_kwargs["seed"] == 3
    req = vllm_request({"prompt": "q"}, 20, "/runs/x/adapter")
    assert req["sampling_params"] == {"temperature": 0.0, "max_tokens": 1, "logprobs": 20}
    assert req["model"] == "/runs/x/adapter"  # ray.data.llm serves it as a LoRA request


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 0.0)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_config_errors_are_clear():
    from craft_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model names must be unique"):
        load_config(EvaluateStageConfig, None, [
            "evaluate.models=[{name: a, model: x}, {name: a, model: y}]",
            "evaluate.sets=[{name: medmcqa}]"])
    with pytest.raises(ConfigError, match="folder name"):
        load_config(EvaluateStageConfig, None, [
            "evaluate.models=[{name: '../a', model: x}]", "evaluate.sets=[{name: medmcqa}]"])


def test_prompt_is_the_task_training_prompt():
    from craft_ray.tasks.registry import get_task

    item = EvalItem(id="1", question="Q?", choices=["x", "y", "z"], letters=["A", "B", "C"],
                    gold="B", source="t")
    assert craft_eval_prompt(item) == "Q?\nA. x\nB. y\nC. z"
    medqa = get_task("medqa")
    # 3 options although medqa generates 4: eval items are not re-validated as samples
    assert task_prompt(item, medqa) == medqa.training_pair(
        {"question": "Q?", "options": ["A. x", "B. y", "C. z"], "answer": "B"})[0]
    q = "Is ice colder than boiling water?"
    yn = EvalItem(id="2", question=q, choices=["yes", "no"], letters=["A", "B"], gold="A",
                  source="csqa2")
    csqa = get_task("csqa")
    prompt = task_prompt(yn, csqa)
    assert prompt.endswith("A. Yes\nB. No")  # the task's spelling, as in its training data
    assert prompt == csqa.training_pair(csqa.validate(
        {"question": q, "options": ["A. Yes", "B. No"], "answer": "A"}))[0]
    with pytest.raises(ValueError, match="multiple-choice task"):
        task_prompt(yn, get_task("recipegen"))


def test_long_generative_prompt_loses_the_end_of_its_text_not_the_instruction(tiny):
    from transformers import AutoTokenizer

    from craft_ray.stages.evaluate.prompts import fit_generative_prompts

    tok = AutoTokenizer.from_pretrained(tiny / "base")
    long = "Please summarize the text below:\n" + " ".join(f"w{i}" for i in range(400))
    prompts, ids, cut = fit_generative_prompts([long, "Please summarize: short."], tok, 64,
                                               "chat")
    assert cut == [True, False]
    assert len(ids[0]) <= 64 and "Please summarize the text below:" in prompts[0]
    assert "w0 w1" in prompts[0] and "w399" not in prompts[0]
    # the chat template still closes the prompt (the generation prompt is at the end)
    full, _ = render_prompts(["x"], tok, "chat")
    assert prompts[0].endswith(full[0][full[0].index("x") + 1:])
    assert ids[1] == render_prompts(["Please summarize: short."], tok, "chat")[1][0]


def test_render_prompts_like_training(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "base")
    texts, ids = render_prompts(["Q?\nA. x\nB. y"], tok, "chat", system_prompt="Be brief.")
    assert texts[0].startswith(tok.bos_token) and "Be brief." in texts[0]
    assert ids[0] == tok(texts[0], add_special_tokens=False)["input_ids"]
    assert ids[0].count(tok.bos_token_id) == 1
    texts, ids = render_prompts(["Q?"], tok, "plain", plain_template="Question: {prompt}\n")
    assert texts == ["Question: Q?\n"]
    assert ids[0][0] == tok.bos_token_id and ids[0][1:] == tok(
        "Question: Q?\n", add_special_tokens=False)["input_ids"]
    from craft_ray.models.chat import encode_example

    full, n = encode_example(tok, "Q?", "B", template="plain",
                             plain_template="Question: {prompt}\n")
    assert full[:n] == ids[0]  # exactly the prefix training put before the answer


# --- tiny model + adapter, end to end on Ray -------------------------------------------------

def train_always_a(base: Path, out: Path, prompt_ids: list[list[int]], steps: int = 60
                   ) -> float:
    """LoRA fine-tune (plain torch loop) so the model answers 'A' after any prompt.

    Examples are built like train builds them: prompt ids + completion ids ('A' + EOS); the
    loss is on the letter only (the one token the evaluation reads).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    completion = tok("A", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    enc = [(x + completion, len(x)) for x in prompt_ids]
    loss = float("nan")
    for step in range(steps):
        batch = random.Random(step).sample(enc, min(8, len(enc)))
        width = max(len(x) for x, _ in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        att = torch.zeros_like(ids)
        lab = torch.full_like(ids, -100)
        for r, (x, n_prompt) in enumerate(batch):
            ids[r, : len(x)] = torch.tensor(x)
            att[r, : len(x)] = 1
            lab[r, n_prompt] = x[n_prompt]  # the answer letter: all the evaluation reads
        out_ = model(input_ids=ids, attention_mask=att, labels=lab)
        out_.loss.backward()
        opt.step()
        opt.zero_grad()
        loss = out_.loss.item()
        if loss < 0.02:
            break
    model.save_pretrained(out, save_embedding_layers=False)
    return loss


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    from craft_ray.models.tiny import build_tiny_causal_lm

    root = tmp_path_factory.mktemp("tiny")
    # with this seed the untrained model prefers other letters than A (asserted below)
    build_tiny_causal_lm(root / "base", seed=TINY_SEED, hidden_size=32)
    tok = AutoTokenizer.from_pretrained(root / "base")
    # train on 8 CommonsenseQA prompts; MedQA prompts (4x longer) are never seen in training
    items, _ = load_eval_set(EvalSetConfig(name="commonsenseqa", path=str(
        EVAL / "commonsenseqa_dev_slice.jsonl")))
    _, ids = render_prompts([task_prompt(it, None) for it in items[:8]], tok, "auto")
    loss = train_always_a(root / "base", root / "adapter", ids)
    assert loss < 0.1, f"tiny adapter did not learn to answer 'A' (loss {loss})"
    return root


def test_letter_token_ids_of_a_real_tokenizer(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "base")
    ids = letter_token_ids(tok, ["A", "B", "C"], ["", " "])
    for letter, cands in ids.items():
        assert tok.convert_ids_to_tokens(cands[0]) == letter
        assert all(tok.decode([c]).strip() == letter for c in cands)
    with pytest.raises(ValueError, match="no single token"):
        letter_token_ids(tok, ["AB-not-a-token"], [""])


def test_adapter_and_merged_adapter_give_the_same_scores(tiny, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from craft_ray.models.hf import load_hf_model

    # a non-trivial adapter without training: random B instead of PEFT's zero init
    torch.manual_seed(0)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny / "base"), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
        task_type="CAUSAL_LM")).save_pretrained(tmp_path / "rand_adapter")
    adapter = str(tmp_path / "rand_adapter")
    plain, tok = load_hf_model(str(tiny / "base"), adapter, False, "float32", "cpu")
    merged, _ = load_hf_model(str(tiny / "base"), adapter, True, "float32", "cpu")
    base, _ = load_hf_model(str(tiny / "base"), None, False, "float32", "cpu")
    x = torch.tensor([tok("Q?\nA. x\nB. y\n", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a, m, b = (net(input_ids=x).logits[0, -1] for net in (plain, merged, base))
    assert torch.allclose(a, m, atol=1e-4)
    assert not torch.allclose(a, b, atol=1e-3)  # the adapter changes the model
    # merging a LoRA on a tied lm_head would also rewrite the input embeddings: refused
    with pytest.raises(ValueError, match="tied"):
        load_hf_model(str(tiny / "base"), str(tiny / "adapter"), True, "float32", "cpu")


def test_evaluate_end_to_end_always_a(ray_local, tiny, tmp_path):
    """The adapter answers 'A' everywhere, so its accuracy is exactly the share of gold 'A'
    items; the base model is scored on the same prompts; outputs and plot are written."""
    from typer.testing import CliRunner

    from craft_ray.cli import app

    sets = [{"name": "commonsenseqa", "path": str(EVAL / "commonsenseqa_dev_slice.jsonl")},
            {"name": "medqa", "path": str(EVAL / "medqa_test_slice.jsonl")}]
    cfg = {"run_dir": str(tmp_path / "run"), "evaluate": {
        "models": [{"name": "base", "model": str(tiny / "base")},
                   {"name": "always-a", "model": str(tiny / "base"),
                    "adapter": str(tiny / "adapter"), "group": "craft", "size": "S"}],
        "sets": sets, "batch_size": 16, "forward_batch_size": 8}}
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["evaluate", "--config", str(cfg_path)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "run" / "evaluate"
    for s in sets:
        items, _ = load_eval_set(EvalSetConfig(**s))
        share_a = gold_distribution(items).get("A", 0) / len(items)
        r = json.loads((out / "always-a" / s["name"] / "results.json").read_text())
        assert r["prediction_counts"] == {"A": len(items)}
        assert r["accuracy"] == share_a and r["n"] == len(items)
        assert r["ci_low"] <= share_a <= r["ci_high"]
        base = json.loads((out / "base" / s["name"] / "results.json").read_text())
        assert base["n"] == len(items) and base["unanswered"] == 0
        # the precondition that makes this check mean something: 'A' is the adapter's doing
        assert base["prediction_counts"].get("A", 0) < len(items) / 2, base
        import pyarrow.parquet as pq

        rows = pq.read_table(out / "base" / s["name"] / "predictions.parquet").to_pylist()
        assert {r["id"] for r in rows} == {it.id for it in items}
        for row in rows:
            scores = json.loads(row["letter_scores"])
            assert list(scores) == row["letters"]
            assert row["prediction"] == max(scores, key=lambda k: scores[k])
            assert row["correct"] == (row["prediction"] == row["gold"])
    for f in ("results.json", "results.md", "accuracy.png", "report.md", "_SUCCESS"):
        assert (out / f).is_file(), f
    assert "craft" in (out / "results.md").read_text()

    # batched, padded scoring on the actors == one prompt at a time in this process
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "base")
    model = AutoModelForCausalLM.from_pretrained(tiny / "base").eval()
    ids = letter_token_ids(tok)
    rows = [json.loads(ln) for ln in
            (out / "base" / "medqa" / "predictions.jsonl").read_text().splitlines()][:3]
    for row in rows:
        with torch.no_grad():
            ids_ = tok(row["prompt"], add_special_tokens=False)["input_ids"]  # as training
            logits = model(input_ids=torch.tensor([ids_])).logits[0, -1]
        direct = scores_from_logprobs(log_softmax(logits.numpy()), row["letters"], ids)
        stored = json.loads(row["letter_scores"])
        for letter in row["letters"]:
            assert stored[letter] == pytest.approx(direct[letter], abs=1e-4)

    # a rerun with the same config does nothing; --force recomputes the same numbers
    before = (out / "results.json").read_text()
    res = CliRunner().invoke(app, ["evaluate", "--config", str(cfg_path)])
    assert res.exit_code == 0 and (out / "results.json").read_text() == before


@pytest.mark.gpu
def test_vllm_backend_scores_on_gpu(request, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    tiny = request.getfixturevalue("tiny")
    import ray

    from craft_ray.stages.evaluate.stage import run_evaluate

    ray.init(address="local", ignore_reinit_error=True)
    cfg = EvaluateStageConfig(run_dir=str(tmp_path / "run"), evaluate=EvaluateConfig(
        models=[ModelSpec(name="always-a", model=str(tiny / "base"),
                          adapter=str(tiny / "adapter"))],
        sets=[EvalSetConfig(name="medqa", path=str(EVAL / "medqa_test_slice.jsonl"))],
        backend="vllm", num_gpus=1, vllm={"top_logprobs": 20, "max_lora_rank": 8}))
    run_evaluate(cfg)
    r = json.loads((tmp_path / "run" / "evaluate" / "always-a" / "medqa" /
                    "results.json").read_text())
    assert r["prediction_counts"] == {"A": 30}


# --- generative sets ---------------------------------------------------------------------------

COPY = "Ingredients:\nsalt\nSteps:\nboil"  # what the copy model learns to answer, always


def test_trim_at_eos_and_mean_ci():
    from craft_ray.stages.evaluate.scoring import mean_ci, trim_at_eos

    assert trim_at_eos([5, 6, 2, 7], {2}, 10) == ([5, 6], True)
    assert trim_at_eos([5, 6, 7], {2}, 2) == ([5, 6], False)
    assert trim_at_eos([2], {2}, 5) == ([], True)
    mean, lo, hi = mean_ci([0.2, 0.4, 0.6, 0.8], 0.95)
    sd = float(np.std([0.2, 0.4, 0.6, 0.8], ddof=1))
    assert mean == pytest.approx(0.5) and hi - mean == pytest.approx(1.959964 * sd / 2, 1e-5)
    assert mean_ci([1.0, 1.0]) == (1.0, 1.0, 1.0) and mean_ci([]) == (0.0, 0.0, 0.0)


def test_vllm_generation_config_on_cpu():
    from craft_ray.stages.evaluate.vllm import vllm_generation_config, vllm_generation_request

    cfg = EvaluateConfig(
        models=[ModelSpec(name="m", model="/models/base", adapter="/runs/x/adapter")],
        sets=[EvalSetConfig(name="cnn_dailymail")], backend="vllm", batch_size=8,
        concurrency=2, vllm={"max_model_len": 16384, "tensor_parallel_size": 2,
                             "engine_kwargs": {"seed": 3}})
    bcfg = vllm_generation_config(cfg, cfg.models[0])
    from craft_ray.backends.vllm import processor_config

    pc = processor_config(bcfg, "/models/base")
    assert pc.model_source == "/models/base" and pc.batch_size == 8 and pc.concurrency == 2
    eng = pc.engine_kwargs
    assert eng["enable_lora"] and eng["max_lora_rank"] == 64 and eng["max_model_len"] == 16384
    assert eng["tensor_parallel_size"] == 2 and eng["seed"] == 3
    assert not vllm_generation_config(cfg, ModelSpec(name="b", model="/m")).engine_kwargs.get(
        "enable_lora")
    row = {"sample_id": "m/s/1", "prompt": "p", "prompt_token_ids": [1, 2],
           "max_new_tokens": 1536, "schema": ""}
    req = vllm_generation_request(row, {"temperature": 0.0, "top_p": 1.0, "top_k": -1,
                                        "seed": 0, "guided": False}, "/runs/x/adapter")
    sp = req["sampling_params"]
    assert sp["temperature"] == 0.0 and sp["max_tokens"] == 1536 and "structured_outputs" not in sp
    assert req["tokenized_prompt"] == [1, 2] and req["model"] == "/runs/x/adapter"


def _copy_set(tmp_path: Path) -> Path:
    """The RecipeNLG hub-form fixture plus one recipe whose reference is exactly COPY."""
    rows = [json.loads(ln) for ln in (EVAL / "recipenlg_hub.jsonl").read_text().splitlines()]
    rows = [r for r in rows if isinstance(r.get("ingredients"), list)]
    rows.append({"id": 999, "title": "Salted Water", "ingredients": ["salt"],
                 "directions": ["boil"], "link": "-", "source": 0, "ner": ["salt"]})
    path = tmp_path / "recipes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_copy_model(base: Path, out: Path, prompt_ids: list[list[int]], steps: int = 120
                     ) -> float:
    """Full fine-tune (a 'merged model') that answers COPY + EOS after any prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    comp = tok(COPY, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    enc = [x + comp for x in prompt_ids]
    width = max(len(x) for x in enc)
    ids = torch.full((len(enc), width), tok.pad_token_id)
    att = torch.zeros_like(ids)
    lab = torch.full_like(ids, -100)
    for r, (x, p) in enumerate(zip(enc, prompt_ids)):
        ids[r, : len(x)] = torch.tensor(x)
        att[r, : len(x)] = 1
        lab[r, len(p): len(x)] = torch.tensor(x[len(p):])
    loss = float("nan")
    for _ in range(steps):
        out_ = model(input_ids=ids, attention_mask=att, labels=lab)
        out_.loss.backward()
        opt.step()
        opt.zero_grad()
        loss = out_.loss.item()
        if loss < 0.02:
            break
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return loss


def test_generative_end_to_end_copy_model(ray_local, tmp_path):
    """A model trained to always answer COPY: every prediction is COPY, its ROUGE-L is
    rouge-score's of COPY against each reference (1.0 on the item whose reference is COPY),
    and a stub judge that prefers COPY gives wins everywhere except, depending on the seeded
    swap, the item where both outputs are COPY. The base model is evaluated beside it."""
    from rouge_score import rouge_scorer
    from transformers import AutoTokenizer

    from craft_ray.judging.pairwise import build_pairs
    from craft_ray.models.tiny import build_tiny_causal_lm
    from craft_ray.stages.evaluate.stage import run_evaluate
    from craft_ray.tasks.registry import get_task

    build_tiny_causal_lm(tmp_path / "base", seed=TINY_SEED, hidden_size=32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    recipes = EvalSetConfig(name="recipenlg", path=str(_copy_set(tmp_path)))
    items, _ = load_eval_set(recipes)
    task = get_task("recipegen")
    instructions = [task.training_pair(it.record)[0] for it in items]
    references = [task.training_pair(it.record)[1] for it in items]
    assert references[-1] == COPY and COPY not in references[:-1]
    _, ids = render_prompts(instructions, tok, "auto")
    loss = train_copy_model(tmp_path / "base", tmp_path / "copy", ids)
    assert loss < 0.05, f"the copy model did not learn its answer (loss {loss})"

    judge_prompts: list[str] = []

    def stub_judge(prompts: list[str]) -> list[str]:
        judge_prompts.extend(prompts)
        out = []
        for p in prompts:
            o1 = p.split("## Output (1)\n", 1)[1].split("\n\n## Output (2)", 1)[0]
            out.append("Output (1)" if o1 == COPY else "Output (2)" if (
                "## Output (2)\n" + COPY + "\n") in p else "I cannot decide.")
        return out

    cnn = EvalSetConfig(name="cnn_dailymail", path=str(EVAL / "cnn_dailymail_test.jsonl"),
                        limit=2)
    cfg = EvaluateStageConfig(run_dir=str(tmp_path / "run"), evaluate=EvaluateConfig(
        models=[ModelSpec(name="base", model=str(tmp_path / "base")),
                ModelSpec(name="copy", model=str(tmp_path / "copy"), group="craft")],
        sets=[recipes, cnn], generation={"max_new_tokens": 24}, batch_size=8,
        max_prompt_tokens=256))
    stats = run_evaluate(cfg, judge_generate=stub_judge)
    out = tmp_path / "run" / "evaluate"
    n = len(items)
    assert len(judge_prompts) == 2 * n + 2 * 2  # one call: both models, both sets

    r = json.loads((out / "copy" / "recipenlg" / "results.json").read_text())
    preds = [json.loads(ln) for ln in
             (out / "copy" / "recipenlg" / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in preds] == [COPY] * n
    assert {p["reference"] for p in preds} == set(references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = {ref: scorer.score(ref, COPY)["rougeL"].fmeasure for ref in references}
    for p in preds:
        assert p["rougeL_f1"] == pytest.approx(expected[p["reference"]])
        assert p["finish_reason"] == "stop" and p["instruction"] in p["prompt"]
    assert expected[COPY] == 1.0 and max(v for k, v in expected.items() if k != COPY) < 0.6
    assert r["rougeL_f1"] == pytest.approx(sum(expected.values()) / n)
    # the judge: COPY wins wherever it is shown; on the item whose reference is COPY too,
    # the stub answers "Output (1)", a win only when the seeded swap put the model there
    swap_last = build_pairs(instructions, references, [COPY] * n, 1234)[-1].swapped
    order = [it.id for it in items]
    assert [p["id"] for p in preds] == sorted(order)
    assert r["metric"] == "win_rate" and r["n"] == n
    assert r["wins"] == n - 1 + int(swap_last) and r["losses"] == 1 - int(swap_last)
    assert r["ties"] == 0 and r["unparsable"] == 0
    assert r["win_rate"] == pytest.approx(r["wins"] / n)
    assert r["ci_low"] <= r["win_rate"] <= r["ci_high"]

    base = json.loads((out / "base" / "recipenlg" / "results.json").read_text())
    bpreds = [json.loads(ln) for ln in
              (out / "base" / "recipenlg" / "predictions.jsonl").read_text().splitlines()]
    assert all(p["prediction"] != COPY for p in bpreds)  # COPY is the training's doing
    # the stub prefers the reference where it is COPY (a loss), else it cannot answer
    assert base["wins"] == 0 and base["losses"] == 1 and base["unparsable"] == n - 1
    assert base["win_rate"] == 0.0 and base["win_rate_decided"] == 0.0
    cnn_res = json.loads((out / "base" / "cnn_dailymail" / "results.json").read_text())
    assert cnn_res["n"] == 2 and cnn_res["task"] == "summarization"
    cnn_rows = [json.loads(ln) for ln in
                (out / "base" / "cnn_dailymail" / "predictions.jsonl").read_text().splitlines()]
    assert cnn_rows[0]["instruction"].startswith("Please summarize the text below:\n")
    assert all(row["tokens_out"] <= 24 for row in cnn_rows)
    for f in ("results.json", "results.md", "accuracy.png", "report.md", "_SUCCESS"):
        assert (out / f).is_file(), f
    assert "win_rate" in (out / "results.md").read_text()
    assert {x["model"] for x in stats["results"]} == {"base", "copy"}
    assert stats["models"] == ["base", "copy"]
    # a rerun with the same config generates and judges nothing again
    n_prompts = len(judge_prompts)
    again = run_evaluate(cfg, judge_generate=stub_judge)
    assert len(judge_prompts) == n_prompts and again["results"] == stats["results"]


# --- sweep discovery -----------------------------------------------------------------------------


def fake_sweep(run: Path) -> Path:
    """RUN_DIR/sweep as `craft-ray sweep` leaves it: config.yaml, results.jsonl, adapters."""
    sweep = run / "sweep"
    sweep.mkdir(parents=True)
    (sweep / "config.yaml").write_text("run_dir: x\ntrain:\n  base_model: org/base-7b\n"
                                       "sweep:\n  sizes: [S, M]\n")
    rows = []
    for size in ("S", "M"):
        for seed in (1, 2):
            trial = f"{size}-seed{seed}"
            adapter = run / "train" / trial / "adapter"
            adapter.mkdir(parents=True)
            (adapter / "adapter_config.json").write_text("{}")
            rows.append({"size": size, "seed": seed, "trial": trial, "status": "finished",
                         "adapter": str(adapter), "error": None})
    rows[1]["adapter"] = "/old/cluster/path/train/S-seed2/adapter"  # moved since the sweep
    rows.append({"size": "M", "seed": 3, "trial": "M-seed3", "status": "failed",
                 "adapter": None, "error": "RuntimeError: OOM"})
    (sweep / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sweep


def test_sweep_trials_are_discovered(tmp_path):
    from craft_ray.config import ConfigError
    from craft_ray.stages.evaluate.candidates import discover_sweep_models, resolve_models
    from craft_ray.stages.evaluate.config import SweepModelsConfig

    run = tmp_path / "run"
    fake_sweep(run)
    models = discover_sweep_models(SweepModelsConfig(), run)
    assert [m.name for m in models] == ["S-seed1", "S-seed2", "M-seed1", "M-seed2"]
    assert {m.model for m in models} == {"org/base-7b"}
    assert models[1].adapter == str((run / "train" / "S-seed2" / "adapter").resolve())
    assert [(m.size, m.seed, m.series) for m in models[:2]] == [("S", 1, "craft"),
                                                                 ("S", 2, "craft")]
    only_m = discover_sweep_models(SweepModelsConfig(sizes=["M"], base_model="/m"), run)
    assert [m.name for m in only_m] == ["M-seed1", "M-seed2"] and only_m[0].model == "/m"
    # listed models first, then the trials; a listed name that clashes is an error
    cfg = EvaluateConfig(models=[ModelSpec(name="base", model="org/base-7b")], sweep={},
                         sets=[EvalSetConfig(name="medmcqa")])
    assert [m.name for m in resolve_models(cfg, run)][:2] == ["base", "S-seed1"]
    clash = EvaluateConfig(models=[ModelSpec(name="S-seed1", model="x")], sweep={},
                           sets=[EvalSetConfig(name="medmcqa")])
    with pytest.raises(ConfigError, match="S-seed1"):
        resolve_models(clash, run)
    with pytest.raises(ConfigError, match="run `craft-ray sweep`"):
        discover_sweep_models(SweepModelsConfig(), tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="nothing to evaluate"):
        EvaluateConfig(sets=[EvalSetConfig(name="medmcqa")])


@pytest.mark.parametrize("task,set_name", [("summarization", "cnn_dailymail"),
                                           ("recipegen", "recipenlg")])
def test_shipped_generative_configs(task, set_name):
    """configs/{task}.yaml evaluates the sweep's trials + the base model on the real set with
    vLLM, and judges with Llama-3-70B-Instruct."""
    from craft_ray.config import load_config

    cfg = load_config(EvaluateStageConfig, Path(__file__).resolve().parents[3] / "configs" /
                      f"{task}.yaml").evaluate
    assert cfg.backend == "vllm" and cfg.sweep is not None and cfg.judge is not None
    assert [(s.name, s.kind, s.task) for s in cfg.sets] == [(set_name, "generative", task)]
    assert cfg.judge.model == "meta-llama/Meta-Llama-3-70B-Instruct"
    assert cfg.generation.temperature == 0.0


@pytest.mark.gpu
def test_vllm_generation_on_gpu(tmp_path):
    """Not run on CPU machines: base model answers a generative set through vLLM."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import ray

    from craft_ray.models.tiny import build_tiny_causal_lm
    from craft_ray.stages.evaluate.stage import run_evaluate

    build_tiny_causal_lm(tmp_path / "base", seed=TINY_SEED)
    ray.init(address="local", ignore_reinit_error=True)
    cfg = EvaluateStageConfig(run_dir=str(tmp_path / "run"), evaluate=EvaluateConfig(
        models=[ModelSpec(name="base", model=str(tmp_path / "base"))],
        sets=[EvalSetConfig(name="cnn_dailymail", path=str(EVAL / "cnn_dailymail_test.jsonl"),
                            limit=3)],
        backend="vllm", num_gpus=1, generation={"max_new_tokens": 16}))
    run_evaluate(cfg)
    r = json.loads((tmp_path / "run" / "evaluate" / "base" / "cnn_dailymail" /
                    "results.json").read_text())
    assert r["n"] == 3 and r["metric"] == "rougeL_f1"


def test_generative_set_uses_its_own_task():
    from craft_ray.config import ConfigError
    from craft_ray.stages.evaluate.prompts import generative_task

    cnn = EvalSetConfig(name="cnn_dailymail")
    for task in (None, "bioqa", "summarization"):  # an MC task is for the MC sets
        cfg = EvaluateConfig(task=task, models=[ModelSpec(name="m", model="x")], sets=[cnn])
        assert generative_task(cfg, cnn).name == "summarization"
    cfg = EvaluateConfig(task="recipegen", models=[ModelSpec(name="m", model="x")], sets=[cnn])
    with pytest.raises(ConfigError, match="recipegen"):
        generative_task(cfg, cnn)
