"""The ``evaluate`` flow: dataset -> (cached) index -> every system over every query -> ranx -> report.

Writes into ``OUT_DIR``: ``report.json`` (schema in DESIGN.md, plus extra fields), ``report.md``,
``runs/<system>.trec`` and ``.parquet``, and ``plots/fde_recall.png`` and ``plots/quality_latency.png``.
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any, Sequence

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from evaluation.datasets import DatasetError, EvalDataset, load_dataset, subsample
from flows.index import IndexConfig, index_flow
from storage.atomic import atomic_path, write_json
from tasks.prf import PRFConfig

DEPTH = 100
PRF_COMPARISON = ("fde-rerank", "fde-prf-rerank", "fde-prf-retrieve")


@task(name="load-dataset", cache_policy=NO_CACHE)
def load_dataset_task(dataset_dir: str, split: str, max_queries: int | None = None) -> EvalDataset:
    return subsample(load_dataset(dataset_dir, split), max_queries)


@task(name="run-system", cache_policy=NO_CACHE)
def run_system_task(name: str, index_dir: str, queries: dict[str, str], candidates: int, prf: PRFConfig | None) -> tuple[dict, list[float], list[str]]:
    """Run one system over every query (in-process, timed per query after warm-up); see ``run_ranker``."""
    from evaluation.systems import make_ranker, run_ranker

    index = _open_index(index_dir)
    return run_ranker(make_ranker(name, index, depth=DEPTH, candidates=candidates, prf=prf), queries)


def _existing_index(index_path: Path, corpus_path: Path) -> dict[str, Any] | None:
    """The manifest of the index at ``index_path`` if one is there and holds ``corpus_path``'s file, else None.

    Evaluating an index must not change it: rebuilding it with the command's default settings
    switched a folder a server may be watching to another configuration, and the report then
    scored that configuration instead of the user's.
    """
    from storage.hashing import sha256_file
    from storage.manifest import read_manifest

    if not (index_path / "current").exists() and not (index_path / "manifest.json").exists():
        return None
    manifest = read_manifest(index_path)
    built_from = manifest.get("corpus", {}).get("file_sha256")
    if built_from != sha256_file(corpus_path):
        raise DatasetError(
            f"{index_path} was built from {manifest.get('corpus', {}).get('path')}, not from {corpus_path} (the files differ): "
            "bring it up to date first (`lateflow index CORPUS --index DIR` with its settings), pass index options "
            "(--window, --fde-reps, ...) to rebuild it here with those, or leave out --index to build a fresh one"
        )
    return manifest


_opened: dict[str, Any] = {}


def _open_index(index_dir: str):
    """One opened index per folder and process (the token store is large; load it once), reopened
    when the folder's current version changes (a second evaluation after the corpus changed)."""
    from lateflow.engine import LateIndex
    from storage.manifest import read_manifest

    current = read_manifest(index_dir)["index_id"]
    opened = _opened.get(index_dir)
    if opened is None or opened.index_id != current:
        _opened[index_dir] = opened = LateIndex.open(index_dir)
    return opened


def _bytes_on_disk(index_dir: Path) -> int:
    from storage.manifest import resolve_index_dir

    # the current version's artifacts (a versioned index keeps them in INDEX/versions/<version>/)
    folder = resolve_index_dir(index_dir)
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _save_run(run: dict[str, dict[str, float]], name: str, folder: Path) -> None:
    """Write a run as ``.parquet`` (exact ids) and ``.trec`` (ids with whitespace percent-encoded)."""
    from evaluation.scoring import to_run, trec_safe_id

    folder.mkdir(parents=True, exist_ok=True)
    # TREC run lines are whitespace-separated, and some datasets (LIMIT) have ids with spaces
    trec_run = {trec_safe_id(q): {trec_safe_id(d): s for d, s in docs.items()} for q, docs in run.items()}
    for suffix, ranx_run in ((".trec", to_run(trec_run, name)), (".parquet", to_run(run, name))):
        with atomic_path(folder / f"{name}{suffix}") as tmp:
            target = tmp.with_suffix(suffix)  # ranx picks the format from the suffix
            ranx_run.save(str(target))
            target.replace(tmp)


