"""Every performance benchmark of issue 7, one after another, with the settings BENCHMARKS.md reports.

Run (about 1.5 hours on 2 cores; add ``--large`` for the 100k-document scaling size, about 1 more)::

    .venv/bin/python -m evaluation.benchmarks.performance --datasets ../shared/datasets --work idx/bench

Steps (each also runs on its own; see its module):

1. ``lateflow index`` of scifact into ``WORK/scifact`` (skipped when that index is current);
2. :mod:`evaluation.benchmarks.pipeline`: indexing throughput of the flow against the bare encoder
   (at the default precision and at fp32), and fde-rerank against brute-force latency;
3. :mod:`evaluation.benchmarks.precision`: fp32 / bf16 / int8 encoders on speed and nDCG@10;
4. :mod:`evaluation.benchmarks.candidates_sweep`: candidates vs nDCG@10 and latency on scifact
   train, for the default index and its variants with filled FDEs and/or a flat ANN (built into
   ``WORK/scifact-*`` from the same segment cache: FDE stage and ANN only), and the two rerank
   scopes (retrieved chunks / every chunk of the candidate documents) on the default index;
   :mod:`evaluation.benchmarks.hnsw_storage`: HNSW storage (float32 / fp16 / SQ8) and efSearch
   against flat search; :mod:`evaluation.benchmarks.rerank_prefilter`: the rerank, and brute force
   (``--exhaustive``, test queries), with and without their int8 prefilter;
5. :mod:`evaluation.benchmarks.candidates_table`: the MUVERA paper's Table 1 (FDE settings against
   the token heuristic; tuned on train, reported on test);
6. :mod:`evaluation.benchmarks.scaling`: fde-rerank against maxsim-exact (and brute force scoring
   every chunk in float32) from 1k to 10k (100k with ``--large``, followed by
   :mod:`evaluation.benchmarks.hnsw_efsearch` on the 100k corpus, train queries, and
   :mod:`evaluation.benchmarks.open_memory` and :mod:`evaluation.benchmarks.ann_build` on the
   default index and the 100k HNSW folder)
   documents with flat, HNSW and IVF-PQ FDE indexes;
7. :mod:`evaluation.benchmarks.memory`: bytes per document and token-store / FDE-index compression
   against nDCG@10, on scifact test and cranfield (indexes with ``--token-codec float16``, the
   encoder's own vectors, which the study compresses).

Every step writes ``reports/benchmarks/<name>.{md,json}``; BENCHMARKS.md quotes them. Run nothing
else heavy meanwhile: the machine's two cores are the instrument.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from flows.settings import apply_quiet_defaults

apply_quiet_defaults()

REPORTS = Path("reports") / "benchmarks"
STEPS = ["pipeline", "precision", "sweep", "candidates", "scaling", "memory"]


def _variant(dataset: Path, work: Path, name: str, options: list[str]) -> str:
    """Index ``dataset`` into ``WORK/<name>`` with extra options, from the default index's segment cache."""
    from lateflow.cli import main as lateflow_main

    folder = work / name
    _step(f"index {name}", lateflow_main, ["index", str(dataset), "--index", str(folder), "--cache", str(work / dataset.name / ".cache"), *options])
    return str(folder)


