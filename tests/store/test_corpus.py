"""Corpus readers: stable ids, metadata, rejects with reasons, StackExchange assembly."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from craft_ray.config import ConfigError, validate
from craft_ray.store.corpus import (
    CorpusConfig,
    CorpusError,
    list_shards,
    make_doc_id,
    parse_doc_id,
    read_shard,
)
from tests.conftest import shared_data

LONG = "word " * 60  # 300 chars, inside the default 200..25,000 bounds


def _all(cfg: CorpusConfig, base: Path) -> list[dict]:
    return [r for s in list_shards(cfg, base) for r in read_shard(s, cfg)]


def test_doc_id_roundtrip():
    did = make_doc_id("c4", "en/c4-train.00001-of-01024.json.gz", 17)
    assert did == "c4/en/c4-train.00001-of-01024.json.gz#17"
    assert parse_doc_id(did) == ("c4", "en/c4-train.00001-of-01024.json.gz", 17)
    with pytest.raises(ValueError, match="not a craft_ray doc id"):
        parse_doc_id("no-row-here")


def test_c4_gz_reader_keeps_metadata_and_rejects_bad_lines(tmp_path: Path):
    shard = tmp_path / "c4" / "en" / "c4-train.00000-of-00002.json.gz"
    shard.parent.mkdir(parents=True)
    good = {"text": LONG, "url": "https://example.org/a", "timestamp": "2019-04-25T12:57:54Z"}
    lines = [
        json.dumps(good).encode(),                                # 0 ok
        b'{"text": "unterminated',                                 # 1 malformed json
        json.dumps({"url": "x"}).encode(),                         # 2 missing text
        json.dumps({"text": "   "}).encode(),                      # 3 empty text
        json.dumps({"text": "short"}).encode(),                    # 4 too short
        b'{"text": "caf\xe9 ' + b"x" * 300 + b'"}',                # 5 invalid utf-8
        json.dumps({"text": "y" * 30_000}).encode(),               # 6 too long
        b"",                                                       # 7 blank: skipped
        json.dumps({"text": LONG + "end", "url": "u2"}).encode(),  # 8 ok
    ]
    with gzip.open(shard, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    (tmp_path / "c4" / "en" / "c4-train.00001-of-00002.json.gz").write_bytes(
        gzip.compress(json.dumps(good).encode() + b"\n"))
    cfg = CorpusConfig(name="c4", format="c4", paths=["c4"])
    recs = _all(cfg, tmp_path)
    by_row = {(r["shard"], r["row"]): r for r in recs}
    first = "en/c4-train.00000-of-00002.json.gz"  # relative to the configured folder
    assert {r["shard"] for r in recs} == {first, "en/c4-train.00001-of-00002.json.gz"}
    ok = by_row[(first, 0)]
    assert ok["doc_id"] == f"c4/{first}#0" and ok["reject_reason"] is None
    assert json.loads(ok["metadata"]) == {"url": good["url"], "timestamp": good["timestamp"]}
    reasons = {row: by_row[(first, row)]["reject_reason"] for row in range(7)}
    assert reasons == {0: None, 1: "malformed_json", 2: "missing_text", 3: "empty_text",
                       4: "too_short", 5: "invalid_utf8", 6: "too_long"}
    assert by_row[(first, 8)]["reject_reason"] is None and (first, 7) not in by_row
    # Rejects keep the raw input so nothing is lost.
    assert by_row[(first, 1)]["raw"] == '{"text": "unterminated'
    # Same files, same ids on a second read.
    assert [r["doc_id"] for r in _all(cfg, tmp_path)] == [r["doc_id"] for r in recs]


def test_jsonl_with_title_and_custom_field(tmp_path: Path):
    p = tmp_path / "wiki.jsonl"
    p.write_text(json.dumps({"title": "Coffee", "body": LONG}) + "\n" +
                 json.dumps({"title": "Tea", "text": LONG}) + "\n")
    cfg = CorpusConfig(name="wikipedia", format="jsonl", paths=[str(p)], text_field="body",
                       title_field="title", min_chars=10)
    recs = _all(cfg, tmp_path)
    assert recs[0]["text"].startswith("Coffee\n\nword") and recs[0]["doc_id"] == "wikipedia/wiki.jsonl#0"
    assert json.loads(recs[0]["metadata"]) == {"title": "Coffee"}
    assert recs[1]["reject_reason"] == "missing_text"


def test_parquet_and_text_readers(tmp_path: Path):
    pq.write_table(pa.table({"content": [LONG, None, "tiny"], "lang": ["en", "en", "de"]}),
                   tmp_path / "part-0.parquet")
    cfg = CorpusConfig(name="pq", format="parquet", paths=[str(tmp_path)], text_field="content",
                       metadata_fields=["lang"])
    recs = _all(cfg, tmp_path)
    assert [r["reject_reason"] for r in recs] == [None, "missing_text", "too_short"]
    assert json.loads(recs[0]["metadata"]) == {"lang": "en"}
    with pytest.raises(CorpusError, match="no column 'text'"):
        _all(CorpusConfig(name="pq", format="parquet", paths=[str(tmp_path)]), tmp_path)

    tdir = tmp_path / "txt"
    tdir.mkdir()
    (tdir / "a.txt").write_text(LONG)
    (tdir / "b.txt").write_text(f"{LONG}\n\n\nshort line\n{LONG}\n")
    whole = _all(CorpusConfig(name="t", format="text", paths=[str(tdir)]), tmp_path)
    assert [r["doc_id"] for r in whole] == ["t/a.txt#0", "t/b.txt#0"]
    per_line = _all(CorpusConfig(name="t", format="text", paths=[str(tdir / "b.txt")],
                                 text_per_line=True), tmp_path)
    assert [(r["row"], r["reject_reason"]) for r in per_line] == [
        (0, None), (3, "too_short"), (4, None)]


POSTS = """<?xml version="1.0" encoding="utf-8"?>
<posts>
  <row Id="1" PostTypeId="1" AcceptedAnswerId="4" Score="5" Title="How to store beans?" Body="&lt;p&gt;Question &lt;b&gt;one&lt;/b&gt; body {pad}&lt;/p&gt;" Tags="&lt;storage&gt;" />
  <row Id="2" PostTypeId="1" Score="1" Title="Grind size?" Body="&lt;p&gt;Question two {pad}&lt;/p&gt;" />
  <row Id="3" PostTypeId="2" ParentId="2" Score="1" Body="&lt;p&gt;low voted answer&lt;/p&gt;" />
  <row Id="4" PostTypeId="2" ParentId="1" Score="0" Body="&lt;p&gt;accepted answer&lt;/p&gt;&lt;ul&gt;&lt;li&gt;a&lt;/li&gt;&lt;/ul&gt;" />
  <row Id="5" PostTypeId="2" ParentId="2" Score="7" Body="&lt;p&gt;top voted answer&lt;/p&gt;" />
  <row Id="6" PostTypeId="1" Score="0" Title="Unanswered?" Body="&lt;p&gt;No answers {pad}&lt;/p&gt;" />
  <row Id="7" PostTypeId="1" Score="0" Title="Tiny" Body="x" />
