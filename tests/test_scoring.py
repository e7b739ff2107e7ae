"""ranx metrics against hand-computed values, and the significance wrapper."""
from __future__ import annotations

import math


from evaluation.scoring import score_run, significance, to_qrels, to_run


def test_metrics_match_a_hand_computed_case():
    qrels = to_qrels({"q1": {"a": 1, "c": 1}, "q2": {"x": 2}})
    run = to_run({"q1": {"a": 3.0, "b": 2.0, "c": 1.0}, "q2": {"y": 2.0, "x": 1.0}}, "sys")
    got = score_run(qrels, run)
    # q1: relevant at ranks 1 and 3. DCG = 1 + 1/log2(4) = 1.5; IDCG = 1 + 1/log2(3)
    ndcg_q1 = 1.5 / (1 + 1 / math.log2(3))
    # q2: relevance 2 at rank 2; ranx (Järvelin) nDCG uses the relevance itself as gain
    ndcg_q2 = (2 / math.log2(3)) / 2
    assert math.isclose(got["ndcg@10"], (ndcg_q1 + ndcg_q2) / 2, abs_tol=1e-5)
    assert math.isclose(got["mrr@10"], (1 + 0.5) / 2, abs_tol=1e-5)
    assert math.isclose(got["map@100"], ((1 + 2 / 3) / 2 + 0.5) / 2, abs_tol=1e-5)
    assert got["recall@100"] == 1.0


def test_empty_ranking_scores_zero():
    qrels = to_qrels({"q1": {"a": 1}, "q2": {"b": 1}})
    got = score_run(qrels, to_run({"q1": {"a": 1.0}, "q2": {}}, "s"))
    assert got["recall@100"] == 0.5


def test_significance_is_bonferroni_corrected():
    qrels = to_qrels({f"q{i}": {"rel": 1} for i in range(60)})
    good = to_run({f"q{i}": {"rel": 2.0, "x": 1.0} for i in range(60)}, "ref")
    bad = to_run({f"q{i}": ({"x": 2.0, "rel": 1.0} if i % 2 else {"rel": 2.0, "x": 1.0}) for i in range(60)}, "bad")
    same = to_run({f"q{i}": {"rel": 2.0, "x": 1.0} for i in range(60)}, "same")
    sig = significance(qrels, {"ref": good, "bad": bad, "same": same}, "ref")
    assert sig["correction"] == "Bonferroni (x2)"
    assert sig["systems"]["bad"]["ndcg@10"]["significant"]
    assert not sig["systems"]["same"]["ndcg@10"]["significant"]
    p = sig["systems"]["bad"]["mrr@10"]
    assert math.isclose(p["p_bonferroni"], min(1.0, 2 * p["p_value"]), rel_tol=1e-3, abs_tol=1e-5)
