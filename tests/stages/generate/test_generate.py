"""Generation stage: prompt building (seeded, chat template, length rules), parsing, outputs,
and the hf backend end to end on local Ray with a tiny random-init model."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from craft_ray.config import ConfigError, load_config
from craft_ray.models.tokenizers import load_chat_tokenizer
from craft_ray.stages.generate.config import GenerateStageConfig
from craft_ray.stages.generate.parse import (
    DROP_EMPTY,
    DROP_NO_ROOM,
    DROP_TOO_LONG,
    REJECT_TRUNCATED,
    parse_row,
    split_outputs,
)
from craft_ray.stages.generate.prompts import (
    PromptSettings,
    build_prompt_rows,
    draw,
    make_shot_pool,
)
from craft_ray.stages.generate.stage import run_generate
from craft_ray.tasks.fewshots import FewShotConfig
from craft_ray.tasks.registry import get_task
from tests.conftest import FIXTURES

GEN = FIXTURES / "generate"
SHOTS = GEN / "fewshots_short.jsonl"


def _docs() -> list[dict]:
    return [json.loads(line) for line in (GEN / "corpus_samples.jsonl").open()]


def _settings(**kw) -> PromptSettings:
    base = dict(task_name="bioqa", num_shots=2, samples_per_doc=1, seed=0, max_new_tokens=64,
                max_prompt_tokens=None, long_prompt="truncate_text", min_text_tokens=32,
                guided_max_string_chars=None)
    base.update(kw)
    return PromptSettings(**base)


@pytest.fixture(scope="module")
def tok(tiny_causal_lm):
    return load_chat_tokenizer(str(tiny_causal_lm))


def test_draw_is_seeded_per_document():
    a = [draw(0, f"c/s#{i}", 0, 32, 3, ["question", "statement"]) for i in range(20)]
    assert a == [draw(0, f"c/s#{i}", 0, 32, 3, ["question", "statement"]) for i in range(20)]
    assert len({tuple(x[1]) for x in a}) > 10  # documents get different few-shots
    assert {x[0] for x in a} == {"question", "statement"}  # csqa variants both drawn
    assert a != [draw(1, f"c/s#{i}", 0, 32, 3, ["question", "statement"]) for i in range(20)]
    assert all(len(set(x[1])) == 3 for x in a)  # k distinct few-shots


def test_prompts_use_the_chat_template_and_are_reproducible(tok):
    task = get_task("bioqa")
    pool = make_shot_pool(task, FewShotConfig(path=str(SHOTS)))
    rows = build_prompt_rows(_docs(), task, pool, _settings(), tok)
    again = build_prompt_rows(_docs(), task, pool, _settings(), tok)
    assert [r["prompt_hash"] for r in rows] == [r["prompt_hash"] for r in again]
    other = build_prompt_rows(_docs(), task, pool, _settings(seed=7), tok)
    assert [r["prompt_hash"] for r in rows] != [r["prompt_hash"] for r in other]
    r = rows[0]
    msgs = json.loads(r["messages"])
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 2 + ["user"]
    assert msgs[-1]["content"].endswith(_docs()[0]["text"].strip())
    assert "___________\nText: " in msgs[0]["content"]
    assert json.loads(msgs[1]["content"])["answer"] in "ABCD"  # few-shot answer as JSON
    # rendered by the tokenizer's own template (tiny.CHAT_TEMPLATE), not [INST]
    assert r["prompt"].startswith("<s><|user|>\nPlease carefully read")
    assert r["prompt"].endswith("<|assistant|>\n") and "[INST]" not in r["prompt"]
    assert r["prompt_tokens"] == len(r["prompt_token_ids"]) > 0
    assert r["sample_id"] == f"{r['doc_id']}@0" and r["retrieved_by"] == ["bioqa:0"]
    assert len(r["fewshot_ids"]) == 2 and r["drop_reason"] == ""


def test_long_prompt_rules(tok):
    task = get_task("bioqa")
    pool = make_shot_pool(task, FewShotConfig(path=str(SHOTS)))
    doc = dict(_docs()[0], text=" ".join([_docs()[0]["text"]] * 6))
    full = build_prompt_rows([doc], task, pool, _settings(), tok)[0]
    budget = full["prompt_tokens"] - 400
    cut = build_prompt_rows([doc], task, pool, _settings(max_prompt_tokens=budget), tok)[0]
    assert cut["drop_reason"] == "" and cut["text_truncated"]
    assert budget - 20 <= cut["prompt_tokens"] <= budget
    dropped = build_prompt_rows([doc], task, pool,
                                _settings(max_prompt_tokens=budget, long_prompt="drop"), tok)[0]
    assert dropped["drop_reason"] == DROP_TOO_LONG and dropped["prompt"] == ""
    no_room = build_prompt_rows([doc], task, pool, _settings(max_prompt_tokens=100), tok)[0]
    assert no_room["drop_reason"] == DROP_NO_ROOM
    empty = build_prompt_rows([dict(doc, text="  ")], task, pool, _settings(), tok)[0]
    assert empty["drop_reason"] == DROP_EMPTY


def test_csqa_statement_prompts_show_statement_answers(tok):
    task = get_task("csqa")
    pool = make_shot_pool(task, FewShotConfig(path=str(GEN / "csqa_quirk.jsonl")),
                          text_max_chars=200)
    assert list(pool.quirks) == ["csqa_quirk:1"]  # the "No." answer, repaired and reported
    rows = build_prompt_rows(_docs(), task, pool, _settings(task_name="csqa", num_shots=1), tok)
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {"question", "statement"}
    stmt = json.loads(by_variant["statement"]["messages"])
    assert "statement" in json.loads(stmt[1]["content"])
    assert "exactly one statement" in stmt[0]["content"]
    assert '"statement"' in by_variant["statement"]["schema"]


def test_parse_row_reasons():
    task = get_task("bioqa")
    good = json.dumps({"question": "Which gas leaves freshly roasted coffee?",
                       "options": ["A. CO2", "B. O2", "C. H2", "D. He"], "answer": "A"})
    assert parse_row(task, good, "stop", "")[0]["answer"] == "A"
    assert parse_row(task, good[:40], "length", "") == (None, REJECT_TRUNCATED,
                                                        "Malformed or truncated JSON.")
    assert parse_row(task, good[:40], "stop", "")[1] == "Malformed or truncated JSON."
    assert parse_row(task, "", "error", "Request timed out after retries.")[1] == (
        "Request timed out after retries.")


def test_split_outputs_accounts_for_every_row():
    task = get_task("recipegen")
    rec = {"instruction": "Make cold brew coffee at home tonight.",
           "ingredients": ["coffee", "water"], "steps": ["Mix.", "Strain."]}
    base = dict(task="recipegen", corpus="c", retrieved_by=[], fewshot_ids=["r:1"],
                variant="default", prompt_hash="h", prompt_tokens=10, text_truncated=False,
                tokens_in=10, tokens_out=5, gen_seconds=0.1, finish_reason="stop",
                error_detail="", reject_detail="")
    rows = [dict(base, sample_id="c/s#1@0", doc_id="c/s#1", text=json.dumps(rec),
                 status="clean", reject_reason="", record=json.dumps(rec), sample_text="x"),
            dict(base, sample_id="c/s#0@0", doc_id="c/s#0", text="no", status="reject",
                 reject_reason="No JSON found.", record="", sample_text="")]
    out = split_outputs(rows, task)
    assert out["raw"].num_rows == 2 and out["raw"].column("sample_id").to_pylist() == [
        "c/s#0@0", "c/s#1@0"]
    assert out["clean"].num_rows == 1 and out["rejects"].num_rows == 1
    assert out["clean"].schema.field("ingredients").type == pa.list_(pa.string())
    assert out["clean"].to_pylist()[0]["steps"] == ["Mix.", "Strain."]
    assert split_outputs([], task)["clean"].column_names[:3] == task.record_fields


def test_config_errors_before_work(tmp_path, tiny_causal_lm):
    with pytest.raises(ConfigError, match="unknown task 'bioq'"):
        load_config(GenerateStageConfig, None, ["generate.task=bioq", "generate.model=x",
                                                f"generate.fewshots.path={SHOTS}"])
    cfg = load_config(GenerateStageConfig, None, [
        f"run_dir={tmp_path}", "generate.task=bioqa", f"generate.model={tiny_causal_lm}",
        f"generate.fewshots.path={SHOTS}", "generate.num_shots=5"])
    with pytest.raises(ConfigError, match="holds only 4 few-shots"):
        run_generate(cfg)
    cfg.generate.num_shots = 2
    with pytest.raises(ConfigError, match="run `craft-ray retrieve` first"):
        run_generate(cfg)
    assert not (tmp_path / "generate").exists()  # nothing started


# --- end to end on local Ray ---------------------------------------------------------------


def _write_corpus_samples(run_dir: Path) -> int:
    docs = _docs()
    docs.append(dict(docs[0], doc_id="coffee/Posts.xml#999", text=""))  # dropped: empty
    docs.append(dict(docs[1], doc_id="coffee/Posts.xml#998",  # truncated to fit
                     text=" ".join([docs[1]["text"]] * 8)))
    (run_dir / "retrieve").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(docs), run_dir / "retrieve" / "corpus_samples.parquet")
    return len(docs)


def _yaml(run_dir: Path, model: Path, **gen) -> Path:
    import yaml

    section = {"task": "bioqa", "fewshots": {"path": str(SHOTS)}, "model": str(model),
               "num_shots": 2, "max_prompt_tokens": 2600, "max_new_tokens": 200,
               "guided_max_string_chars": 24,
               "hf": {"batch_size": 8, "generate_batch_size": 4, "torch_threads": 1}}
    section.update(gen)
    p = run_dir / "generate.yaml"
    p.write_text(yaml.safe_dump({"run_dir": str(run_dir), "generate": section}))
    return p


def test_hf_backend_end_to_end(ray_local, tiny_causal_lm, tmp_path):
    from craft_ray.cli import app

    run_dir = tmp_path / "run"
    n_docs = _write_corpus_samples(run_dir)
    cfg_path = _yaml(run_dir, tiny_causal_lm)
    res = CliRunner().invoke(app, ["generate", "--config", str(cfg_path)])
    assert res.exit_code == 0, res.output
    out = run_dir / "generate"
    stats = json.loads((out / "stats.json").read_text())
    assert (out / "_SUCCESS").is_file()
    raw = pq.read_table(out / "raw.parquet").to_pylist()
    clean = pq.read_table(out / "clean.parquet")
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    drops = pq.read_table(out / "prompt_drops.parquet").to_pylist()
    # nothing lost: prompts = raw + drops, raw = clean + rejects
    assert stats["prompts"] == n_docs == len(raw) + len(drops)
    assert len(raw) == clean.num_rows + len(rejects)
    assert [d["drop_reason"] for d in drops] == [DROP_EMPTY]
    assert stats["prompts_text_truncated"] == 1
    # guided decoding: every generation is complete JSON valid under the (capped) schema
    task = get_task("bioqa")
    from craft_ray.backends import cap_string_lengths

    schema = cap_string_lengths(task.output_schema(), 24)
    for r in raw:
        assert r["finish_reason"] == "stop", r["text"]
        # a random model can end a string on part of a multi-byte character: the grammar
        # counted it as one character, the tokenizer's decode writes U+FFFD for each stray byte
        text = r["text"].replace("\ufffd", "")
        jsonschema.validate(json.loads(text, strict=False), schema)
        assert r["tokens_in"] > 0 and 0 < r["tokens_out"] <= 200 and r["gen_seconds"] > 0
    # what fails is only the task's own rules (a random model writes whitespace questions)
    allowed = {"No question found / below 15 characters.", "Duplicate answer options.",
               "Option shorter than 2 characters.", "Option is only a letter label.",
               "Question repeats an answer option."}
    assert {r["reject_reason"] for r in rejects} <= allowed
    assert clean.num_rows >= 1
    cols = set(clean.column_names)
    assert {"question", "options", "answer", "sample_id", "task", "doc_id", "corpus",
            "fewshot_ids", "prompt_hash", "sample_text"} <= cols
    row = clean.to_pylist()[0]
    assert len(row["options"]) == 4 and row["answer"] in "ABCD" and row["task"] == "bioqa"
    assert len(row["fewshot_ids"]) == 2 and row["sample_text"].startswith(row["question"])
    assert stats["tokens_in"] > 0 and stats["tokens_out"] > 0 and stats["samples_per_s"] > 0
    assert stats["samples"] == clean.num_rows
    assert sum(stats["rejects"].values()) == len(rejects) + len(drops)

    # a rerun with the same config is skipped; the outputs stay
    res2 = CliRunner().invoke(app, ["generate", "--config", str(cfg_path), "--json"])
    assert res2.exit_code == 0 and json.loads(res2.stdout.strip().splitlines()[-1]) == stats

    # guided decoding off, few tokens: every generation is rejected with its reason, and
    # the prompts are the same as before (same seed)
    cfg = load_config(GenerateStageConfig, cfg_path, [
        f"run_dir={tmp_path / 'run2'}", f"generate.input_path={run_dir}/retrieve/"
        "corpus_samples.parquet", "generate.guided_decoding=false",
        "generate.max_new_tokens=12"])
    stats2 = run_generate(cfg)
    raw2 = pq.read_table(tmp_path / "run2" / "generate" / "raw.parquet").to_pylist()
    rej2 = pq.read_table(tmp_path / "run2" / "generate" / "rejects.parquet").to_pylist()
    assert stats2["samples"] == 0 and len(rej2) == len(raw2) == len(raw)
    assert {r["reject_reason"] for r in rej2} <= {
        REJECT_TRUNCATED, "No JSON found.", "Malformed or truncated JSON.", "Empty generation."}
    assert stats2["generation_rejects"].get(REJECT_TRUNCATED, 0) >= 1
    assert [r["prompt_hash"] for r in raw2] == [r["prompt_hash"] for r in raw]


def test_shipped_example_config_loads_for_every_backend():
    for backend in ("vllm", "hf", "openai"):
        cfg = load_config(GenerateStageConfig, GEN / "generate.yaml",
                          [f"generate.backend={backend}"])
        assert cfg.generate.backend == backend and cfg.generate.task == "bioqa"
    assert cfg.generate.vllm.max_model_len == 20480


def test_custom_task_prompts(tmp_path, tok):
    spec = {"name": "faq", "meta_instruction": "Read the text. Write one FAQ entry as JSON "
            '{"question": "...", "answer": "..."}',
            "fields": [{"name": "question", "min_chars": 10}, {"name": "answer"}],
            "fewshot_fields": {"question": "{Instruction}", "answer": "{Output}"}}
    shots = tmp_path / "faq.jsonl"
    shots.write_text("".join(json.dumps({"Text": f"Text {i} about grinding coffee.",
                                         "Instruction": f"How fine is grind {i}?",
                                         "Output": "Medium."}) + "\n" for i in range(3)))
    # a mapping under generate.task (YAML) validates as a custom task
    gen = GenerateStageConfig.model_validate(
        {"generate": {"task": spec, "model": "m", "fewshots": {"path": str(shots)}}})
    task = gen.generate.task_obj()
    assert task.name == "faq" and task.record_fields == ["question", "answer"]
    pool = make_shot_pool(task, FewShotConfig(path=str(shots)))
    rows = build_prompt_rows(_docs()[:2], task, pool, _settings(task_name="faq"), tok)
    msgs = json.loads(rows[0]["messages"])
    assert msgs[0]["content"].startswith("Read the text. Write one FAQ entry")
    assert json.loads(msgs[1]["content"]).keys() == {"question", "answer"}
    assert json.loads(rows[0]["schema"])["required"] == ["question", "answer"]
