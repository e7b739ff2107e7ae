"""The MUVERA paper's central curve: how many ANN candidates the FDEs need to find the exact top-k."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lateflow.engine import LateIndex, QueryTokens
from tasks.ann import search_ann

DEFAULT_GRID = (10, 20, 50, 100, 200, 500, 1000, 2000)


def fde_recall_curve(index: LateIndex, queries: Sequence[QueryTokens], exact_top: Sequence[Sequence[int]], grid: Sequence[int] = DEFAULT_GRID) -> dict[str, list]:
    """Mean recall of each query's exact top documents among the documents of the top-N ANN chunks.

    ``exact_top[i]`` holds document indices of query ``i``'s exact MaxSim top-k. ``grid`` values
    above the number of chunks are dropped.
    """
    grid = [n for n in grid if n <= index.tokens.n_chunks] or [index.tokens.n_chunks]
    n_max = max(grid)
    recalls = np.zeros((len(queries), len(grid)))
    for i, (query, top) in enumerate(zip(queries, exact_top)):
        _, rows = search_ann(index.ann, index.query_fde(query)[None, :], n_max)
        docs = index.chunk_doc[np.where(rows[0] >= 0, rows[0], 0)]
        wanted = set(int(d) for d in top)
        for j, n in enumerate(grid):
            recalls[i, j] = len(wanted & set(docs[:n].tolist())) / max(len(wanted), 1)
    return {"candidates": list(grid), "recall": [round(float(r), 4) for r in recalls.mean(axis=0)]}


def candidates_for_recall(curve: dict[str, list], level: float) -> int | None:
    """Smallest N of the curve whose recall reaches ``level`` (None if none does).

    Examples
    --------
    >>> candidates_for_recall({"candidates": [10, 100], "recall": [0.5, 0.92]}, 0.9)
    100
    """
    for n, r in zip(curve["candidates"], curve["recall"]):
        if r >= level:
            return n
    return None
