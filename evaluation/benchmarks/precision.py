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


def index_quality(corpus: str, dataset_dir: str, index_dir: Path, precision: str, splits: list[str], max_queries: int | None) -> dict[str, Any]:
    """Index the corpus at ``precision`` (unless done) and score maxsim-exact and fde-rerank on each split."""
    from dataclasses import replace

    from evaluation.datasets import load_dataset, subsample
    from evaluation.scoring import score_run, to_qrels, to_run
    from flows.index import IndexConfig, index_flow
    from lateflow.engine import DEFAULT_CANDIDATES, LateIndex

    manifest = index_flow(corpus, str(index_dir), replace(IndexConfig(), precision=precision))
    index = LateIndex.open(index_dir)
    out: dict[str, Any] = {"build_seconds": manifest["build_seconds"], "splits": {}}
    for split in splits:
        dataset = subsample(load_dataset(dataset_dir, split), max_queries if split != "test" else None)
        qrels = to_qrels(dataset.qrels)
        qids = list(dataset.queries)
        encoded = index.encode_many([dataset.queries[q] for q in qids])
        # brute force in batches of queries (one pass over the store per batch): same scores, less time
        exact = [ranked for i in range(0, len(encoded), 16) for ranked in index.rank_exhaustive(encoded[i : i + 16], DEPTH)]
        fast = [index.rank(q, DEPTH, candidates=DEFAULT_CANDIDATES) for q in encoded]
        scores = {}
        for system, ranked_lists in (("maxsim-exact", exact), ("fde-rerank", fast)):
            run = {qid: {index.doc_ids[d]: s for d, s, _ in ranked} for qid, ranked in zip(qids, ranked_lists)}
            scores[system] = score_run(qrels, to_run(run, f"{system}-{precision}"))["ndcg@10"]
        out["splits"][split] = {"queries": len(dataset.queries), **scores}
        print(f"{precision} {split}: " + ", ".join(f"{k} nDCG@10 {v:.4f}" for k, v in scores.items()), flush=True)
    return out


def render(report: dict[str, Any]) -> str:
    splits = report["splits"]
    head = "| precision | encoder tokens/s | vs fp32 | " + " | ".join(f"{s}: maxsim-exact | {s}: fde-rerank" for s in splits) + " |"
    lines = [
        f"Encoder precision on {report['dataset']} ({report['chunks']} chunks for speed; nDCG@10 on whole-corpus indexes; "
        f"machine: {report['machine']}).",
        "",
        head,
        "|---|---|---|" + "---|---|" * len(splits),
    ]
    base = report["speeds"]["fp32"] if "fp32" in report["speeds"] else None
    for p, speed in report["speeds"].items():
        cells = [p, f"{speed:.0f}", f"{speed / base:.2f}x" if base else "-"]
        for s in splits:
            q = report["quality"].get(p, {}).get("splits", {}).get(s)
            cells += [f"{q['maxsim-exact']:.4f}", f"{q['fde-rerank']:.4f}"] if q else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
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
    parser.add_argument("--out", type=Path, default=None, help="write the table (.md) and raw numbers (.json) here")
    args = parser.parse_args(argv)
    machine = describe_machine()
    print(f"machine: {machine_line(machine)}")
    speeds = encoder_speeds(args.dataset, args.chunks, args.precisions)
    quality = {}
    if not args.speed_only:
        for p in args.quality_precisions or args.precisions:
            quality[p] = index_quality(args.dataset, args.dataset, args.index_root / p, p, args.splits, args.max_queries)
    report = {
        "dataset": Path(args.dataset).name,
        "machine": machine_line(machine),
        "chunks": args.chunks,
        "splits": [] if args.speed_only else args.splits,
        "speeds": speeds,
        "quality": quality,
    }
    print_and_save(render(report), report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
