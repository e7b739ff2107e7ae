"""Stage 6: exact late-interaction (MaxSim / Chamfer) scoring over stored token embeddings.

The token store is one flat matrix of unit vectors (float16 or int8 on disk; float32, float16 or int8
in memory) plus CSR ``offsets``: set ``i`` owns rows ``offsets[i]:offsets[i+1]``. Scores are
computed in float32 (numpy float16 matrix products are very slow on CPU) one block of rows at a
time, so memory stays bounded whatever the corpus size. Per-set maxima use ``np.maximum.reduceat``
over the block: one BLAS call and one vectorised reduction per block, no Python loop per document.

An int8 store (``storage.token_codec.int8_rows``) holds codes whose unit vector is
``codes * row_scale``: every kernel takes ``row_scale`` and scales the similarities, one multiply
per (row, query token), instead of decoding the rows.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

_BLOCK_ROWS = 1 << 16
# ~12 MB of float32 rows at 384 dims: stays in cache between widening and product
_CANDIDATE_BLOCK_ROWS = 8192


def _segment_max(sim: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Row-segment maxima of ``sim`` (rows x cols) for segments beginning at ``starts`` (non-empty)."""
    return np.maximum.reduceat(sim, starts, axis=0)


def _similarities(
    tokens: np.ndarray, lo: int, hi: int, q: np.ndarray, row_scale: np.ndarray | None, buffer: np.ndarray | None = None
) -> np.ndarray:
    """float32 (rows lo:hi) x (query tokens) inner products; rows scaled by ``row_scale`` when given.

    Rows that are not float32 are widened into ``buffer`` when one is given: the block loops reuse
    one buffer, as a fresh ~200 MB temporary per block made brute force over an int8 store 1.4x
    slower (page faults); int8 x float32 in one ufunc is slower still than widen, multiply, scale.
    """
    rows = tokens[lo:hi]
    if rows.dtype != np.float32:
        if buffer is not None:
            widened = buffer[: hi - lo]
            widened[...] = rows
            rows = widened
        else:
            rows = rows.astype(np.float32)
    sim = rows @ q.T
    if row_scale is not None:
        sim *= row_scale[lo:hi, None]
    return sim


def _block_buffer(tokens: np.ndarray, rows: int) -> np.ndarray | None:
    """A reusable float32 block for a store that is not float32 (None when it is: no widening)."""
    return None if tokens.dtype == np.float32 else np.empty((min(rows, len(tokens)), tokens.shape[1]), dtype=np.float32)