def _step(name: str, main, argv: list[str]) -> None:
    print(f"\n=== {name}: {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    code = main(argv)
    if code:
        raise SystemExit(f"{name} failed with exit code {code}")
    print(f"=== {name} took {time.perf_counter() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    from evaluation.benchmarks import (
        ann_build, candidates_sweep, candidates_table, hnsw_efsearch, hnsw_storage, memory, open_memory, pipeline, precision, rerank_prefilter, scaling,
    )
    from lateflow.cli import main as lateflow_main

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, required=True, help="folder holding the BEIR datasets scifact/ (and cranfield/)")
    parser.add_argument("--work", type=Path, required=True, help="folder for the indexes the benchmarks build")
    parser.add_argument("--large", action="store_true", help="add the 100k-document scaling size")
    parser.add_argument("--only", nargs="+", choices=STEPS, help="run only these steps")
    args = parser.parse_args(argv)
    scifact = args.datasets / "scifact"
    index = args.work / "scifact"
    REPORTS.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only or STEPS)
    _step("index scifact", lateflow_main, ["index", str(scifact), "--index", str(index)])
    if "pipeline" in wanted:
        _step("pipeline", pipeline.main, [
            "--corpus", str(scifact), "--docs", "1000", "--index", str(index), "--queries", str(scifact / "queries.jsonl"),
            "--n-queries", "100", "--precisions", "auto", "fp32", "--out", str(REPORTS / "pipeline-scifact.json"),
        ])
    if "precision" in wanted:
        (args.work / "precision").mkdir(parents=True, exist_ok=True)
        from storage.manifest import read_manifest, resolve_index_dir

        # the default index is the one at its own precision (auto: bf16 or fp32 by the CPU)
        own = args.work / "precision" / read_manifest(resolve_index_dir(index))["encoding"]["precision"]
        if not own.exists():
            own.symlink_to(index.resolve(), target_is_directory=True)
        _step("precision", precision.main, [
            str(scifact), "--index-root", str(args.work / "precision"), "--chunks", "600", "--splits", "train", "test",
            "--max-queries", "200", "--out", str(REPORTS / "precision-scifact.md"),
        ])
    if "sweep" in wanted:
        variants = [
            _variant(scifact, args.work, "scifact-fill", ["--fde-fill"]),
            _variant(scifact, args.work, "scifact-flat", ["--ann", "flat"]),
            _variant(scifact, args.work, "scifact-fill-flat", ["--fde-fill", "--ann", "flat"]),
        ]
        _step("candidates sweep", candidates_sweep.main, [
            str(scifact), "--index", str(index), "--also", *variants, "--split", "train", "--max-queries", "300", "--depth", "10",
            "--candidates", "50", "100", "150", "200", "300", "400", "--out", str(REPORTS / "candidates-sweep-scifact-train-k10.md"),
        ])
        _step("rerank scopes", candidates_sweep.main, [
            str(scifact), "--index", str(index), "--split", "train", "--max-queries", "300", "--depth", "10",
            "--candidates", "200", "300", "400", "600", "--scopes", "documents", "chunks", "--out", str(REPORTS / "scope-scifact-train.md"),
        ])
        _step("hnsw storage", hnsw_storage.main, [
            str(scifact), "--index", str(index), "--max-queries", "100", "--out", str(REPORTS / "hnsw-storage-scifact-train.md"),
        ])
        _step("rerank prefilter", rerank_prefilter.main, [
            str(scifact), "--index", str(index), "--k", "10", "100", "--out", str(REPORTS / "rerank-prefilter-scifact-train.md"),
        ])
        _step("brute-force prefilter", rerank_prefilter.main, [
            str(scifact), "--index", str(index), "--split", "test", "--max-queries", "100", "--k", "10", "100", "--exhaustive",
            "--out", str(REPORTS / "exhaustive-prefilter-scifact-test.md"),
        ])
    if "candidates" in wanted:
        _step("candidates table", candidates_table.main, [
            str(scifact), "--index", str(index), "--cache-dir", str(args.work / "candidates-table"),
            "--out", str(REPORTS / "candidates-table-scifact.md"),
        ])
    if "scaling" in wanted:
        _step("scaling", scaling.main, [
            "--sizes", "1000", "full", "10000", "--dataset", str(scifact), "--source-index", str(index), "--scale-dir", str(args.work / "scale"),
            "--exact-token-memory", "float32", "--reuse", "--out", str(REPORTS / "scaling-scifact.md"),
        ])
        if args.large:  # HNSW first: the float32 brute-force opening sits beside the smaller served index
            _step("scaling 100k", scaling.main, [
                "--sizes", "100000", "--ann", "hnsw", "flat", "--latency-queries", "50", "--dataset", str(scifact),
                "--source-index", str(index), "--scale-dir", str(args.work / "scale"), "--exact-token-memory", "float32",
                "--merge", "--reuse", "--out", str(REPORTS / "scaling-scifact.md"),
            ])
            large = args.work / "scale" / "scifact-n100000-seed0"
            _step("open memory", open_memory.main, [str(index), str(large / "hnsw"), "--token-memory", "int8", "--out", str(REPORTS / "open-memory.md")])
            _step("ann build memory", ann_build.main, [str(index), str(large / "hnsw"), "--out", str(REPORTS / "ann-build.md")])
            _step("hnsw efSearch 100k", hnsw_efsearch.main, [
                str(scifact), "--split", "train", "--flat", str(large / "flat"), "--hnsw", str(large / "hnsw"),
                "--out", str(REPORTS / "hnsw-efsearch-100k-train.md"),
            ])
    if "memory" in wanted:
        float16 = _variant(scifact, args.work, "scifact-float16", ["--token-codec", "float16"])
        _step("memory", memory.main, [str(scifact), "--index", float16, "--split", "test", "--out", str(REPORTS / "memory-scifact.md")])
        cranfield = args.datasets / "cranfield"
        _step("index cranfield", lateflow_main, ["index", str(cranfield), "--index", str(args.work / "cranfield")])
        cranfield16 = _variant(cranfield, args.work, "cranfield-float16", ["--token-codec", "float16"])
        _step("memory cranfield", memory.main, [
            str(cranfield), "--index", cranfield16, "--split", "test", "--codecs", "int8", "int4", "int4-dim@98", "pca256-int8",
            "--fde-indexes", "flat", "sq8", "binary", "--out", str(REPORTS / "memory-cranfield.md"),
        ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
