"""HNSW efSearch at scale: fde-rerank through an HNSW index against the same corpus's flat FDE index.

Run (heavy: two large indexes open at once; take the machine's lock)::

    flock /tmp/lateflow-heavy.lock .venv/bin/python -m evaluation.benchmarks.hnsw_efsearch \\
        ../shared/datasets/scifact --split train --flat /work/scale-bf16/scifact-n100000-seed0/flat \\
        --hnsw /work/scale-bf16/scifact-n100000-seed0/hnsw --out reports/benchmarks/hnsw-efsearch-100k-train.md

Both folders must index the same documents (the scaling study, :mod:`evaluation.benchmarks.scaling`,
builds such pairs). The flat index's fde-rerank (exact FDE search, same candidate count, same
rerank) is the reference: per efSearch, the report gives fde-rerank's latency through HNSW (query
encoding included, one query thread, the settings alternated ``--repeats`` times so drift hits them
alike), the overlap of its top 10 with the flat reference's, the share of queries with an identical
top 10, and nDCG@10 (ranx). The flat reference is computed first, then its index is closed, so only
one large index is in memory while timing. It measures a search-time knob: nothing is rebuilt.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.benchmarks import print_and_save
from flows.settings import apply_quiet_defaults

apply_quiet_defaults()


def main(argv: list[str] | None = None) -> int:
    from ranx import Qrels, Run, evaluate

    from evaluation.benchmarks.scaling import DEPTH, load_queries, open_index, release_memory
    from evaluation.machine import describe_machine, machine_line

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="BEIR-layout dataset folder (queries and qrels)")
    parser.add_argument("--split", default="train", help="query split (default train: a tuning measurement)")
    parser.add_argument("--queries", type=int, default=300, help="fixed subset of the split (hash of ids)")
    parser.add_argument("--flat", type=Path, required=True, help="index folder with a flat FDE index (the reference)")
    parser.add_argument("--hnsw", type=Path, required=True, help="index folder of the same documents with an HNSW FDE index")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[400, 512, 768])
    parser.add_argument("--repeats", type=int, default=2, help="passes over the efSearch values (default 2)")
    parser.add_argument("--out", type=Path, help="write the table (.md) and numbers (.json) here")
    args = parser.parse_args(argv)

    queries = load_queries(args.dataset, args.split, args.queries, args.queries)
    flat, _ = open_index(args.flat)
    reference = {qid: flat.rank(flat.encode(text), DEPTH) for qid, text in queries.texts.items()}
    flat_doc_ids = list(flat.doc_ids)
    del flat
    release_memory()
    hnsw, opened = open_index(args.hnsw)
    # results are compared by document row: both folders must number the same documents alike
    if list(hnsw.doc_ids) != flat_doc_ids:
        parser.error(f"--flat {args.flat} and --hnsw {args.hnsw} do not hold the same documents in the same order")
    if not hasattr(hnsw.ann, "hnsw"):
        parser.error(f"--hnsw {args.hnsw} has a {type(hnsw.ann).__name__} FDE index, not an HNSW one (build it with --ann hnsw)")
    qrels = Qrels({qid: rels for qid, rels in queries.qrels.items() if qid in queries.texts})

    def ndcg(ranked: dict[str, list[tuple[int, float, int]]]) -> float:
        run = Run({qid: {hnsw.doc_ids[d]: float(s) for d, s, _ in r} for qid, r in ranked.items()})
        return round(float(evaluate(qrels, run, "ndcg@10")), 4)

    for text in list(queries.texts.values())[:5]:  # warm-up
        hnsw.rank(hnsw.encode(text), DEPTH)
    timings: dict[int, list[float]] = {ef: [] for ef in args.ef_search}
    ranked: dict[int, dict[str, Any]] = {}
    for _ in range(args.repeats):
        for ef in args.ef_search:
            hnsw.ann.hnsw.efSearch = ef
            ranked[ef] = {}
            for qid, text in queries.texts.items():
                started = time.perf_counter()
                ranked[ef][qid] = hnsw.rank(hnsw.encode(text), DEPTH)
                timings[ef].append((time.perf_counter() - started) * 1000)
    docs = lambda r: [d for d, _, _ in r]  # noqa: E731
    rows = []
    for ef in args.ef_search:
        overlap = np.mean([len(set(docs(ranked[ef][q])) & set(docs(reference[q]))) / max(1, len(reference[q])) for q in queries.texts])
        identical = np.mean([docs(ranked[ef][q]) == docs(reference[q]) for q in queries.texts])
        rows.append({
            "ef_search": ef, "p50_ms": round(float(np.median(timings[ef])), 1), "p95_ms": round(float(np.percentile(timings[ef], 95)), 1),
            "top10_overlap_with_flat": round(float(overlap), 4), "identical_top10": round(float(identical), 3), "ndcg@10": ndcg(ranked[ef]),
        })
    machine = describe_machine()
    lines = [
        f"# HNSW efSearch against flat FDE search, {args.split} split ({len(queries.texts)} queries)",
        "",
        f"machine: {machine_line(machine)}; flat: `{args.flat}`, HNSW: `{args.hnsw}` ({hnsw.ann.ntotal:,} chunks, opened in {opened['open_seconds']} s); "
        f"fde-rerank with the engine's defaults, query encoding included, {args.repeats} alternated passes. Flat reference nDCG@10: {ndcg(reference)}.",
        "",
        "| efSearch | p50 / p95 ms | top-10 overlap with flat | identical top 10 | nDCG@10 |",
        "|---|---|---|---|---|",
        *[f"| {r['ef_search']} | {r['p50_ms']} / {r['p95_ms']} | {r['top10_overlap_with_flat']:.2%} | {r['identical_top10']:.1%} | {r['ndcg@10']} |" for r in rows],
    ]
    report = {"machine": machine, "split": args.split, "queries": len(queries.texts), "flat": str(args.flat), "hnsw": str(args.hnsw),
              "flat_ndcg@10": ndcg(reference), "rows": rows}
    print_and_save("\n".join(lines), report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