def maxsim_kernel(
    query: np.ndarray, tokens: np.ndarray, offsets: np.ndarray, weights: np.ndarray | None = None, row_scale: np.ndarray | None = None
) -> np.ndarray:
    """Weighted MaxSim of one query against every set in a contiguous CSR slice of the store.

    ``score_i = sum_q w_q * max_{t in set i} <query_q, t>``. Empty sets score ``-inf``.
    """
    n_sets = len(offsets) - 1
    scores = np.full(n_sets, -np.inf, dtype=np.float32)
    q = np.ascontiguousarray(query, dtype=np.float32)
    w = np.ones(len(q), dtype=np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    lengths = np.diff(offsets)
    buffer = None
    first = 0
    while first < n_sets:
        # grow the block of sets until it holds about _BLOCK_ROWS token rows
        last = int(np.searchsorted(offsets, offsets[first] + _BLOCK_ROWS, side="right")) - 1
        last = min(max(last, first + 1), n_sets)
        lo, hi = int(offsets[first]), int(offsets[last])
        block_sets = np.arange(first, last)
        nonempty = block_sets[lengths[first:last] > 0]
        if len(nonempty):
            if buffer is None or len(buffer) < hi - lo:
                buffer = _block_buffer(tokens, max(hi - lo, _BLOCK_ROWS))
            maxima = _segment_max(_similarities(tokens, lo, hi, q, row_scale, buffer), offsets[nonempty] - lo)
            scores[nonempty] = maxima @ w
        first = last
    return scores


def maxsim(query: np.ndarray, doc: np.ndarray) -> float:
    """MaxSim (Chamfer) similarity of one query matrix and one document matrix.

    Examples
    --------
    >>> q = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> d = np.array([[0.6, 0.8], [1.0, 0.0]])
    >>> round(maxsim(q, d), 4)
    1.8
    """
    return float(maxsim_kernel(query, doc, np.array([0, len(doc)]))[0]) if len(doc) else float("-inf")


def gather_rows(offsets: np.ndarray, set_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the chosen CSR sets, concatenated, and the new offsets of each set among them.

    Examples
    --------
    >>> rows, new = gather_rows(np.array([0, 2, 2, 5]), np.array([2, 0]))
    >>> rows.tolist(), new.tolist()
    ([2, 3, 4, 0, 1], [0, 3, 5])
    """
    set_ids = np.asarray(set_ids, dtype=np.int64)
    starts, ends = offsets[set_ids], offsets[set_ids + 1]
    lengths = ends - starts
    new_offsets = np.zeros(len(set_ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    # row index = start of its set + position within the set, built without a Python loop
    rows = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return rows, new_offsets


def scoreable_sets(offsets: np.ndarray, set_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``set_ids`` as int64, a ``-inf`` score per set to fill in, and the positions of the non-empty sets.

    Examples
    --------
    >>> ids, scores, nonempty = scoreable_sets(np.array([0, 2, 2, 5]), [2, 1, 0])
    >>> ids.tolist(), scores.tolist(), nonempty.tolist()
    ([2, 1, 0], [-inf, -inf, -inf], [0, 2])
    """
    set_ids = np.asarray(set_ids, dtype=np.int64)
    scores = np.full(len(set_ids), -np.inf, dtype=np.float32)
    return set_ids, scores, np.flatnonzero(offsets[set_ids + 1] - offsets[set_ids] > 0)


def maxsim_candidates(
    query: np.ndarray,
    tokens: np.ndarray,
    offsets: np.ndarray,
    set_ids: np.ndarray,
    weights: np.ndarray | None = None,
    row_scale: np.ndarray | None = None,
) -> np.ndarray:
    """Exact weighted MaxSim of a query against the chosen sets (scores aligned with ``set_ids``).

    The sets are visited in store order as runs of consecutive ids, and each run's rows are
    multiplied where they lie (a view of a float32 store): gathering them into a new matrix first
    copied ~120 MB per scifact query and cost as much as the products. Any order, repeats and empty
    sets (score ``-inf``) are allowed.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> store = rng.normal(size=(10, 4)).astype(np.float16); offsets = np.array([0, 3, 7, 10])
    >>> q = rng.normal(size=(2, 4)).astype(np.float32)
    >>> full = maxsim_kernel(q, store, offsets)
    >>> bool(np.allclose(maxsim_candidates(q, store, offsets, np.array([2, 0])), full[[2, 0]]))
    True
    """
    set_ids, scores, chosen = scoreable_sets(offsets, set_ids)
    if len(chosen) == 0:
        return scores
    chosen = chosen[np.argsort(set_ids[chosen], kind="stable")]
    ids = set_ids[chosen]
    q = np.ascontiguousarray(query, dtype=np.float32)
    w = np.ones(len(q), dtype=np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    # every chosen set's similarity rows, back to back, computed run by run of consecutive sets
    row_starts = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(offsets[ids + 1] - offsets[ids], out=row_starts[1:])
    breaks = np.flatnonzero(ids[1:] != ids[:-1] + 1) + 1
    firsts, lasts = np.r_[0, breaks], np.r_[breaks, len(ids)]
    runs = np.stack([offsets[ids[firsts]], offsets[ids[lasts - 1] + 1]], axis=1)
    sim = _run_similarities(tokens, runs, q, int(row_starts[-1]))
    if row_scale is not None:
        sim *= np.concatenate([row_scale[lo:hi] for lo, hi in runs])[:, None]
    scores[chosen] = _segment_max(sim, row_starts[:-1]) @ w
    return scores


def _run_similarities(tokens: np.ndarray, runs: np.ndarray, q: np.ndarray, n_rows: int, block_rows: int = _CANDIDATE_BLOCK_ROWS) -> np.ndarray:
    """float32 inner products of the store's row ranges ``runs`` (``[lo, hi)`` pairs), back to back, with ``q``.

    A float32 store is multiplied where it lies (views). Other stores are widened into one reused
    float32 block of ``block_rows`` rows (~12 MB at 384 dims, so it stays in cache between the
    widening and the product) that is multiplied when full, instead of one fresh ``astype``
    temporary per run. On scifact (~300 runs, ~70k int8 rows per query) the two take the same time:
    the products dominate, compute bound at ~37 GFLOP/s on one thread.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> store = rng.integers(-127, 128, size=(50, 8)).astype(np.int8); q = rng.normal(size=(3, 8)).astype(np.float32)
    >>> runs = np.array([[40, 50], [0, 7], [10, 30]])
    >>> expected = np.concatenate([store[lo:hi].astype(np.float32) @ q.T for lo, hi in runs])
    >>> bool(np.allclose(_run_similarities(store, runs, q, 37, block_rows=16), expected))
    True
    """
    sim = np.empty((n_rows, len(q)), dtype=np.float32)
    if tokens.dtype == np.float32:
        done = 0
        for lo, hi in runs:
            np.matmul(tokens[lo:hi], q.T, out=sim[done : done + hi - lo])
            done += hi - lo
        return sim
    buffer = np.empty((min(block_rows, n_rows), tokens.shape[1]), dtype=np.float32)
    filled = flushed = 0
    for lo, hi in runs:
        pos = int(lo)
        while pos < hi:
            take = min(int(hi) - pos, len(buffer) - filled)
            buffer[filled : filled + take] = tokens[pos : pos + take]
            filled, pos = filled + take, pos + take
            if filled == len(buffer):
                np.matmul(buffer, q.T, out=sim[flushed : flushed + filled])
                flushed, filled = flushed + filled, 0
    if filled:
        np.matmul(buffer[:filled], q.T, out=sim[flushed : flushed + filled])
    return sim


def group_max(scores: np.ndarray, group_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per contiguous group (a document's chunks), the best score and the index of the best member.

    Examples
    --------
    >>> group_max(np.array([1.0, 3.0, 2.0, 0.5]), np.array([0, 2, 4]))
    (array([3., 2.]), array([1, 2]))
    """
    best = np.maximum.reduceat(scores, group_offsets[:-1])
    group_of = np.repeat(np.arange(len(group_offsets) - 1), np.diff(group_offsets))
    is_best = scores == best[group_of]
    # first member reaching the maximum, found without a Python loop
    candidates = np.where(is_best, np.arange(len(scores)), len(scores))
    argbest = np.minimum.reduceat(candidates, group_offsets[:-1])
    return best, argbest


def maxsim_exhaustive(
    queries: list[np.ndarray], tokens: np.ndarray, offsets: np.ndarray, *, block_rows: int = 1 << 17, row_scale: np.ndarray | None = None
) -> np.ndarray:
    """Brute-force MaxSim of many queries against every set: the quality ceiling.

    All queries' tokens are stacked so each block of the store is converted to float32 once and
    multiplied by all of them in a single BLAS call. Returns float32 (n_queries, n_sets).
    """
    q_offsets = np.zeros(len(queries) + 1, dtype=np.int64)
    np.cumsum([len(q) for q in queries], out=q_offsets[1:])
    stacked = np.ascontiguousarray(np.concatenate(queries), dtype=np.float32)
    out = np.full((len(queries), len(offsets) - 1), -np.inf, dtype=np.float32)
    buffer = None
    for lo, hi, nonempty in set_blocks(offsets, block_rows):
        if buffer is None or len(buffer) < hi - lo:
            buffer = _block_buffer(tokens, max(hi - lo, block_rows))
        sim = _similarities(tokens, lo, hi, stacked, row_scale, buffer)  # (rows, all query tokens)
        maxima = _segment_max(sim, offsets[nonempty] - lo)  # (sets, all query tokens)
        out[:, nonempty] = np.add.reduceat(maxima, q_offsets[:-1], axis=1).T
    return out


def set_blocks(offsets: np.ndarray, block_rows: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Whole consecutive sets of a CSR store in blocks of about ``block_rows`` rows (at least one set each).

    Yields ``(lo, hi, nonempty)``: the block's rows ``lo:hi`` and its non-empty sets; blocks made
    only of empty sets are skipped.

    Examples
    --------
    >>> [(lo, hi, s.tolist()) for lo, hi, s in set_blocks(np.array([0, 3, 3, 4, 9]), 4)]
    [(0, 4, [0, 2]), (4, 9, [3])]
    """
    n_sets, lengths = len(offsets) - 1, np.diff(offsets)
    first = 0
    while first < n_sets:
        last = int(np.searchsorted(offsets, offsets[first] + block_rows, side="right")) - 1
        last = min(max(last, first + 1), n_sets)
        nonempty = first + np.flatnonzero(lengths[first:last] > 0)
        if len(nonempty):
            yield int(offsets[first]), int(offsets[last]), nonempty
        first = last
