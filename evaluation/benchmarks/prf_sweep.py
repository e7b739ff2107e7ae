"""ColBERT-PRF parameter sweep: pick defaults on a **train** split, never on test.

Run::

    .venv/bin/python -m evaluation.benchmarks.prf_sweep ../shared/datasets/scifact --index idx/scifact \
        --split train --out reports/prf-sweep-scifact-train.md

The first pass (FDE + ANN candidates, exact MaxSim rerank: the ``fde-rerank`` system) runs once per
query; every PRF setting then expands the query from that first pass's top ``fb_docs`` documents and
re-scores the same candidates (``rerank`` mode), exactly as :meth:`lateflow.engine.LateIndex.rank`
does. The best setting is also run in ``retrieve`` mode. Each row is scored with ranx against the
split's qrels, with a paired t-test against the no-PRF first pass (Bonferroni over the grid), and
the added per-query latency of the feedback step.
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import replace
from typing import Any

import numpy as np

from evaluation.benchmarks import print_and_save, tuning_parser
from flows.settings import apply_quiet_defaults

apply_quiet_defaults()

DEPTH = 100


def _grid(args: argparse.Namespace):
    from tasks.prf import PRFConfig

    for fb_docs, k, fb_embs, beta in itertools.product(args.fb_docs, args.k, args.fb_embs, args.beta):
        if k > fb_embs:
            yield PRFConfig(fb_docs=fb_docs, k=k, fb_embs=fb_embs, beta=beta)


def sweep(dataset_dir: str, index_dir: str, split: str, candidates: int, configs: list, max_queries: int | None = None) -> dict[str, Any]:
    """Score the first pass and every PRF setting on one split; return a report dict."""
    from evaluation.datasets import load_dataset, subsample
    from evaluation.scoring import score_run, significance, to_qrels, to_run
    from lateflow.engine import LateIndex

    dataset = subsample(load_dataset(dataset_dir, split), max_queries)
    index = LateIndex.open(index_dir)
    qids = list(dataset.queries)
    encoded = index.encode_many([dataset.queries[q] for q in qids])
    first: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    base_run: dict[str, dict[str, float]] = {}
    base_ms = []
    for qid, query in zip(qids, encoded):
        started = time.perf_counter()
        docs = index.candidate_documents(query, max(candidates, DEPTH), min_docs=DEPTH)
        scores, _ = index.score_documents(query, docs)
        base_ms.append((time.perf_counter() - started) * 1000)
        first[qid] = (docs, scores)
        base_run[qid] = _top(index, docs, scores)

    def run_prf(config) -> tuple[dict[str, dict[str, float]], list[float]]:
        run, added_ms = {}, []
        for qid, query in zip(qids, encoded):
            docs, scores = first[qid]
            started = time.perf_counter()
            feedback = docs[np.argsort(-scores, kind="stable")[: config.fb_docs]]
            expanded = index.expand(query, feedback, config)
            if config.mode == "retrieve":
                docs = index.candidate_documents(expanded, max(candidates, DEPTH), min_docs=DEPTH)
            new_scores, _ = index.score_documents(expanded, docs)
            added_ms.append((time.perf_counter() - started) * 1000)
            run[qid] = _top(index, docs, new_scores)
        return run, added_ms

    qrels = to_qrels(dataset.qrels)
    runs = {"no-prf": to_run(base_run, "no-prf")}
    rows: list[dict[str, Any]] = [{"name": "no-prf", "config": None, **score_run(qrels, runs["no-prf"]), "first_pass_ms_p50": float(np.median(base_ms))}]
    for config in configs:
        name = f"fb_docs={config.fb_docs} k={config.k} fb_embs={config.fb_embs} beta={config.beta}"
        run, added = run_prf(config)
        runs[name] = to_run(run, name)
        rows.append({"name": name, "config": config.to_dict(), **score_run(qrels, runs[name]), "added_ms_p50": float(np.median(added))})
        print(f"{name}: nDCG@10 {rows[-1]['ndcg@10']:.4f} (+{rows[-1]['added_ms_p50']:.1f} ms)", flush=True)
    best = max(rows[1:], key=lambda r: r["ndcg@10"])
    retrieve_config = replace(configs[[r["name"] for r in rows[1:]].index(best["name"])], mode="retrieve")
    run, added = run_prf(retrieve_config)
    name = best["name"] + " (retrieve)"
    runs[name] = to_run(run, name)
    rows.append({"name": name, "config": retrieve_config.to_dict(), **score_run(qrels, runs[name]), "added_ms_p50": float(np.median(added))})
    tests = significance(qrels, runs, "no-prf", metrics=("ndcg@10",))["systems"]
    for row in rows[1:]:
        row["p_bonferroni"] = tests[row["name"]]["ndcg@10"]["p_bonferroni"]
    return {"dataset": dataset.name, "split": split, "queries": len(qids), "candidates": candidates, "rows": rows, "best": best["name"], "index": str(index_dir)}


def _top(index, docs: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    order = np.argsort(-scores, kind="stable")[:DEPTH]
    return {index.doc_ids[int(docs[i])]: float(scores[i]) for i in order}


def render(report: dict[str, Any]) -> str:
    """The sweep as a Markdown table."""
    lines = [
        f"PRF sweep on {report['dataset']} ({report['split']}, {report['queries']} queries, {report['candidates']} ANN candidates); "
        "p = paired t-test vs no-prf on nDCG@10, Bonferroni over the grid.",
        "",
        "| setting | nDCG@10 | R@100 | MAP@100 | MRR@10 | p (vs no-prf) | added p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        p = f"{row['p_bonferroni']:.3g}" if "p_bonferroni" in row else "-"
        added = f"{row['added_ms_p50']:.1f}" if "added_ms_p50" in row else f"(first pass {row['first_pass_ms_p50']:.1f})"
        lines.append(f"| {row['name']} | {row['ndcg@10']:.4f} | {row['recall@100']:.4f} | {row['map@100']:.4f} | {row['mrr@10']:.4f} | {p} | {added} |")
    lines += ["", f"Best setting by nDCG@10: **{report['best']}**."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from lateflow.engine import DEFAULT_CANDIDATES

    parser = tuning_parser(__doc__)
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help=f"ANN chunk candidates of the first pass (default {DEFAULT_CANDIDATES})")
    parser.add_argument("--fb-docs", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--k", type=int, nargs="+", default=[24])
    parser.add_argument("--fb-embs", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--beta", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    args = parser.parse_args(argv)
    report = sweep(args.dataset, args.index, args.split, args.candidates, list(_grid(args)), args.max_queries)
    print_and_save(render(report), report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
