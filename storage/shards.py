"""Content-addressed shard files: the unit of caching and resumption of the index flow.

Every stage writes its output for one shard to a file whose name is a hash of everything that
determines it (input content, parameters, model fingerprint, code version). A stage whose output
file exists is skipped, so re-running a flow on the same input does no model work, and a run killed
at any point resumes where it stopped (writes are atomic, so an existing file is always complete).
We do this ourselves rather than through Prefect's result cache because the cached value must live
beside the index it belongs to, survive a fresh Prefect home, and disappear with the index.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import write_parquet


def read_table(path: str | os.PathLike) -> pa.Table:
    """Read a whole Parquet file, naming the file in the error if it is unreadable."""
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise OSError(f"{path}: cannot read Parquet file ({exc})") from exc


def run_cached(out_path: str | os.PathLike, compute: Callable[[], pa.Table]) -> str:
    """Return ``out_path``, computing and atomically writing it first unless it already exists."""
    out = Path(out_path)
    if not out.is_file():
        write_parquet(compute(), out)
    return str(out)
