"""HNSW over FDEs: how the vectors are stored (float32, fp16, SQ8) and efSearch, against exact search.

Run::

    flock /tmp/lateflow-heavy.lock .venv/bin/python -m evaluation.benchmarks.hnsw_storage \
        ../shared/datasets/scifact --index idx/scifact --max-queries 100 --out reports/benchmarks/hnsw-storage-scifact-train.md

The index's own FDEs are read from its ``fde.parquet``, and one HNSW per storage is built over them
(M and efConstruction of the index's settings, both cores). Each is searched for the query FDEs of
a fixed subset of the split's queries at every efSearch, one query at a time on one thread, for
``--candidates`` chunks (the engine's default count). Reported per (storage, efSearch): search
latency p50 / p95, and the share of the candidate *documents* of exact (flat) search that it
returns, which is what bounds the rerank's quality. Nothing of the index folder is changed.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from evaluation.benchmarks import print_and_save, tuning_parser
from flows.settings import apply_quiet_defaults

apply_quiet_defaults()


def compare(dataset_dir: str, index_dir: str, split: str, max_queries: int | None, storages: list[str], ef_values: list[int], candidates: int) -> dict[str, Any]:
    """Latency and candidate-document overlap with flat search for every (storage, efSearch)."""
    from evaluation.datasets import load_dataset, subsample
    from lateflow.engine import LateIndex
    from storage import index_files as files
    from tasks.ann import ANNConfig, build_ann, faiss_threads, search_ann

    index = LateIndex.open(index_dir)
    dataset = subsample(load_dataset(dataset_dir, split), max_queries)
    encoded = index.encode_many(list(dataset.queries.values()))
    queries = np.stack([index.query_fde(q) for q in encoded]).astype(np.float32)
    vectors = files.read_fde(index.path / files.FDE_FILE)
    flat, _ = build_ann(vectors, ANNConfig(kind="flat"))
    exact_docs = [set(index.chunk_doc[rows[rows >= 0]]) for rows in search_ann(flat, queries, candidates)[1]]

    def timed_search(ann: Any) -> tuple[list[float], float]:
        times, overlap = [], []
        for query, exact in zip(queries, exact_docs):
            started = time.perf_counter()
            _, rows = search_ann(ann, query[None, :], candidates)
            times.append((time.perf_counter() - started) * 1000)
            overlap.append(len(exact & set(index.chunk_doc[rows[0][rows[0] >= 0]])) / len(exact))
        return times, float(np.mean(overlap))

    rows: list[dict[str, Any]] = []
    with faiss_threads(1):
        times, _ = timed_search(flat)
        rows.append({"storage": "exact (flat)", "ef_search": None, "build_s": 0.0, "p50_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95)), "doc_overlap": 1.0})
        for storage in storages:
            config = ANNConfig(kind="hnsw", hnsw_storage=storage, hnsw_m=index.ann_config.hnsw_m, hnsw_ef_construction=index.ann_config.hnsw_ef_construction)
            started = time.perf_counter()
            ann, _ = build_ann(vectors, config)
            build_seconds = time.perf_counter() - started
            for ef in ef_values:
                ann.hnsw.efSearch = ef
                search_ann(ann, queries[:5], candidates)  # warm-up
                times, overlap = timed_search(ann)
                rows.append({"storage": storage, "ef_search": ef, "build_s": round(build_seconds, 1), "p50_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95)), "doc_overlap": overlap})
                print(f"{storage} efSearch {ef}: p50 {rows[-1]['p50_ms']:.2f} ms, {overlap:.2%} of flat's candidate documents", flush=True)
    return {"dataset": dataset.name, "split": split, "queries": len(queries), "chunks": len(vectors), "dim": int(vectors.shape[1]), "candidates": candidates, "rows": rows}


def render(report: dict[str, Any]) -> str:
    lines = [
        f"HNSW storage and efSearch on {report['dataset']} ({report['split']}, {report['queries']} queries; {report['chunks']} FDEs of "
        f"{report['dim']} dims; {report['candidates']} candidates; one query at a time, one thread).",
        "",
        "| storage | efSearch | build s | search p50 ms | p95 ms | share of flat's candidate documents |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        ef = "-" if r["ef_search"] is None else str(r["ef_search"])
        lines.append(f"| {r['storage']} | {ef} | {r['build_s']:.1f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['doc_overlap']:.2%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from lateflow.engine import DEFAULT_CANDIDATES
    from tasks.ann import HNSW_STORAGES

    parser = tuning_parser(__doc__)
    parser.add_argument("--storages", nargs="+", default=["flat", "fp16", "sq8"], choices=tuple(HNSW_STORAGES))
    parser.add_argument("--ef-search", type=int, nargs="+", default=[256, 400, 512], help="efSearch values (default 256 400 512)")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help=f"chunks asked per query (default {DEFAULT_CANDIDATES})")
    args = parser.parse_args(argv)
    report = compare(args.dataset, args.index, args.split, args.max_queries, args.storages, args.ef_search, args.candidates)
    print_and_save(render(report), report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
