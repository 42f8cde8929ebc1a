"""report.html shows samples beside their source documents (score, few-shot imitated) and one
example of each reject reason; the page stays one self-contained file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from craft_ray.report.html import build_report


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shots = tmp_path / "faq.jsonl"
    shots.write_text(json.dumps({"Text": "t", "Instruction": "How is cold brew made?",
                                 "Output": "o"}) + "\n" +
                     json.dumps({"Text": "t", "Instruction": "Why is beer skunky?",
                                 "Output": "o"}) + "\n")
    (run / "generate").mkdir(parents=True)
    (run / "generate" / "config.yaml").write_text(
        f"run_dir: {run}\ngenerate:\n  fewshots: {{path: {shots}}}\n")
    _write(run / "generate" / "clean.parquet", [
        {"sample_text": "Q: Does grind size matter? A: Yes, finer extracts faster.",
         "doc_id": "se/coffee#3", "fewshot_ids": "['faq:0']"},
        {"sample_text": "Q: Why brown bottles? A: They block light.",
         "doc_id": "se/beer#9", "fewshot_ids": '["faq:1"]'},
    ])
    _write(run / "retrieve" / "corpus_samples.parquet", [
        {"doc_id": "se/coffee#3", "text": "Grind size changes extraction speed a lot.",
         "score": 0.8125, "corpus": "se"},
        {"doc_id": "se/beer#9", "text": "Light-struck beer smells of skunk.", "score": 0.5, "corpus": "se"},
    ])
    _write(run / "generate" / "rejects.parquet", [
        {"reject_reason": "No JSON found.", "reject_detail": "", "text": "I cannot do that"},
        {"reject_reason": "No JSON found.", "reject_detail": "", "text": "second one"},
        {"reject_reason": "Schema violation at answer", "reject_detail": "too short",
         "text": '{"question": "Why?", "answer": "x"}'},
    ])
    _write(run / "filter" / "rejects" / "part-0.parquet", [
        {"reject_reason": "near_duplicate", "reject_detail": "duplicate of se/beer#9@0",
         "sample_text": "Q: Why brown bottles?"}])
    (run / "evaluate" / "rejects").mkdir(parents=True)
    (run / "evaluate" / "rejects" / "quiz.jsonl").write_text(json.dumps(
        {"source": "quiz.jsonl", "row": 4, "reason": "bad_answer",
         "detail": "answer 'Z' is no letter", "raw": '{"q": "?", "ans": "Z"}'}) + "\n")
    return run


def test_samples_beside_documents_and_one_example_per_reject_reason(tmp_path: Path):
    page = build_report(_run(tmp_path)).read_text()
    samples = page[page.index("Samples beside their source documents"):
                   page.index("Rejects by reason")]
    assert "Does grind size matter?" in samples
    assert "Grind size changes extraction speed a lot." in samples and "0.812" in samples
    assert "faq:0" in samples and "How is cold brew made?" in samples
    assert "Why is beer skunky?" in samples  # a JSON list string too
    examples = page[page.index("One example of each reject reason"):]
    text = re.sub(r"<[^>]+>", "|", examples)
    assert "generate|No JSON found.|2|" in text.replace("||", "|")
    assert "I cannot do that" in examples and "second one" not in examples  # one example
    assert "Schema violation at answer" in examples and "too short" in examples
    assert "near_duplicate" in examples and "duplicate of se/beer#9@0" in examples
    assert "evaluate (quiz)" in examples and "bad_answer" in examples
    assert not re.search(r"(src|href)=\"https?://", page)  # one self-contained file


def test_sections_say_when_there_is_nothing_yet(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    page = build_report(tmp_path / "empty").read_text()
    assert "No generated samples yet." in page and "No rejected rows." in page
