"""The pure parts of the candidates table benchmark, on tiny hand-made inputs (no index, no model)."""
from __future__ import annotations

import numpy as np
import pytest

from evaluation.benchmarks.candidates_table import (
    dedupe_in_order,
    first_hit_ranks,
    heuristic_curves,
    heuristic_points,
    parse_setting,
    recall_curve,
    smallest_n,
    token_documents,
    token_hits_to_documents,
    token_overlap,
)


def test_recall_curve_counts_each_truth_document_once_at_its_first_place():
    # query 1 finds both of its truth docs at ranks 2 and 4 (doc 7 repeats: counted once);
    # query 2 finds one of two at rank 1
    rankings = [np.array([5, 7, 7, 3, 9]), np.array([4, 1, 2, 8, 6])]
    truths = [np.array([7, 3]), np.array([4, 99])]
    curve = recall_curve(rankings, truths, 5)
    assert curve.tolist() == pytest.approx([0.25, 0.5, 0.5, 0.75, 0.75])


def test_recall_curve_pads_short_rankings_and_ignores_missing_hits():
    curve = recall_curve([np.array([1])], [np.array([1, 2])], 3)
    assert curve.tolist() == pytest.approx([0.5, 0.5, 0.5])


def test_recall_curve_ignores_hits_beyond_max_n():
    assert recall_curve([np.array([0, 1, 2])], [np.array([2])], 2).tolist() == [0.0, 0.0]


def test_smallest_n_reaches_target_exactly_and_reports_none_when_it_never_does():
    curve = np.array([0.1, 0.8, 0.9 - 1e-12, 0.95, 1.0])
    assert smallest_n(curve, 0.8) == 2
    assert smallest_n(curve, 0.9) == 3  # float noise below 0.9 still counts as 9 hits of 10
    assert smallest_n(curve, 0.95) == 4
    assert smallest_n(np.array([0.2, 0.5]), 0.9) is None


def test_dedupe_in_order_keeps_first_occurrences_and_drops_missing():
    assert dedupe_in_order(np.array([2, 2, -1, 0, 2, 1, 0])).tolist() == [2, 0, 1]
    assert dedupe_in_order(np.array([], dtype=np.int64)).tolist() == []


def test_token_hits_become_deduplicated_documents():
    # chunks 0,1 belong to doc 0, chunk 2 to doc 1; chunk 1 has no tokens
    token_doc = token_documents(np.array([0, 2, 2, 5]), np.array([0, 0, 1]))
    assert token_doc.tolist() == [0, 0, 1, 1, 1]
    hits = np.array([[0, 1, -1], [4, 3, 1]])  # two query tokens, k' = 3; -1 = no hit
    assert token_hits_to_documents(hits, token_doc).tolist() == [0, 1]
    assert token_hits_to_documents(np.full((2, 2), -1), token_doc).tolist() == []


def test_first_hit_ranks_take_the_smallest_column_over_query_tokens():
    docs, ranks = first_hit_ranks(np.array([[3, 3, 1], [1, -1, 4]]))
    assert dict(zip(docs.tolist(), ranks.tolist())) == {1: 0, 3: 0, 4: 2}


def test_heuristic_curves_match_a_direct_computation_for_every_k():
    rng = np.random.default_rng(0)
    hit_docs = [rng.integers(-1, 12, size=(3, 6)), rng.integers(-1, 12, size=(2, 6))]
    truths = [np.array([1, 2, 3]), np.array([5, 6])]
    recall, count = heuristic_curves(hit_docs, truths, 6)
    for q, (hits, truth) in enumerate(zip(hit_docs, truths)):
        for k in range(1, 7):
            docs = set(hits[:, :k].ravel().tolist()) - {-1}
            assert count[q, k - 1] == len(docs)
            assert recall[q, k - 1] == pytest.approx(len(docs & set(truth.tolist())) / len(truth))


