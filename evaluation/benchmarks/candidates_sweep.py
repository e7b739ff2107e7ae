"""How many ANN candidates must ``fde-rerank`` rerank to match brute-force MaxSim? Tune on train.

Run::

    .venv/bin/python -m evaluation.benchmarks.candidates_sweep ../shared/datasets/scifact --index idx/scifact \
        --split train --max-queries 300 --candidates 200 400 800 --out reports/candidates-scifact-train.md

For every query of the split (or a fixed subset), brute-force MaxSim over every document
(``maxsim-exact``, the quality ceiling) and ``fde-rerank`` at each candidate count are scored with
ranx; the table gives each count's nDCG@10 as a share of the ceiling's, its recall of the exact
top-10, and its per-query latency (query encoding excluded: the same for every row).

The engine widens a candidate set that names fewer documents than the ranking depth by 4x. At the
default ``--depth 100`` (what ``lateflow evaluate`` ranks, for R@100) a count of 100 behaves like 400
on scifact (about 1.9 chunks per document); ``--depth 10`` is the RAG path (a top-10 is all that is
asked for), where small counts are what they say.

``--also INDEX ...`` adds index folders of the same corpus built with other FDE or ANN settings
(e.g. ``lateflow index --no-fde-fill`` or ``--ann hnsw``, sharing the segment cache so only the FDE
stage runs again): their rows are labelled with the folder name and compared with the same exact
ceiling, computed once.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evaluation.benchmarks import print_and_save, tuning_parser
from flows.settings import apply_quiet_defaults

apply_quiet_defaults()

DEPTH = 100


def sweep(
    dataset_dir: str, index_dir: str, split: str, counts: list[int], max_queries: int | None, also: Sequence[str] = (), depth: int = DEPTH,
    scopes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score maxsim-exact and fde-rerank at each candidate count (and rerank scope, default: the engine's) on one split."""
    from evaluation.datasets import load_dataset, subsample
    from evaluation.scoring import score_run, to_qrels, to_run
    from lateflow.engine import DEFAULT_RERANK_SCOPE, LateIndex

    scopes = scopes or (DEFAULT_RERANK_SCOPE,)

    dataset = subsample(load_dataset(dataset_dir, split), max_queries)
    index = LateIndex.open(index_dir)
    qids = list(dataset.queries)
    encoded = index.encode_many([dataset.queries[q] for q in qids])
    qrels = to_qrels(dataset.qrels)

    def as_run(ranked_per_query) -> dict[str, dict[str, float]]:
        return {qid: {index.doc_ids[d]: s for d, s, _ in ranked} for qid, ranked in zip(qids, ranked_per_query)}

    started = time.perf_counter()
    exact = [index.rank_exhaustive([q], depth)[0] for q in encoded]
    exact_ms = (time.perf_counter() - started) * 1000 / len(qids)
    exact_scores = score_run(qrels, to_run(as_run(exact), "maxsim-exact"))
    exact_top10 = [{d for d, _, _ in ranked[:10]} for ranked in exact]
    rows = [{"name": "maxsim-exact", **exact_scores, "share_of_exact": 1.0, "recall_exact_top10": 1.0, "ms_p50": exact_ms}]
    labelled = [("", index)] + [(f"{Path(other).name} ", LateIndex.open(other)) for other in also]
    for label, candidate_index in labelled:
        if candidate_index.doc_ids != index.doc_ids:
            raise ValueError(f"{label.strip()}: not an index of the same corpus as {index_dir}")
        for count, scope in [(c, s) for c in counts for s in scopes]:
            ranked, times = [], []
            for query in encoded:
                t0 = time.perf_counter()
                ranked.append(candidate_index.rank(query, depth, candidates=max(count, depth), scope=scope))
                times.append((time.perf_counter() - t0) * 1000)
            name = f"{label}fde-rerank@{count}" + ("" if scope == "documents" else f" ({scope})")
            scores = score_run(qrels, to_run(as_run(ranked), name))
            recall = np.mean([len(top & {d for d, _, _ in r[:10]}) / max(1, len(top)) for top, r in zip(exact_top10, ranked)])
            rows.append(
                {
                    "name": name,
                    **scores,
                    "share_of_exact": scores["ndcg@10"] / exact_scores["ndcg@10"],
                    "recall_exact_top10": float(recall),
                    "ms_p50": float(np.median(times)),
                    "ms_p95": float(np.percentile(times, 95)),
                }
            )
            print(f"{name}: nDCG@10 {scores['ndcg@10']:.4f} ({rows[-1]['share_of_exact']:.2%} of exact), p50 {rows[-1]['ms_p50']:.1f} ms", flush=True)
    return {"dataset": dataset.name, "split": split, "queries": len(qids), "depth": depth, "rows": rows}


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Candidate sweep on {report['dataset']} ({report['split']}, {report['queries']} queries, ranking depth {report.get('depth', DEPTH)}); "
        "latency excludes query encoding (maxsim-exact: mean per query).",
        "",
        "| system | nDCG@10 | share of exact | recall of exact top-10 | R@100 | ms p50 | ms p95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        p95 = f"{r['ms_p95']:.1f}" if "ms_p95" in r else "-"
        lines.append(
            f"| {r['name']} | {r['ndcg@10']:.4f} | {r['share_of_exact']:.2%} | {r['recall_exact_top10']:.3f} | {r['recall@100']:.4f} | {r['ms_p50']:.1f} | {p95} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from lateflow.engine import DEFAULT_RERANK_SCOPE, RERANK_SCOPES

    parser = tuning_parser(__doc__)
    parser.add_argument("--candidates", type=int, nargs="+", default=[200, 400, 800], help="candidate counts to compare")
    parser.add_argument("--also", nargs="*", default=[], metavar="INDEX", help="more index folders of the same corpus (other FDE/ANN settings)")
    parser.add_argument(
        "--scopes", nargs="+", default=[DEFAULT_RERANK_SCOPE], choices=RERANK_SCOPES,
        help=f"rerank only the retrieved chunks, or every chunk of their documents (default: the engine's, {DEFAULT_RERANK_SCOPE})",
    )
    parser.add_argument("--depth", type=int, default=DEPTH, help=f"ranking depth k (default {DEPTH}, as lateflow evaluate; 10 = a RAG top-10)")
    args = parser.parse_args(argv)
    report = sweep(args.dataset, args.index, args.split, args.candidates, args.max_queries, args.also, args.depth, args.scopes)
    print_and_save(render(report), report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
