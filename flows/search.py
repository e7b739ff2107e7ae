"""The ``search`` flow: a file of queries -> the loaded index -> one Parquet run of ranked documents.

For scheduled or ad-hoc batch retrieval (e.g. precomputing a RAG application's contexts). The
queries go through the same in-process :class:`lateflow.engine.LateIndex` as every other search
path, in one task (coarse, as Prefect wants: per-query tasks would cost more than the searches).
A query with no token the model can read (a blank one, say) gets no rows and is listed in the
flow's result under ``unreadable``; it never stops the batch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from storage.atomic import write_parquet
from tasks.prf import PRFConfig

RUN_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("chunk_id", pa.int64(), nullable=False),
        pa.field("char_start", pa.int32(), nullable=False),
        pa.field("char_end", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
    ]
)


@task(name="search-batch", cache_policy=NO_CACHE)
def search_batch_task(index_dir: str, queries: dict[str, str], k: int, candidates: int, prf: PRFConfig | None) -> tuple[pa.Table, list[str]]:
    """Rank every query; return the run table and the ids of queries that could not be encoded."""
    from lateflow.engine import LateIndex

    index = LateIndex.open(index_dir)
    columns: dict[str, list[Any]] = {name: [] for name in RUN_SCHEMA.names}
    unreadable = [q for q, text in queries.items() if not text.strip()]
    ids = [q for q, text in queries.items() if text.strip()]
    for qid, query in zip(ids, index.encode_many([queries[q] for q in ids])):
        if len(query.vectors) == 0:
            unreadable.append(qid)
            continue
        for rank, (doc, score, chunk) in enumerate(index.rank(query, k, candidates=max(candidates, k), prf=prf), start=1):
            hit = index.hit(doc, score, chunk, rank)
            for name, value in (("query_id", qid), ("rank", rank), ("doc_id", hit.doc_id), ("score", score), ("chunk_id", chunk),
                                ("char_start", hit.char_start), ("char_end", hit.char_end), ("text", hit.text)):
                columns[name].append(value)
    return pa.table(columns, schema=RUN_SCHEMA), unreadable


@flow(name="search")
def search_flow(index_dir: str, queries_path: str, out_path: str, k: int = 10, candidates: int | None = None, prf: PRFConfig | None = None) -> dict[str, Any]:
    """Search every query of a ``queries.jsonl`` (``_id``, ``text``) and write the ranked run as Parquet.

    Parameters
    ----------
    index_dir
        Index folder built by ``lateflow index``.
    queries_path
        JSONL with ``_id`` and ``text`` per line; a bad line is an error naming file and line.
    out_path
        Parquet file to write (atomically): one row per (query, rank), schema :data:`RUN_SCHEMA`.
    k, candidates, prf
        As :meth:`lateflow.engine.LateIndex.search`.

    Returns
    -------
    dict
        ``{"queries", "rows", "unreadable", "out"}``.
    """
    from evaluation.datasets import read_queries
    from lateflow.engine import DEFAULT_CANDIDATES

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    queries = read_queries(Path(queries_path))
    table, unreadable = search_batch_task(index_dir, queries, k, candidates or DEFAULT_CANDIDATES, prf)
    write_parquet(table, Path(out_path))
    return {"queries": len(queries), "rows": table.num_rows, "unreadable": unreadable, "out": str(out_path)}