def test_heuristic_points_report_the_smallest_k_and_its_mean_candidates():
    recall = np.array([[0.4, 0.8, 1.0], [0.6, 0.8, 0.8]])
    count = np.array([[2, 4, 9], [3, 5, 7]])
    points = heuristic_points(recall, count, (0.8, 0.9, 0.95))
    assert points["0.8"]["k"] == 2 and points["0.8"]["candidates_mean"] == 4.5
    assert points["0.9"]["k"] == 3 and points["0.9"]["candidates_mean"] == 8.0
    assert points["0.95"] is None


def test_token_overlap_compares_top_k_sets():
    assert token_overlap(np.array([[1, 2, 3]]), np.array([[2, 1, 4]]), 2) == 1.0
    assert token_overlap(np.array([[1, 2, 3]]), np.array([[2, 1, 4]]), 3) == pytest.approx(2 / 3)


def test_parse_setting_reads_every_option_and_rejects_malformed_specs():
    config = parse_setting("20,5,16", 384)
    assert (config.repetitions, config.simhash_bits, config.projection_dim, config.output_dim) == (20, 5, 16, 10240)
    config = parse_setting("20,4,32:2048+nofill@43", 384)
    assert (config.final_dim, config.output_dim, config.fill_empty_partitions, config.seed) == (2048, 2048, False, 43)
    with pytest.raises(ValueError):
        parse_setting("20,4", 384)


def test_served_fde_finds_the_exact_top_10_when_every_chunk_is_a_candidate(limit_small, limit_small_index):
    """The 'as served' row opens the folder as a user does; asking for more chunks than the index
    holds reranks everything exactly, so the returned top 10 are brute force's."""
    from evaluation.benchmarks import candidates_table as ct
    from evaluation.datasets import load_dataset, subsample
    from lateflow.engine import LateIndex

    index = LateIndex.open(limit_small_index)
    dataset = subsample(load_dataset(str(limit_small), "test"), 20)
    texts = list(dataset.queries.values())
    encoded = [index.encode(t) for t in texts]
    queries = ct.QuerySet("limit-small test", "test", list(dataset.queries), texts, encoded, ct.exact_top_documents(index, encoded), 20)
    assert index.tokens.n_chunks < 600
    out = ct.served_fde(ct.open_served(str(limit_small_index)), queries, grid=(3, 600))
    assert out["recall_by_candidates"][600] == 1.0
    assert out["recall_by_candidates"][3] < 1.0  # 3 chunks cannot hold 10 documents
    assert out["candidates_at_90"] == 600 and out["at_90"]["candidates"] == 600
    for row in (out["at_90"], out["default"]):
        assert row["total_ms"]["p50"] >= row["stage_p50_ms"]["rank"] > 0


def test_served_heuristic_with_every_token_as_a_hit_finds_the_exact_top_10(limit_small_index):
    """k' = every token: each chunk is a candidate, so the served rerank returns brute force's top 10."""
    import faiss

    from evaluation.benchmarks import candidates_table as ct

    served = ct.open_served(str(limit_small_index))
    texts = ["Who likes quokkas?", "Who likes apples?", "Who likes the Boston Celtics?"]
    encoded = [served.encode(t) for t in texts]
    queries = ct.QuerySet("limit-small", "test", ["a", "b", "c"], texts, encoded, ct.exact_top_documents(served, encoded), 3)
    scale = served.tokens.row_scale  # None unless the store is held as int8
    vectors = np.ascontiguousarray(served.tokens.vectors.astype(np.float32) * (1.0 if scale is None else scale[:, None]))
    token_index = faiss.IndexFlatIP(vectors.shape[1])
    token_index.add(vectors)
    out = ct.served_heuristic(served, token_index, queries, k=len(vectors))
    assert out["recall"] == 1.0 and out["k"] == len(vectors)
    assert out["total_ms"]["p50"] >= out["stage_p50_ms"]["rank"] > 0