</posts>
"""


def test_stackexchange_documents(tmp_path: Path):
    site = tmp_path / "coffee.stackexchange.com"
    site.mkdir()
    (site / "Posts.xml").write_text(POSTS.format(pad="pad " * 50))
    cfg = CorpusConfig(name="se", format="stackexchange", paths=[str(tmp_path)])
    recs = {r["row"]: r for r in _all(cfg, tmp_path)}
    # rows are <row> element numbers of the questions
    assert sorted(recs) == [0, 1, 5, 6]
    q1 = recs[0]
    assert q1["doc_id"] == "se/coffee.stackexchange.com/Posts.xml#0"
    assert q1["text"].startswith("How to store beans?\n\nQuestion one body")
    assert q1["text"].endswith("accepted answer\n\n- a")  # accepted, not the higher-voted
    assert "<" not in q1["text"]
    meta = json.loads(q1["metadata"])
    assert meta["post_id"] == "1" and meta["answer_accepted"] is True
    assert meta["site"] == "coffee.stackexchange.com"
    assert recs[1]["text"].endswith("top voted answer")  # no accepted: top-voted answer
    assert json.loads(recs[1]["metadata"])["answer_accepted"] is False
    assert recs[5]["text"].startswith("Unanswered?") and recs[5]["reject_reason"] is None
    assert recs[6]["reject_reason"] == "too_short"


def test_real_stackexchange_dumps():
    root = shared_data("stackexchange")
    cfg = CorpusConfig(name="stackexchange", format="stackexchange", paths=[str(root)])
    shards = list_shards(cfg)
    assert [s.shard for s in shards] == ["beer.stackexchange.com/Posts.xml",
                                         "coffee.stackexchange.com/Posts.xml"]
    recs = [r for s in shards for r in read_shard(s, cfg)]
    # SOURCES.md: 663 + 225 questions
    assert len(recs) == 888
    docs = [r for r in recs if r["reject_reason"] is None]
    assert len(docs) > 850 and all(200 <= len(r["text"]) <= 25_000 for r in docs)
    assert len({r["doc_id"] for r in recs}) == len(recs)


def test_missing_paths_are_clear_errors(tmp_path: Path):
    with pytest.raises(CorpusError, match="does not exist"):
        list_shards(CorpusConfig(name="x", format="c4", paths=[str(tmp_path / "nope")]))
    with pytest.raises(CorpusError, match="matches no file"):
        list_shards(CorpusConfig(name="x", format="c4", paths=[str(tmp_path / "*.json.gz")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no file matching"):
        list_shards(CorpusConfig(name="x", format="c4", paths=[str(tmp_path / "empty")]))


def test_corpus_config_errors_name_the_key():
    with pytest.raises(ConfigError) as exc:
        validate(CorpusConfig, {"name": "a b", "format": "csv", "paths": [], "min_char": 3}, "t")
    msg = str(exc.value)
    assert "name:" in msg and "format:" in msg and "paths:" in msg and "min_char: unknown key" in msg


def test_corpora_on_s3_give_the_same_shards_and_records_as_on_disk(tmp_path: Path,
                                                                   s3_bucket: str):
    from craft_ray.runtime import storage

    (tmp_path / "se" / "coffee.stackexchange.com").mkdir(parents=True)
    (tmp_path / "se" / "coffee.stackexchange.com" / "Posts.xml").write_text(
        POSTS.format(pad="pad " * 50))
    (tmp_path / "c4" / "en").mkdir(parents=True)
    with gzip.open(tmp_path / "c4" / "en" / "c4-train.00000-of-00002.json.gz", "wt") as fh:
        fh.write(json.dumps({"text": LONG, "url": "u"}) + "\n{broken\n")
    pq.write_table(pa.table({"text": [LONG, None]}), tmp_path / "c4" / "p.parquet")
    (tmp_path / "plain").mkdir()  # uncompressed: read by lines from the object store's stream
    (tmp_path / "plain" / "a.jsonl").write_text(
        json.dumps({"text": LONG}) + "\n{broken\n\n" + json.dumps({"text": LONG + " 2"}) + "\n")
    (tmp_path / "plain" / "b.txt").write_text(f"{LONG}\n\n{LONG} again\n")
    storage.upload(tmp_path, f"{s3_bucket}/corpora")
    for fmt, rel, glob, per_line in [
            ("stackexchange", "se", None, False), ("c4", "c4", None, False),
            ("parquet", "c4/*.parquet", None, False), ("c4", "c4", ["en/*.gz"], False),
            ("jsonl", "plain/a.jsonl", None, False), ("text", "plain/b.txt", None, True),
            ("text", "plain/b.txt", None, False)]:
        local = CorpusConfig(name="x", format=fmt, paths=[str(tmp_path / rel)], glob=glob,
                             text_per_line=per_line)
        remote = local.model_copy(update={"paths": [f"{s3_bucket}/corpora/{rel}"]})
        assert [s.shard for s in list_shards(remote)] == [s.shard for s in list_shards(local)]
        assert _all(remote, tmp_path) == _all(local, tmp_path), (fmt, rel)
    with pytest.raises(CorpusError, match=f"{s3_bucket}/corpora/nothing"):
        list_shards(CorpusConfig(name="x", format="c4", paths=[f"{s3_bucket}/corpora/nothing"]))
