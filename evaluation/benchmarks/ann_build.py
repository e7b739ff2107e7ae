"""Memory and time of building an index folder's ANN index from its FDEs: the whole matrix vs blocks.

Run (heavy for large folders: take the machine's lock)::

    flock /tmp/lateflow-heavy.lock .venv/bin/python -m evaluation.benchmarks.ann_build \\
        idx/scifact /work/scale-bf16/scifact-n100000-seed0/hnsw --out reports/benchmarks/ann-build.md

Each (folder, method) pair runs in a fresh Python process, so every peak is that build's alone:

* ``whole``: ``fde.parquet`` read into one float32 matrix, the index built from it (``build_ann``;
  the index flow until 2026-12-01);
* ``blocks``: the index built from the file a Parquet batch at a time (``build_ann_from_blocks``,
  what the index flow does now), the vectors handed to FAISS in batches of at most 1 GiB.

Both use the ANN settings of the folder's manifest. Reported: seconds (reading included), resident
memory before, the peak during the build, the FDE matrix's bytes and the built index's bytes. The
peak beyond the index itself is what building costs on top of what the index will hold.

Linux only for the memory columns (``/proc/self/status``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from evaluation.benchmarks import fresh_process_report

METHODS = ("whole", "blocks")
_GIB = 2**30


def ann_config_of(manifest: dict[str, Any]) -> Any:
    """The :class:`tasks.ann.ANNConfig` a folder's manifest records (its ``ann`` entry also holds facts)."""
    from tasks.ann import ANNConfig

    names = {f.name for f in dataclasses.fields(ANNConfig)}
    return ANNConfig(**{k: v for k, v in manifest["ann"].items() if k in names})


def measure_build(folder: str, method: str) -> dict[str, Any]:
    """Build ``folder``'s ANN index in this process by ``method`` and report time and memory (run it fresh)."""
    import faiss

    from evaluation.benchmarks.scaling import peak_rss_gib, reset_peak_rss, rss_gib
    from storage import index_files as files
    from storage.manifest import resolve_index_dir
    from tasks.ann import build_ann, build_ann_from_blocks

    path = resolve_index_dir(folder)
    config = ann_config_of(json.loads((path / "manifest.json").read_text(encoding="utf-8")))
    fde_path = path / files.FDE_FILE
    shape = files.fde_shape(fde_path)
    before = rss_gib()
    reset_peak_rss()
    started = time.perf_counter()
    if method == "whole":
        index, facts = build_ann(files.read_fde(fde_path), config)
    else:
        index, facts = build_ann_from_blocks(lambda: files.iter_fde(fde_path), shape, config)
    seconds = time.perf_counter() - started
    peak = peak_rss_gib()
    return {
        "folder": folder,
        "method": method,
        "kind": facts["kind"],
        "chunks": shape[0],
        "fde_dim": shape[1],
        "seconds": round(seconds, 1),
        "rss_before_gib": before,
        "peak_gib": peak,
        "fde_gib": round(shape[0] * shape[1] * 4 / _GIB, 3),
        "index_gib": round(int(faiss.serialize_index(index).nbytes) / _GIB, 3),
    }


def report_lines(rows: list[dict[str, Any]], machine: str) -> list[str]:
    """The Markdown report of :func:`main`.

    Examples
    --------
    >>> row = {"folder": "idx", "method": "blocks", "kind": "hnsw", "chunks": 10, "fde_dim": 64, "seconds": 2.0,
    ...        "rss_before_gib": 0.5, "peak_gib": 1.75, "fde_gib": 1.0, "index_gib": 0.25}
    >>> report_lines([row], "a machine")[-1]
    '| idx | blocks | hnsw | 10 | 64 | 2.0 | 1.0 | 0.25 | 0.5 | 1.75 | **1.0** |'
    """
    lines = [
        "# Building the ANN index from fde.parquet: the whole matrix vs blocks",
        "",
        f"machine: {machine}",
        "",
        "Each row is a fresh process. beyond the index = peak RSS during the build - RSS before - the",
        "built index's bytes: what building costs on top of what the index will hold.",
        "",
        "| folder | method | kind | chunks | FDE dims | build s | FDE matrix GiB | index GiB | RSS before GiB | peak GiB | beyond the index GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        beyond = round(row["peak_gib"] - row["rss_before_gib"] - row["index_gib"], 2)
        lines.append(
            f"| {row['folder']} | {row['method']} | {row['kind']} | {row['chunks']:,} | {row['fde_dim']:,} | {row['seconds']} "
            f"| {row['fde_gib']} | {row['index_gib']} | {row['rss_before_gib']} | {row['peak_gib']} | **{beyond}** |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="index folders (or their version folders)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=None, help="write the table (.md) and the raw numbers (.json) here")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_build(*args.child)))
        return 0
    children = [(folder, method) for folder in args.folders for method in args.methods]
    fresh_process_report("evaluation.benchmarks.ann_build", children, report_lines, args.out, lambda row: f"{row['seconds']} s, peak {row['peak_gib']} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
