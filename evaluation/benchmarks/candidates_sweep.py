"""How many ANN candidates must ``fde-rerank`` rerank to match brute-force MaxSim? Tune on train.

Run::

    .venv/bin/python -m evaluation.benchmarks.candidates_sweep ../shared/datasets/scifact --index idx/scifact \
        --split train --max-queries 300 --candidates 200 400 800 --out reports/candidates-scifact-train.md

For every query of the split (or a fixed subset), brute-force MaxSim over every document
(``maxsim-exact``, the quality ceiling) and ``fde-rerank`` at each candidate count are scored with
ranx; the table gives each count's nDCG@10 as a share of the ceiling's, its recall of the exact
top-10, and its per-query latency (query encoding excluded: the same for every row).

The engine widens a candidate set that names fewer documents than the ranking depth (100) by 4x, so
on scifact (about 1.9 chunks per document) a count of 100 behaves like 400: sweep from 200 up.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from evaluation.benchmarks import print_and_save, tuning_parser
from flows.settings import apply_quiet_defaults

apply_quiet_defaults()

DEPTH = 100


def sweep(dataset_dir: str, index_dir: str, split: str, counts: list[int], max_queries: int | None) -> dict[str, Any]:
    """Score maxsim-exact and fde-rerank at each candidate count on one split."""
    from evaluation.datasets import load_dataset, subsample
    from evaluation.scoring import score_run, to_qrels, to_run
    from lateflow.engine import LateIndex

    dataset = subsample(load_dataset(dataset_dir, split), max_queries)
    index = LateIndex.open(index_dir)
    qids = list(dataset.queries)
    encoded = index.encode_many([dataset.queries[q] for q in qids])
    qrels = to_qrels(dataset.qrels)

    def as_run(ranked_per_query) -> dict[str, dict[str, float]]:
        return {qid: {index.doc_ids[d]: s for d, s, _ in ranked} for qid, ranked in zip(qids, ranked_per_query)}

    started = time.perf_counter()
    exact = [index.rank_exhaustive([q], DEPTH)[0] for q in encoded]
    exact_ms = (time.perf_counter() - started) * 1000 / len(qids)
    exact_scores = score_run(qrels, to_run(as_run(exact), "maxsim-exact"))
    exact_top10 = [{d for d, _, _ in ranked[:10]} for ranked in exact]
    rows = [{"name": "maxsim-exact", **exact_scores, "share_of_exact": 1.0, "recall_exact_top10": 1.0, "ms_p50": exact_ms}]
    for count in counts:
        ranked, times = [], []
        for query in encoded:
            t0 = time.perf_counter()
            ranked.append(index.rank(query, DEPTH, candidates=max(count, DEPTH)))
            times.append((time.perf_counter() - t0) * 1000)
        scores = score_run(qrels, to_run(as_run(ranked), f"fde-rerank@{count}"))
        recall = np.mean([len(top & {d for d, _, _ in r[:10]}) / max(1, len(top)) for top, r in zip(exact_top10, ranked)])
        rows.append(
            {
                "name": f"fde-rerank@{count}",
                **scores,
                "share_of_exact": scores["ndcg@10"] / exact_scores["ndcg@10"],
                "recall_exact_top10": float(recall),
                "ms_p50": float(np.median(times)),
            }
        )
        print(f"{rows[-1]['name']}: nDCG@10 {scores['ndcg@10']:.4f} ({rows[-1]['share_of_exact']:.2%} of exact)", flush=True)
    return {"dataset": dataset.name, "split": split, "queries": len(qids), "rows": rows}


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Candidate sweep on {report['dataset']} ({report['split']}, {report['queries']} queries); latency excludes query encoding "
        "(maxsim-exact: mean per query).",
        "",
        "| system | nDCG@10 | share of exact | recall of exact top-10 | R@100 | ms p50 |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['name']} | {r['ndcg@10']:.4f} | {r['share_of_exact']:.2%} | {r['recall_exact_top10']:.3f} | {r['recall@100']:.4f} | {r['ms_p50']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = tuning_parser(__doc__)
    parser.add_argument("--candidates", type=int, nargs="+", default=[200, 400, 800], help="candidate counts to compare")
    args = parser.parse_args(argv)
    report = sweep(args.dataset, args.index, args.split, args.candidates, args.max_queries)
    print_and_save(render(report), report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
