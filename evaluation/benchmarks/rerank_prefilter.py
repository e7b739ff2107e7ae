"""The rerank with and without the bounded int8 prefilter, on one index, in one process.

Run::

    flock /tmp/lateflow-heavy.lock .venv/bin/python -m evaluation.benchmarks.rerank_prefilter \
        ../shared/datasets/scifact --index idx/scifact --out reports/benchmarks/rerank-prefilter-scifact-train.md

Every query of the split (or a fixed subset) is encoded once; then ``LateIndex.rank`` (the default
search without its encoding: FDE, ANN, rerank) runs for each query with the prefilter on and off,
alternating query by query so both see the same machine state, at each ``--k``. Reported per k:
latency p50 / p95 of both and their ratio, the share of queries whose top k (documents, order and
best chunks) is the same, the largest score difference, the share of candidate chunks the
prefilter re-scored exactly, and nDCG@10 of both against the split's qrels.

``--exhaustive`` times brute force instead (``LateIndex.rank_exhaustive``: every chunk of the
corpus is a candidate; ``--candidates`` and ``--scope`` do not apply), the reference of the scaling
study (BENCHMARKS.md 5.2)::

    flock /tmp/lateflow-heavy.lock .venv/bin/python -m evaluation.benchmarks.rerank_prefilter \
        ../shared/datasets/scifact --index idx/precision/bf16 --split test --max-queries 100 --k 10 100 \
        --exhaustive --out reports/benchmarks/exhaustive-prefilter-scifact-test.md
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from evaluation.benchmarks import print_and_save, tuning_parser
from flows.settings import apply_quiet_defaults

apply_quiet_defaults()


def rescored_share(index: Any, query: Any, k: int, candidates: int, scope: str) -> float:
    """Share of the candidate chunks that the prefilter re-scores exactly for this query."""
    from tasks.rerank import gather_rows
    from tasks.rerank_prune import maxsim_top_groups

    docs, rows = index._candidates(query, candidates, k, None)
    chunk_ids, groups = gather_rows(index.doc_chunk_offsets, docs) if scope == "documents" else index._group_chunks(docs, rows)
    store = index.tokens
    _, share = maxsim_top_groups(query.vectors, store.vectors, store.offsets, chunk_ids, groups, k, None, store.row_scale)
    return share


def exhaustive_rescored_share(index: Any, query: Any, k: int) -> float:
    """Share of all the corpus's chunks that brute force with the prefilter re-scores exactly."""
    from tasks.rerank_prune import maxsim_exhaustive_top_groups

    store = index.tokens
    scores = maxsim_exhaustive_top_groups([query.vectors], store.vectors, store.offsets, index.doc_chunk_offsets, k, store.row_scale)
    return float(np.isfinite(scores).mean())


