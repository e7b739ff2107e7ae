"""Documents and queries with no token the model keeps (emoji, literal special tokens) on the real model.

The tokenizer maps them to its unknown or special ids, which the encoder drops: such a chunk has no
vector to score, such a document is rejected like an empty one, and such a query is refused.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.index import index_flow
from lateflow.engine import LateIndex
from storage import index_files as files
from storage.manifest import resolve_index_dir
from tests.conftest import write_jsonl
from tests.test_incremental import QUERIES, config

EMOJI = " ".join(["\U0001f600"] * 120)  # ~2 windows of 64 tokens, every one the unknown token


@pytest.fixture(scope="module")
def unreadable_index(tmp_path_factory, limit_small, prefect_harness):
    docs = [json.loads(line) for line in (limit_small / "corpus.jsonl").read_text(encoding="utf-8").splitlines()][:6]
    docs += [
        {"_id": "emoji-doc", "title": "", "text": EMOJI},
        {"_id": "special-doc", "title": "[SEP]", "text": "[CLS] [SEP] [PAD]"},
        # a readable document with a run of emoji long enough to make a chunk of its own
        {"_id": "mixed-doc", "title": "Mixed", "text": "Hugo likes Quokkas. " + EMOJI + " Hugo also likes Bassoons."},
    ]
    folder = tmp_path_factory.mktemp("unreadable")
    manifest = index_flow(str(write_jsonl(folder / "corpus.jsonl", docs)), str(folder / "index"), config())
    return folder / "index", manifest


def test_documents_without_a_kept_token_are_rejected_and_no_chunk_is_empty(unreadable_index):
    index_dir, manifest = unreadable_index
    index = LateIndex.open(index_dir)
    assert "emoji-doc" not in index.doc_ids and "special-doc" not in index.doc_ids and "mixed-doc" in index.doc_ids
    rejected = pq.read_table(resolve_index_dir(index_dir) / files.REJECTED_FILE).to_pylist()
    assert {r["doc_id"]: r["reason"] for r in rejected} == {
        "emoji-doc": "no token the model's tokenizer can read",
        "special-doc": "no token the model's tokenizer can read",
    }
    assert manifest["counts"]["docs"] == 7 and manifest["counts"]["rejected"] == 2
    # every chunk kept has a vector to score, and a non-zero FDE; the mixed document lost its emoji-only chunk
    assert (np.diff(index.tokens.offsets) > 0).all()
    assert (np.abs(files.read_fde(index.path / files.FDE_FILE)).sum(axis=1) > 0).all()
    chunks = pq.read_table(index.path / files.CHUNKS_FILE).to_pylist()
    mixed = [c["text"] for c in chunks if c["doc_id"] == "mixed-doc"]
    assert mixed and all("Hugo" in text for text in mixed)


def test_every_result_has_a_finite_score_even_when_k_exceeds_the_corpus(unreadable_index):
    index = LateIndex.open(unreadable_index[0])
    for query in QUERIES:
        for scope in ("chunks", "documents"):
            hits = index.search(query, k=50, candidates=50, scope=scope)
            assert len(hits) == len(index) and all(np.isfinite(h.score) for h in hits)
        exhaustive = index.rank_exhaustive([index.encode(query)], 50)[0]
        assert len(exhaustive) == len(index) and all(np.isfinite(s) for _, s, _ in exhaustive)


@pytest.mark.parametrize("query", ["\U0001f600", "[SEP] [CLS]", "\u0000", "\u200b"])
def test_a_query_without_a_kept_token_is_refused_without_being_echoed(unreadable_index, query):
    index = LateIndex.open(unreadable_index[0])
    with pytest.raises(ValueError, match=r"^the query has no token the model can read$"):
        index.search(query)
    # in a batch it does not stop the others: it comes back without vectors, and ranking it is refused
    good, bad = index.encode_many(["Who likes Quokkas?", query])
    assert len(good.vectors) > 0 and len(bad.vectors) == 0 and not bad.pooled.any()
    with pytest.raises(ValueError, match="no token the model can read"):
        index.rank(bad, 10)
    with pytest.raises(ValueError, match="no token the model can read"):
        index.rank_exhaustive([good, bad], 10)


def test_hit_offsets_point_into_the_indexed_text_of_the_document(unreadable_index):
    """README: ``full_text(title, text)[char_start:char_end] == text`` (LIMIT titles are empty; one here is not)."""
    from storage.corpus import full_text

    index = LateIndex.open(unreadable_index[0])
    docs = {d["doc_id"]: d for d in pq.read_table(index.path / files.DOCS_FILE).to_pylist()}
    hits = [h for q in QUERIES + ["Mixed Bassoons"] for h in index.search(q, k=len(index), candidates=100)]
    assert any(docs[h.doc_id]["title"] for h in hits) and any(not docs[h.doc_id]["title"] for h in hits)
    for h in hits:
        assert full_text(docs[h.doc_id]["title"], docs[h.doc_id]["text"])[h.char_start : h.char_end] == h.text


def test_an_evaluation_scores_an_unreadable_query_as_an_empty_ranking(unreadable_index):
    from evaluation.systems import make_ranker, run_ranker

    index = LateIndex.open(unreadable_index[0])
    queries = {"q1": QUERIES[0], "emoji": "\U0001f600", "q2": QUERIES[1]}
    for system in ("maxsim-exact", "fde", "fde-rerank", "fde-prf-rerank"):
        run, latencies, unreadable = run_ranker(make_ranker(system, index, depth=5, candidates=50), queries)
        assert run["emoji"] == {} and len(run["q1"]) == len(run["q2"]) == 5 and len(latencies) == 3, system
        assert unreadable == ["emoji"], system


def test_the_evaluate_report_counts_unreadable_queries(unreadable_index, tmp_path):
    from flows.evaluate import evaluate_flow

    index_dir, _ = unreadable_index
    dataset = index_dir.parent  # corpus.jsonl of the fixture's index: the flow finds the index up to date
    write_jsonl(dataset / "queries.jsonl", [{"_id": "q1", "text": QUERIES[0]}, {"_id": "emoji", "text": "\U0001f600"}])
    first_doc = LateIndex.open(index_dir).doc_ids[0]
    (dataset / "qrels").mkdir(exist_ok=True)
    (dataset / "qrels" / "test.tsv").write_text(f"query-id\tcorpus-id\tscore\nq1\t{first_doc}\t1\nemoji\t{first_doc}\t1\n")
    report = evaluate_flow(str(dataset), str(tmp_path / "report"), systems=["fde-rerank"], index_dir=str(index_dir), config=config())
    assert report["queries"] == 2 and report["dataset_issues"]["queries_without_readable_tokens"] == 1
    assert "queries_without_readable_tokens" in (tmp_path / "report" / "report.md").read_text()
