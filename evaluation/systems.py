"""The retrieval systems an evaluation compares, each as ``query text -> ranked (doc id, score)``.

Names are a contract (``report.json``): ``bm25``, ``dense``, ``maxsim-exact`` (brute-force MaxSim
over every document: the quality ceiling), ``fde`` (FDE + ANN only), ``fde-rerank`` (the default
search path), ``fde-prf-rerank`` and ``fde-prf-retrieve`` (ColBERT-PRF on top of ``fde-rerank``, in
its two modes). Every system's per-query latency includes encoding (or tokenizing) the query.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from dataclasses import replace

from lateflow.engine import LateIndex
from tasks.prf import PRFConfig

Ranker = Callable[[str], list[tuple[str, float]]]

ALL_SYSTEMS = ("bm25", "dense", "maxsim-exact", "fde", "fde-rerank", "fde-prf-rerank", "fde-prf-retrieve")
REFERENCE_SYSTEM = "maxsim-exact"


def make_ranker(name: str, index: LateIndex, *, depth: int, candidates: int, prf: PRFConfig | None = None) -> Ranker:
    """Build the ranker for one system name over an opened index (``prf``: settings of the PRF systems)."""

    def as_ids(ranked: list[tuple[int, float, int]]) -> list[tuple[str, float]]:
        return [(index.doc_ids[d], s) for d, s, _ in ranked]

    if name == "bm25":
        from evaluation.baselines import BM25Baseline

        bm25 = BM25Baseline(index.path)
        return lambda q: bm25.search(q, depth)
    if name == "dense":
        from evaluation.baselines import DenseBaseline

        dense = DenseBaseline(index)
        return lambda q: as_ids(dense.search(q, depth))
    if name == "maxsim-exact":
        return lambda q: as_ids(index.rank_exhaustive([index.encode(q)], depth)[0])
    if name == "fde":
        return lambda q: as_ids(index.rank_fde_only(index.encode(q), depth))
    if name == "fde-rerank":
        return lambda q: as_ids(index.rank(index.encode(q), depth, candidates=max(candidates, depth)))
    if name in ("fde-prf-rerank", "fde-prf-retrieve"):
        config = replace(prf or PRFConfig(), mode=name.rsplit("-", 1)[1])
        return lambda q: as_ids(index.rank(index.encode(q), depth, candidates=max(candidates, depth), prf=config))
    raise ValueError(f"unknown system {name!r}; choose from {', '.join(ALL_SYSTEMS)}")


def run_ranker(ranker: Ranker, queries: dict[str, str], *, warmup: int = 3) -> tuple[dict[str, dict[str, float]], list[float], list[str]]:
    """Run every query, timing each one after ``warmup`` untimed queries; return (run, latencies in ms, unreadable).

    A query with no token the model keeps gets an empty ranking (it scores 0 for every metric)
    instead of stopping the evaluation; ``unreadable`` lists those query ids, for the report.
    """

    def ranked_or_empty(text: str) -> list[tuple[str, float]] | None:
        from tasks.encode import UNREADABLE_QUERY

        try:
            return ranker(text)
        except ValueError as exc:
            if str(exc) != UNREADABLE_QUERY:
                raise
            return None

    texts = list(queries.values())
    for text in texts[:warmup]:
        ranked_or_empty(text)
    run: dict[str, dict[str, float]] = {}
    latencies = []
    unreadable = []
    for qid, text in queries.items():
        started = time.perf_counter()
        ranked = ranked_or_empty(text)
        latencies.append((time.perf_counter() - started) * 1000)
        if ranked is None:
            unreadable.append(qid)
        run[qid] = {doc: float(score) for doc, score in ranked or []}
    return run, latencies, unreadable


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    """p50 and p95 in milliseconds."""
    return {"p50": round(float(np.percentile(latencies_ms, 50)), 3), "p95": round(float(np.percentile(latencies_ms, 95)), 3)}
