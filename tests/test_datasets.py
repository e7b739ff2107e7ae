"""Evaluation dataset loading: every bad input gets a clear error or a reported policy."""
from __future__ import annotations

import pytest

from evaluation.datasets import DatasetError, load_dataset
from tests.conftest import write_jsonl


def make_dataset(root, qrels_lines, split="test", corpus=True, queries=True):
    root.mkdir(parents=True, exist_ok=True)
    if corpus:
        write_jsonl(root / "corpus.jsonl", [{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"}])
    if queries:
        write_jsonl(root / "queries.jsonl", [{"_id": "q1", "text": "x"}, {"_id": "q2", "text": "y"}])
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(l + "\n" for l in qrels_lines))
    return root


def test_good_dataset(tmp_path):
    ds = load_dataset(make_dataset(tmp_path / "ds", ["q1\td1\t1", "q2\td2\t2"]))
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}} and ds.queries == {"q1": "x", "q2": "y"}
    assert not any(ds.issues.values())


def test_missing_files(tmp_path):
    with pytest.raises(DatasetError, match="no corpus.jsonl or corpus.parquet in this folder"):
        load_dataset(make_dataset(tmp_path / "a", ["q1\td1\t1"], corpus=False))
    with pytest.raises(DatasetError, match="queries.jsonl: missing queries file"):
        load_dataset(make_dataset(tmp_path / "b", ["q1\td1\t1"], queries=False))
    with pytest.raises(DatasetError, match="no such dataset folder"):
        load_dataset(tmp_path / "nope")


def test_split_that_does_not_exist_lists_available(tmp_path):
    with pytest.raises(DatasetError, match=r"no qrels for split 'dev'.*available splits: \['test'\]"):
        load_dataset(make_dataset(tmp_path / "ds", ["q1\td1\t1"]), split="dev")


def test_unknown_documents_and_queries_are_dropped_and_counted(tmp_path):
    ds = load_dataset(make_dataset(tmp_path / "ds", ["q1\td1\t1", "q1\tghost\t1", "q9\td1\t1", "q2\tghost\t1"]))
    assert ds.qrels == {"q1": {"d1": 1}}  # q2 has no relevant document left in the corpus
    assert ds.issues == {"qrels_unknown_documents": 2, "qrels_unknown_queries": 1, "qrels_duplicate_lines": 0}
    assert list(ds.queries) == ["q1"]


def test_duplicate_qrels_lines(tmp_path):
    ds = load_dataset(make_dataset(tmp_path / "ds", ["q1\td1\t1", "q1\td1\t1"]))
    assert ds.issues["qrels_duplicate_lines"] == 1 and ds.qrels == {"q1": {"d1": 1}}
    with pytest.raises(DatasetError, match=r"test\.tsv:3: \(q1, d1\) judged twice with different scores"):
        load_dataset(make_dataset(tmp_path / "ds2", ["q1\td1\t1", "q1\td1\t2"]))


def test_malformed_qrels_line(tmp_path):
    with pytest.raises(DatasetError, match=r"test\.tsv:2: expected 3 tab-separated fields"):
        load_dataset(make_dataset(tmp_path / "ds", ["q1 d1 1"]))
    with pytest.raises(DatasetError, match=r"test\.tsv:2: score 'high' is not an integer"):
        load_dataset(make_dataset(tmp_path / "ds2", ["q1\td1\thigh"]))
    root = make_dataset(tmp_path / "ds3", ["q1\td1\t1"])
    qrels = next(root.rglob("test.tsv"))
    qrels.write_bytes(qrels.read_bytes() + b"q2\td\xff2\t1\n")
    with pytest.raises(DatasetError, match=r"test\.tsv:3: bytes are not valid UTF-8"):
        load_dataset(root)


def test_scifact_style_split_folder(tmp_path):
    root = make_dataset(tmp_path / "ds", ["q1\td1\t1"])
    (root / "train").mkdir()
    write_jsonl(root / "train" / "queries.jsonl", [{"_id": "t1", "text": "train q"}])
    (root / "train" / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nt1\td2\t1\n")
    ds = load_dataset(root, split="train")
    assert ds.queries == {"t1": "train q"} and ds.qrels == {"t1": {"d2": 1}}


def test_a_byte_order_mark_is_not_part_of_line_one(tmp_path):
    root = make_dataset(tmp_path / "ds", ["q1\td1\t1"])
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        path = root / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ds = load_dataset(root)
    assert ds.qrels == {"q1": {"d1": 1}} and ds.queries["q1"] == "x" and not any(ds.issues.values())


def test_corpora_keyed_by_doc_id_or_in_parquet_are_read_as_the_index_reads_them(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = make_dataset(tmp_path / "ds", ["q1\td1\t1", "q2\td2\t1"])
    write_jsonl(root / "corpus.jsonl", [{"_id": "d1", "text": "a"}, {"doc_id": "d2", "text": "b"}])
    assert load_dataset(root).qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}
    (root / "corpus.jsonl").unlink()
    pq.write_table(pa.table({"doc_id": ["d1", "d2"], "text": ["a", "b"]}), root / "corpus.parquet")
    ds = load_dataset(root)
    assert ds.corpus_path.name == "corpus.parquet" and ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}
