"""Encoder precision: fp32 vs bf16 autocast vs dynamic int8, on speed and on nDCG@10, in one run.

Run::

    .venv/bin/python -m evaluation.benchmarks.precision ../shared/datasets/scifact --index-root idx/precision \
        --chunks 600 --splits train test --max-queries 200 --out reports/benchmarks/precision-scifact.md

For each precision:

* speed: the bare encoder forward pass over the same chunks (the corpus's first ``--chunks`` chunks,
  length-bucketed as the flow batches them), after a warm-up, in tokens/s, and as a ratio to fp32;
* quality: the whole corpus indexed with that precision (``INDEX_ROOT/<precision>``, reused when it is
  already there) and ``maxsim-exact`` / ``fde-rerank`` scored with ranx on every split given. The
  query encoder runs at the index's precision too, as in production.

The speeds are measured back to back in one process, before any index is built, so the ratios are
comparable; the absolute numbers move with the machine's load.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from evaluation.benchmarks import print_and_save
from flows.settings import apply_quiet_defaults

apply_quiet_defaults()

DEPTH = 100


def encoder_speeds(corpus: str, n_chunks: int, precisions: list[str]) -> dict[str, float]:
    """Tokens/s of the bare forward pass per precision on the same ``n_chunks`` chunks."""
    from flows.index import IndexConfig
    from storage.corpus import read_corpus
    from tasks.chunk import chunk_documents
    from tasks.encode import EncoderConfig, bulk_threads, length_buckets, load_encoder, resolve_model_path, torch_threads

    config = IndexConfig()
    model_path = resolve_model_path(config.model)
    docs = read_corpus(corpus).docs
    speeds: dict[str, float] = {}
    for precision in precisions:
        encoder = load_encoder(EncoderConfig(model_path=model_path, precision=precision, batch_tokens=config.batch_tokens))
        chunks = chunk_documents(docs.slice(0, n_chunks), encoder.tokenizer, config.chunk).slice(0, n_chunks)
        sequences = chunks.column("input_ids").to_pylist()
        batches = length_buckets([len(s) for s in sequences], config.batch_tokens, encoder.config.max_batch_size)
        with torch_threads(bulk_threads()):
            encoder.forward_batch(sequences[:8])  # warm-up (int8 packs its weights on first use)
            started = time.perf_counter()
            for batch in batches:
                encoder.forward_batch([sequences[i] for i in batch])
            seconds = time.perf_counter() - started
        speeds[precision] = sum(len(s) for s in sequences) / seconds
        print(f"{precision}: {speeds[precision]:.0f} tokens/s", flush=True)
    return speeds


def query_label(precision: str, query_precision: str | None) -> str:
    """Row label: the documents' precision, plus the queries' when it differs (``fp32+int8q``)."""
    return precision if query_precision in (None, precision) else f"{precision}+{query_precision}q"


def query_latency(model_path: str, precisions: list[str], texts: list[str], warmup: int = 5) -> dict[str, dict[str, float]]:
    """p50 / p95 ms of encoding one query at a time, one thread, per precision (what a search pays)."""
    import numpy as np

    from tasks.encode import EncoderConfig, load_encoder, torch_threads

    out: dict[str, dict[str, float]] = {}
    with torch_threads(1):
        for precision in precisions:
            encoder = load_encoder(EncoderConfig(model_path=model_path, precision=precision))
            for text in texts[:warmup]:
                encoder.encode_query(text)
            times = []
            for text in texts:
                started = time.perf_counter()
                encoder.encode_query(text)
                times.append((time.perf_counter() - started) * 1000)
            out[precision] = {"p50_ms": round(float(np.percentile(times, 50)), 2), "p95_ms": round(float(np.percentile(times, 95)), 2)}
            print(f"query encoding at {precision}: p50 {out[precision]['p50_ms']} ms, p95 {out[precision]['p95_ms']} ms", flush=True)
    return out


def index_quality(
    corpus: str, dataset_dir: str, index_dir: Path, precision: str, splits: list[str], max_queries: int | None, query_precision: str | None = None
) -> dict[str, Any]:
    """Index the corpus at ``precision`` (unless done) and score maxsim-exact and fde-rerank on each split.

    ``query_precision`` encodes the queries at another precision than the documents (None: the same).
    The rankings are kept in ``INDEX_ROOT/runs/<label>-<split>.json`` with the index's build key,
    so a later run (another precision added, say) scores and compares without brute force again.
    """
    import json
    from dataclasses import replace

    from evaluation.datasets import load_dataset, subsample
    from evaluation.scoring import score_run, to_qrels, to_run
    from flows.index import IndexConfig, index_flow
    from lateflow.engine import DEFAULT_CANDIDATES, LateIndex
    from storage.atomic import write_json

    manifest = index_flow(corpus, str(index_dir), replace(IndexConfig(), precision=precision))
    index = None
    label = query_label(precision, query_precision)
    out: dict[str, Any] = {"build_seconds": manifest["build_seconds"], "splits": {}, "runs": {}}
    for split in splits:
        dataset = subsample(load_dataset(dataset_dir, split), max_queries if split != "test" else None)
        qrels = to_qrels(dataset.qrels)
        qids = list(dataset.queries)
        cached = index_dir.parent / "runs" / f"{label}-{split}.json"
        saved = json.loads(cached.read_text()) if cached.is_file() else {}
        if saved.get("build_key") != manifest["build_key"] or saved.get("qids") != qids or saved.get("candidates") != DEFAULT_CANDIDATES:
            index = index or LateIndex.open(index_dir, query_precision=query_precision)
            encoded = index.encode_many([dataset.queries[q] for q in qids])
            # brute force in batches of queries (one pass over the store per batch): same scores, less time
            exact = [ranked for i in range(0, len(encoded), 16) for ranked in index.rank_exhaustive(encoded[i : i + 16], DEPTH)]
            fast = [index.rank(q, DEPTH, candidates=DEFAULT_CANDIDATES) for q in encoded]
            saved = {"build_key": manifest["build_key"], "qids": qids, "candidates": DEFAULT_CANDIDATES, "runs": {
                system: {qid: {index.doc_ids[d]: float(s) for d, s, _ in ranked} for qid, ranked in zip(qids, lists)}
                for system, lists in (("maxsim-exact", exact), ("fde-rerank", fast))
            }}
            write_json(saved, cached)
        scores = {system: score_run(qrels, to_run(run, f"{system}-{label}"))["ndcg@10"] for system, run in saved["runs"].items()}
        out["splits"][split] = {"queries": len(qids), **scores}
        out["runs"][split] = saved["runs"]
        print(f"{label} {split}: " + ", ".join(f"{k} nDCG@10 {v:.4f}" for k, v in scores.items()), flush=True)
    return out


def compare_to_fp32(dataset_dir: str, quality: dict[str, Any], splits: list[str], max_queries: int | None) -> dict[str, Any]:
    """Paired t-test of every precision against fp32, per split and system (Bonferroni over the precisions)."""
    from evaluation.datasets import load_dataset, subsample
    from evaluation.scoring import significance, to_qrels, to_run

    if "fp32" not in quality or len(quality) < 2:
        return {}
    out: dict[str, Any] = {}
    for split in splits:
        qrels = to_qrels(subsample(load_dataset(dataset_dir, split), max_queries if split != "test" else None).qrels)
        for system in ("maxsim-exact", "fde-rerank"):
            runs = {p: to_run(q["runs"][split][system], p) for p, q in quality.items()}
            tested = significance(qrels, runs, "fp32", metrics=("ndcg@10",))
            for p, result in tested.get("systems", {}).items():
                out.setdefault(p, {}).setdefault(split, {})[system] = result["ndcg@10"]
    return out


def render(report: dict[str, Any]) -> str:
    splits = report["splits"]
    head = "| precision | encoder tokens/s | vs fp32 | " + " | ".join(f"{s}: maxsim-exact | {s}: fde-rerank" for s in splits) + " |"
    lines = [
        f"Encoder precision on {report['dataset']} ({report['chunks']} chunks for speed; nDCG@10 on whole-corpus indexes; "
        f"machine: {report['machine']}). Beside each nDCG@10: its change against fp32 and the paired t-test's p-value "
        "(Bonferroni over the precisions; * below 0.05).",
        "",
        head,
        "|---|---|---|" + "---|---|" * len(splits),
    ]
    base = report["speeds"].get("fp32")
    labels = list(report["speeds"]) + [label for label in report["quality"] if label not in report["speeds"]]
    for p in labels:
        speed = report["speeds"].get(p)
        cells = [p, f"{speed:.0f}" if speed else "-", f"{speed / base:.2f}x" if speed and base else "-"]
        for s in splits:
            q = report["quality"].get(p, {}).get("splits", {}).get(s)
            for system in ("maxsim-exact", "fde-rerank"):
                if not q:
                    cells.append("-")
                    continue
                cell = f"{q[system]:.4f}"
                test = report.get("vs_fp32", {}).get(p, {}).get(s, {}).get(system)
                if test:
                    change = q[system] / report["quality"]["fp32"]["splits"][s][system] - 1
                    cell += f" ({change:+.2%}, p={test['p_bonferroni']:.3f}{'*' if test['significant'] else ''})"
                cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("query_latency"):
        lines += [
            "",
            "`P+Xq`: documents encoded at P, queries at X. Encoding one query at a time, one thread "
            f"({report['latency_queries']} {report['dataset']} test queries):",
            "",
            "| query precision | p50 ms | p95 ms |",
            "|---|---|---|",
        ]
        lines += [f"| {p} | {t['p50_ms']} | {t['p95_ms']} |" for p, t in report["query_latency"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from evaluation.machine import describe_machine, machine_line

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="BEIR-layout dataset folder (its corpus is indexed once per precision)")
    parser.add_argument("--index-root", type=Path, required=True, help="indexes go to INDEX_ROOT/<precision> (reused when present)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"])
    parser.add_argument("--chunks", type=int, default=600, help="chunks in the speed measurement (default 600)")
    parser.add_argument("--splits", nargs="+", default=["train", "test"], help="qrels splits to score (default: train test)")
    parser.add_argument("--max-queries", type=int, default=200, help="fixed subset of every split but test (default 200)")
    parser.add_argument("--speed-only", action="store_true", help="skip the indexes and nDCG")
    parser.add_argument("--quality-precisions", nargs="+", default=None, help="index and score only these (default: every precision)")
    parser.add_argument(
        "--query-precisions", nargs="+", default=[], help="also score the fp32 index with queries encoded at these precisions, and time one-query encoding"
    )
    parser.add_argument("--latency-queries", type=int, default=100, help="test queries timed per query precision (default 100)")
    parser.add_argument("--out", type=Path, default=None, help="write the table (.md) and raw numbers (.json) here")
    args = parser.parse_args(argv)
    machine = describe_machine()
    print(f"machine: {machine_line(machine)}")
    speeds = encoder_speeds(args.dataset, args.chunks, args.precisions)
    quality = {}
    if not args.speed_only:
        for p in args.quality_precisions or args.precisions:
            quality[p] = index_quality(args.dataset, args.dataset, args.index_root / p, p, args.splits, args.max_queries)
        for qp in args.query_precisions:
            if qp != "fp32":
                label = query_label("fp32", qp)
                quality[label] = index_quality(args.dataset, args.dataset, args.index_root / "fp32", "fp32", args.splits, args.max_queries, qp)
    latency = {}
    if args.query_precisions:
        from evaluation.datasets import load_dataset
        from flows.index import IndexConfig
        from tasks.encode import resolve_model_path

        texts = list(load_dataset(args.dataset, "test").queries.values())[: args.latency_queries]
        latency = query_latency(resolve_model_path(IndexConfig().model), sorted(set(["fp32", *args.query_precisions])), texts)
    vs_fp32 = compare_to_fp32(args.dataset, quality, args.splits, args.max_queries)
    for q in quality.values():
        q.pop("runs")  # kept in INDEX_ROOT/runs, not in the report
    report = {
        "dataset": Path(args.dataset).name,
        "machine": machine_line(machine),
        "chunks": args.chunks,
        "splits": [] if args.speed_only else args.splits,
        "speeds": speeds,
        "quality": quality,
        "vs_fp32": vs_fp32,
        "query_latency": latency,
        "latency_queries": args.latency_queries,
    }
    print_and_save(render(report), report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
