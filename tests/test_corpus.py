"""Corpus reading: every bad input of the issue gets a clear error or a recorded rejection."""
from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.corpus import CorpusError, read_corpus
from tests.conftest import write_jsonl


def test_reads_beir_folder_and_keeps_metadata(tmp_path):
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "a", "title": "T", "text": "body", "source": "x"}, {"_id": 7, "text": "seven"}])
    corpus = read_corpus(tmp_path)
    assert corpus.docs.column("doc_id").to_pylist() == ["a", "7"]
    assert corpus.docs.column("metadata").to_pylist() == ['{"source": "x"}', "{}"]
    assert corpus.rejected.num_rows == 0


def test_malformed_json_line_names_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": "ok"}, '{"_id": "b", "text": '])
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: malformed JSON"):
        read_corpus(f)


def test_skip_mode_records_bad_lines_and_keeps_good_ones(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": "ok"}, "not json", {"text": "no id"}, {"_id": "a", "text": "dup"}, {"_id": "b", "text": "fine"}])
    corpus = read_corpus(f, on_error="skip")
    assert corpus.docs.column("doc_id").to_pylist() == ["a", "b"]
    assert corpus.rejected.column("line").to_pylist() == [2, 3, 4]
    reasons = corpus.rejected.column("reason").to_pylist()
    assert "malformed JSON" in reasons[0] and "missing field '_id'" in reasons[1] and "duplicate _id 'a'" in reasons[2]


def test_skip_mode_records_a_rejected_non_string_id_as_text(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"_id": 1, "text": "one"}, {"_id": 1, "text": "again"}, {"_id": ["x"], "text": "list id"}])
    corpus = read_corpus(f, on_error="skip")
    assert corpus.docs.column("doc_id").to_pylist() == ["1"]
    assert corpus.rejected.column("doc_id").to_pylist() == ["1", None] and corpus.rejected.column("line").to_pylist() == [2, 3]
    assert "duplicate _id '1'" in corpus.rejected.column("reason")[0].as_py()


def test_missing_id(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"title": "x", "text": "y"}])
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: missing field '_id'"):
        read_corpus(f)


def test_duplicate_id_names_both_lines(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": "x"}, {"_id": "b", "text": "y"}, {"_id": "a", "text": "z"}])
    with pytest.raises(CorpusError, match=r"c\.jsonl:3: duplicate _id 'a' \(first seen at line 1\)"):
        read_corpus(f)


def test_empty_document_is_rejected_with_reason_not_dropped(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": "x"}, {"_id": "e", "title": " ", "text": ""}])
    corpus = read_corpus(f)
    assert corpus.docs.column("doc_id").to_pylist() == ["a"]
    assert corpus.rejected.to_pylist() == [{"doc_id": "e", "source": str(f), "line": 2, "reason": "empty document (no title or text)"}]


def test_non_utf8_bytes_name_the_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes(b'{"_id": "a", "text": "ok"}\n{"_id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: bytes are not valid UTF-8"):
        read_corpus(f)


def test_empty_corpus_is_an_error(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no usable document"):
        read_corpus(f)


def test_wrong_field_type(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": ["list"]}])
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: field 'text' must be a string"):
        read_corpus(f)


def test_parquet_input(tmp_path):
    pq.write_table(pa.table({"_id": ["x", "y"], "title": ["", "T"], "text": ["a b", "c"], "lang": ["en", "fr"]}), tmp_path / "c.parquet")
    corpus = read_corpus(tmp_path / "c.parquet")
    assert corpus.docs.column("doc_id").to_pylist() == ["x", "y"]
    assert corpus.docs.column("metadata").to_pylist() == ['{"lang": "en"}', '{"lang": "fr"}']


def test_missing_path_and_folder_without_corpus(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        read_corpus(tmp_path / "nope.jsonl")
    with pytest.raises(CorpusError, match="no corpus.jsonl"):
        read_corpus(tmp_path)


def test_a_byte_order_mark_on_line_one_is_dropped_and_other_formats_are_named(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"_id": "a", "text": "x"}\n{"_id": "b", "text": "y"}\n')
    assert read_corpus(path).docs.column("doc_id").to_pylist() == ["a", "b"]
    for suffix in (".csv", ".tsv", ".gz"):
        other = tmp_path / f"corpus{suffix}"
        other.write_text("_id,text\na,x\n")
        with pytest.raises(CorpusError, match=rf"unsupported corpus format \({re.escape(suffix)}\)"):
            read_corpus(other)
