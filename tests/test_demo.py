"""The demo's closing samples: filter survivors first, others only with the filter's reason."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_demo_samples_show_survivors_first_and_say_why_others_were_removed(tmp_path):
    from craft_ray.demo import demo_samples

    run = tmp_path / "run"
    clean = [{"sample_id": f"d{i}@0", "doc_id": f"d{i}", "sample_text": f"Q{i}?"} for i in range(4)]
    _write(run / "generate" / "clean.parquet", clean)
    _write(run / "retrieve" / "corpus_samples.parquet",
           [{"doc_id": f"d{i}", "text": f"Title {i}\nbody"} for i in range(4)])
    _write(run / "filter" / "survivors" / "part-0.parquet",
           [{"sample_id": "d3@0", "sample_text": "Q3?"}])
    _write(run / "filter" / "rejects" / "part-0.parquet",
           [{"sample_id": "d0@0", "reject_step": "fewshot_leakage"}])
    got = demo_samples(run, n=3)
    assert [(s["doc_id"], s["title"], s["note"]) for s in got] == [
        ("d3", "Title 3", ""),
        ("d0", "Title 0", "removed by the filter: fewshot_leakage"),
        ("d1", "Title 1", "removed by the filter: not in the dataset"),
    ]
    # before the filter has run: the clean generations as they are, without notes
    import shutil

    shutil.rmtree(run / "filter")
    assert [(s["doc_id"], s["note"]) for s in demo_samples(run, n=2)] == [("d0", ""), ("d1", "")]
