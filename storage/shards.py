"""Content-addressed shard files: the unit of caching and resumption of the index flow.

Every stage writes its output for one shard to a file whose name is a hash of everything that
determines it (input content, parameters, model fingerprint, code version). A stage whose output
file exists is skipped, so re-running a flow on the same input does no model work, and a run killed
at any point resumes where it stopped (writes are atomic, so an existing file is always complete).
We do this ourselves rather than through Prefect's result cache because the cached value must live
beside the index it belongs to, survive a fresh Prefect home, and disappear with the index.

Shard paths may be local paths or filesystem URLs (:mod:`storage.fs`), so that the workers of a
distributed run on several machines can share one cache on an object store or a shared mount.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from storage import fs


@dataclass(frozen=True)
class StageRun:
    """What one stage task did for one shard: the file it guarantees and the wall seconds it took.

    A task that found its file already there reports the few milliseconds of looking. The flow sums
    ``seconds`` per stage when the tasks run on workers (e.g. Dask), where its own clock sees only
    the wall time of all of them together.
    """

    path: str
    seconds: float


def timed_stage(work: Callable[[], str]) -> StageRun:
    """Run ``work`` (which returns the shard path it guarantees) and time it.

    Examples
    --------
    >>> run = timed_stage(lambda: "shard.parquet")
    >>> run.path, run.seconds >= 0
    ('shard.parquet', True)
    """
    started = time.perf_counter()
    path = work()
    return StageRun(str(path), time.perf_counter() - started)


def run_cached(out_path: str | os.PathLike, compute: Callable[[], pa.Table], *, compression: str = "zstd") -> str:
    """Return ``out_path``, computing and atomically writing it first unless it already exists.

    The file gets page CRCs: stage files stay in the cache for later runs, which check them
    (:func:`storage.segments.read_stage_file`). Writing them costs ~0.1 s per 300 MB.
    """
    if not fs.exists(out_path):
        fs.write_parquet(compute(), out_path, compression=compression, page_checksums=True)
    return str(out_path)