# no log_prints: progress prints go straight to stdout (Prefect logs only WARNING and up, flows/settings.py)
@flow(name="evaluate")
def evaluate_flow(
    dataset_dir: str,
    out_dir: str,
    split: str = "test",
    systems: Sequence[str] | None = None,
    index_dir: str | None = None,
    config: IndexConfig = IndexConfig(),
    candidates: int | None = None,
    prf: PRFConfig | None = None,
    command: str | None = None,
    max_queries: int | None = None,
    rebuild_existing: bool = True,
) -> dict[str, Any]:
    """Evaluate every requested system on a BEIR dataset split and write the report files.

    Parameters
    ----------
    dataset_dir
        BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).
    out_dir
        Report folder.
    split
        Qrels split to score.
    systems
        System names (default: all of :data:`evaluation.systems.ALL_SYSTEMS`).
    index_dir
        Index folder to build or reuse (default ``OUT_DIR/index``); an up-to-date index is reused.
    config
        Index settings (used when the index is built or brought up to date).
    candidates
        ANN chunk candidates reranked by ``fde-rerank`` (default: the engine's default).
    prf
        ColBERT-PRF settings of the ``fde-prf-*`` systems (default :class:`tasks.prf.PRFConfig`).
    command
        The command line recorded in the report for reproduction.
    max_queries
        Evaluate a fixed subset of at most this many queries (chosen by a hash of their ids; the
        report records ``queries_sampled_from``). None: every query of the split.
    rebuild_existing
        False: an existing ``index_dir`` is evaluated as it is, with its own settings, and never
        rebuilt with ``config`` (``lateflow evaluate --index DIR`` without index options); it must
        have been built from the dataset's corpus file (same SHA-256), else a ValueError says so.
    """
    from evaluation.curves import fde_recall_curve
    from evaluation.machine import describe_machine, machine_line
    from evaluation.plots import plot_fde_recall, plot_quality_latency
    from evaluation.report import render_markdown
    from evaluation.scoring import score_run, significance, to_qrels, to_run
    from evaluation.systems import ALL_SYSTEMS, REFERENCE_SYSTEM as REFERENCE, latency_summary
    from lateflow.engine import DEFAULT_CANDIDATES

    started = time.perf_counter()
    systems = list(systems or ALL_SYSTEMS)
    unknown = [s for s in systems if s not in ALL_SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; choose from {', '.join(ALL_SYSTEMS)}")
    candidates = candidates or DEFAULT_CANDIDATES
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset_task(dataset_dir, split, max_queries)
    index_path = Path(index_dir) if index_dir else out / "index"
    manifest = _existing_index(index_path, dataset.corpus_path) if not rebuild_existing else None
    if manifest is None:
        manifest = index_flow(str(dataset.corpus_path), str(index_path), config)
    index = _open_index(str(index_path))
    qrels = to_qrels(dataset.qrels)
    runs, results = {}, {}
    unreadable: set[str] = set()
    for name in systems:
        run, latencies, no_tokens = run_system_task(name, str(index_path), dataset.queries, candidates, prf)
        unreadable.update(no_tokens)
        runs[name] = to_run(run, name)
        _save_run(run, name, out / "runs")
        results[name] = {**score_run(qrels, runs[name]), "latency_ms": latency_summary(latencies)}
        print(f"{name}: nDCG@10 {results[name]['ndcg@10']:.4f}, p50 {results[name]['latency_ms']['p50']:.1f} ms")
    machine = describe_machine()
    report: dict[str, Any] = {
        "dataset": dataset.name,
        "split": split,
        "docs": len(index),
        "queries": len(dataset.queries),
        "systems": results,
        "index": {
            "model": manifest["model"]["path"],
            "fde_dim": manifest["counts"]["fde_dim"],
            "chunks": manifest["counts"]["chunks"],
            "tokens": manifest["counts"]["tokens"],
            "bytes_on_disk": _bytes_on_disk(index_path),
            "build_seconds": manifest["build_seconds"],
            "index_id": manifest["index_id"],
            "ann": manifest["ann"]["kind"],
        },
        "settings": {"candidates": candidates, "prf": (prf or PRFConfig()).to_dict(), "depth": DEPTH, "fde": manifest["fde"], "chunking": manifest["chunking"], "precision": manifest["encoding"]["precision"]},
        "significance": significance(qrels, runs, REFERENCE) if REFERENCE in runs else {},
        # does feedback help? each PRF system against the same search without it
        "significance_prf": significance(qrels, {n: r for n, r in runs.items() if n in PRF_COMPARISON}, "fde-rerank") if "fde-rerank" in runs else {},
        # queries the model keeps no token of are scored as empty rankings: counted, not hidden
        "dataset_issues": {**dataset.issues, "queries_without_readable_tokens": len(unreadable)},
        "machine": machine,
        "machine_line": machine_line(machine),
    }
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    if "maxsim-exact" in runs:
        doc_row = {d: i for i, d in enumerate(index.doc_ids)}
        exact = [[doc_row[d] for d in list(runs["maxsim-exact"].run[q])[:10] if d in doc_row] for q in dataset.queries]
        curve = fde_recall_curve(index, index.encode_many(list(dataset.queries.values())), exact)
        report["fde_recall_curve"] = curve
        plot_fde_recall(curve, plots / "fde_recall.png", f"{dataset.name}: FDE candidates vs recall of exact top-10")
    plot_quality_latency(results, plots / "quality_latency.png", f"{dataset.name} ({split}): quality vs latency")
    report["command"] = command or " ".join(shlex.quote(a) for a in ["lateflow", "evaluate", dataset_dir, "--out", out_dir, "--split", split])
    report["evaluation_seconds"] = round(time.perf_counter() - started, 2)
    write_json(report, out / "report.json")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(render_markdown(report), encoding="utf-8")
    return report
