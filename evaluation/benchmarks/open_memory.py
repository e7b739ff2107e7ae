"""Memory and time of opening an index: what ``LateIndex.open`` costs a service beyond what it holds.

Run (heavy for large folders: take the machine's lock)::

    flock /tmp/lateflow-heavy.lock .venv/bin/python -m evaluation.benchmarks.open_memory \\
        idx/scifact /work/scale-bf16/scifact-n100000-seed0/hnsw --token-memory auto int8 \\
        --out reports/benchmarks/open-memory.md

Each (folder, ``token_memory``) pair is opened in a fresh Python process, so every peak is that
opening's alone. The child imports the engine (torch, FAISS, pyarrow), records its resident memory,
resets the kernel's peak counter, opens the folder, then reports: open seconds, resident memory
before and after, the peak during the open, and the bytes the opened index holds in numpy and FAISS
(token vectors, their scales and ids, the ANN index). The ratios divide the memory the open added
(resident after - before) and its peak (peak - before) by those held bytes: 1.0 is the floor, any
excess is what reading costs on top. The query encoder is loaded lazily, on the first query, and
is not part of this.

Linux only (``/proc/self/status``); elsewhere the memory columns are empty.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from evaluation.benchmarks import fresh_process_report

_GIB = 2**30


def _held_bytes(index: Any) -> dict[str, int]:
    """Bytes of the large arrays an opened index keeps (token store and ANN index)."""
    import faiss

    tokens = index.tokens
    scale = 0 if tokens.row_scale is None else tokens.row_scale.nbytes
    try:
        ann_bytes = int(faiss.serialize_index(index.ann).nbytes)
    except RuntimeError:  # a GPU index serialises through its CPU copy
        ann_bytes = int(faiss.serialize_index(faiss.index_gpu_to_cpu(index.ann)).nbytes)
    return {"tokens": int(tokens.vectors.nbytes + scale + tokens.token_ids.nbytes + tokens.offsets.nbytes), "ann": ann_bytes}


def measure_open(folder: str, token_memory: str) -> dict[str, Any]:
    """Open ``folder`` in this process and report time, memory and held bytes (run it in a fresh process)."""
    from evaluation.benchmarks.scaling import peak_rss_gib, reset_peak_rss, rss_gib
    from lateflow.engine import LateIndex

    before = rss_gib()
    reset_peak_rss()
    started = time.perf_counter()
    index = LateIndex.open(folder, token_memory=token_memory)
    seconds = time.perf_counter() - started
    peak, after = peak_rss_gib(), rss_gib()
    held = _held_bytes(index)
    return {
        "folder": folder,
        "token_memory": token_memory,
        "token_dtype": str(index.tokens.vectors.dtype),
        "chunks": index.tokens.n_chunks,
        "tokens": int(index.tokens.offsets[-1]),
        "open_seconds": round(seconds, 2),
        "rss_before_gib": before,
        "rss_after_gib": after,
        "peak_gib": peak,
        "held_gib": {k: round(v / _GIB, 3) for k, v in held.items()},
    }


def _ratios(row: dict[str, Any]) -> tuple[float | None, float | None]:
    held = sum(row["held_gib"].values())
    if not held or not row["rss_after_gib"]:
        return None, None
    return round((row["rss_after_gib"] - row["rss_before_gib"]) / held, 2), round((row["peak_gib"] - row["rss_before_gib"]) / held, 2)


def report_lines(rows: list[dict[str, Any]], machine: str) -> list[str]:
    """The Markdown report of :func:`main`.

    Examples
    --------
    >>> row = {"folder": "idx", "token_memory": "auto", "token_dtype": "int8", "chunks": 10, "tokens": 900, "open_seconds": 2.0,
    ...        "rss_before_gib": 0.5, "rss_after_gib": 1.2, "peak_gib": 1.6, "held_gib": {"tokens": 0.5, "ann": 0.2}}
    >>> report_lines([row], "a machine")[-1]
    '| idx | auto (int8) | 10 | 900 | 2.0 | 0.5 | 0.2 | 0.5 | 1.2 | 1.6 | **1.0** | 1.57 |'
    """
    lines = [
        "# Opening an index: time and memory beyond what it holds",
        "",
        f"machine: {machine}",
        "",
        "Each row is a fresh process. held = the opened index's token store (vectors, scales, ids) and ANN",
        "index; resident / held = (RSS after open - RSS before) / held; peak / held = (peak RSS during open",
        "- RSS before) / held. 1.0 is the floor.",
        "",
        "| folder | token memory | chunks | tokens | open s | held tokens GiB | held ANN GiB | RSS before GiB | RSS after GiB | peak GiB | resident / held | peak / held |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        resident, peak = _ratios(row)
        lines.append(
            f"| {row['folder']} | {row['token_memory']} ({row['token_dtype']}) | {row['chunks']:,} | {row['tokens']:,} | {row['open_seconds']} "
            f"| {row['held_gib']['tokens']} | {row['held_gib']['ann']} | {row['rss_before_gib']} | {row['rss_after_gib']} | {row['peak_gib']} "
            f"| **{resident}** | {peak} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="index folders (or their version folders)")
    parser.add_argument("--token-memory", nargs="+", default=["auto"], choices=["auto", "float32", "float16", "int8"])
    parser.add_argument("--out", type=Path, default=None, help="write the table (.md) and the raw numbers (.json) here")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "TOKEN_MEMORY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_open(*args.child)))
        return 0
    children = [(folder, memory) for folder in args.folders for memory in args.token_memory]
    fresh_process_report("evaluation.benchmarks.open_memory", children, report_lines, args.out, lambda row: f"open {row['open_seconds']} s, peak {row['peak_gib']} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