def compare(
    dataset_dir: str, index_dir: str, split: str, max_queries: int | None, ks: list[int], candidates: int, scope: str, exhaustive: bool = False
) -> dict[str, Any]:
    """Latency, agreement and nDCG@10 of the rerank (or of brute force) with and without the prefilter, per k."""
    from evaluation.datasets import load_dataset, subsample
    from evaluation.scoring import score_run, to_qrels, to_run
    from lateflow.engine import LateIndex

    index = LateIndex.open(index_dir)
    dataset = subsample(load_dataset(dataset_dir, split), max_queries)
    qids = list(dataset.queries)
    encoded = index.encode_many([dataset.queries[q] for q in qids])
    if exhaustive:  # the prefilter follows index.rerank_prefilter in both
        search = lambda query, k: index.rank_exhaustive([query], k)[0]  # noqa: E731
        share = lambda query, k: exhaustive_rescored_share(index, query, k)  # noqa: E731
    else:
        search = lambda query, k: index.rank(query, k, candidates=candidates, scope=scope)  # noqa: E731
        share = lambda query, k: rescored_share(index, query, k, candidates, scope)  # noqa: E731
    rows: list[dict[str, Any]] = []
    for k in ks:
        times: dict[bool, list[float]] = {True: [], False: []}
        ranked: dict[bool, list[list[tuple[int, float, int]]]] = {True: [], False: []}
        for query in encoded[:3]:  # warm-up
            search(query, k)
        for i, query in enumerate(encoded):
            # alternate which goes first, so neither always runs on a warmer cache
            for on in ((True, False) if i % 2 else (False, True)):
                index.rerank_prefilter = on
                started = time.perf_counter()
                ranked[on].append(search(query, k))
                times[on].append((time.perf_counter() - started) * 1000)
        same = [[(d, c) for d, _, c in a] == [(d, c) for d, _, c in b] for a, b in zip(ranked[True], ranked[False])]
        score_gap = max((abs(x[1] - y[1]) for a, b in zip(ranked[True], ranked[False]) for x, y in zip(a, b)), default=0.0)
        shares = [share(query, k) for query in encoded]
        runs = {
            name: {qid: {index.doc_ids[d]: s for d, s, _ in result} for qid, result in zip(qids, ranked[on])}
            for name, on in (("prefilter", True), ("exact", False))
        }
        qrels = to_qrels(dataset.qrels)
        ndcg = {name: score_run(qrels, to_run(run, name), ("ndcg@10",)) for name, run in runs.items()}
        row = {
            "k": k,
            "exact_p50_ms": float(np.median(times[False])), "exact_p95_ms": float(np.percentile(times[False], 95)),
            "prefilter_p50_ms": float(np.median(times[True])), "prefilter_p95_ms": float(np.percentile(times[True], 95)),
            "same_top_k": float(np.mean(same)), "max_score_gap": float(score_gap),
            "rescored_share_mean": float(np.mean(shares)), "rescored_share_p95": float(np.percentile(shares, 95)),
            "exact_ndcg@10": ndcg["exact"]["ndcg@10"], "prefilter_ndcg@10": ndcg["prefilter"]["ndcg@10"],
        }
        row["speedup_p50"] = row["exact_p50_ms"] / row["prefilter_p50_ms"]
        rows.append(row)
        print(f"k={k}: exact p50 {row['exact_p50_ms']:.1f} ms, prefilter {row['prefilter_p50_ms']:.1f} ms ({row['speedup_p50']:.2f}x); "
              f"same top k {row['same_top_k']:.1%}; re-scored {row['rescored_share_mean']:.1%} of candidates", flush=True)
    return {
        "dataset": dataset.name, "split": split, "queries": len(qids), "candidates": None if exhaustive else candidates,
        "scope": "whole corpus (brute force)" if exhaustive else scope, "exhaustive": exhaustive, "rows": rows,
    }


def render(report: dict[str, Any]) -> str:
    if report.get("exhaustive"):
        what = "brute force over every chunk; `LateIndex.rank_exhaustive` without query encoding"
    else:
        what = f"{report['candidates']} candidate chunks, scope {report['scope']}; `LateIndex.rank` without query encoding"
    lines = [
        f"Rerank prefilter on {report['dataset']} ({report['split']}, {report['queries']} queries, {what}, one thread, "
        "prefilter on and off alternating per query).",
        "",
        "| k | exact p50 / p95 ms | prefilter p50 / p95 ms | speed-up (p50) | same top k | max score gap | re-scored exactly (mean / p95) | nDCG@10 exact / prefilter |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['k']} | {r['exact_p50_ms']:.1f} / {r['exact_p95_ms']:.1f} | {r['prefilter_p50_ms']:.1f} / {r['prefilter_p95_ms']:.1f} | "
            f"{r['speedup_p50']:.2f}x | {r['same_top_k']:.1%} | {r['max_score_gap']:.1e} | {r['rescored_share_mean']:.1%} / {r['rescored_share_p95']:.1%} | "
            f"{r['exact_ndcg@10']:.4f} / {r['prefilter_ndcg@10']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from lateflow.engine import DEFAULT_CANDIDATES, DEFAULT_RERANK_SCOPE, RERANK_SCOPES

    parser = tuning_parser(__doc__)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 100], help="results asked per query (default 10 100)")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help=f"chunks asked per query (default {DEFAULT_CANDIDATES})")
    parser.add_argument("--scope", default=DEFAULT_RERANK_SCOPE, choices=RERANK_SCOPES)
    parser.add_argument("--exhaustive", action="store_true", help="time brute force (rank_exhaustive) instead of the rerank")
    args = parser.parse_args(argv)
    report = compare(args.dataset, args.index, args.split, args.max_queries, args.k, args.candidates, args.scope, args.exhaustive)
    print_and_save(render(report), report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
