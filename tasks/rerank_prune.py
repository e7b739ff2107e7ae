"""A bounded int8 prefilter for the exact rerank: score everything cheaply, re-score exactly what can matter.

Exact MaxSim over an int8 token store widens every candidate row to float32 and multiplies it by the
float32 query; on scifact that is ~70k rows per query, ~40 ms on one core. Quantising the *query*
to int8 as well turns the product into an int8 x int8 -> int32 matrix product (``torch._int_mm``,
VNNI on x86), about 4x faster, whose error has a hard bound:

* each query token ``q_t`` becomes ``codes_t * scale_t`` with residual ``r_t``; every stored token
  ``d`` is a unit vector (``codes * row_scale``), so ``|<q_t, d> - <q_t - r_t, d>| <= ||r_t||``;
* a max over a set moves by at most as much as its members, so the weighted MaxSim moves by at most
  ``bound = sum_t |w_t| * ||r_t||`` (0.1-0.3 on scifact queries, whose top scores are ~5).

Given approximate scores within ``bound`` of the exact ones, a set whose approximate score is below
the ``k``-th best group's approximate score minus ``2 * bound`` is provably outside the exact top
``k`` groups, and cannot be the best set of a group inside it: k groups score at least that k-th
approximate score minus ``bound`` exactly, and the set at most its approximate score plus ``bound``.
Only the sets above that line are re-scored exactly (~5% of them for a top-10 on scifact), so the
top ``k`` groups, their order, their scores and their best sets are those of the exact rerank
(up to float rounding: the survivors' float32 sums may differ in the last bit from a product over
all candidates, so scores that tie exactly, as duplicate documents' do, may come in another order).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from tasks.rerank import gather_rows, group_max, maxsim_candidates, scoreable_sets

# float32 rounding of the scaled int32 products and their sum, far above its real size (~1e-6)
_ROUNDING_SLACK = 1e-4


def quantize_query(query: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token symmetric int8 codes of a float query, their scales, and each token's residual norm.

    ``query[t] ~= codes[t] * scales[t]`` and ``residuals[t] = ||query[t] - codes[t] * scales[t]||``.

    Examples
    --------
    >>> codes, scales, residuals = quantize_query(np.array([[0.6, -0.8], [0.0, 0.0]], dtype=np.float32))
    >>> codes.tolist(), [round(float(s), 5) for s in scales], bool(residuals.max() < 0.004)
    ([[95, -127], [0, 0]], [0.0063, 1.0], True)
    """
    q = np.asarray(query, dtype=np.float32)
    scales = np.abs(q).max(axis=1) / 127.0
    scales[scales == 0] = 1.0  # a zero token: any scale gives zero codes
    codes = np.rint(q / scales[:, None]).astype(np.int8)
    residuals = np.linalg.norm(q - codes.astype(np.float32) * scales[:, None], axis=1)
    return codes, scales.astype(np.float32), residuals.astype(np.float32)


def int8_matmul(codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exact int32 products of int8 query ``codes`` (m x dim) and int8 ``rows`` (n x dim): (m x n).

    ``torch._int_mm`` where this torch has it, else numpy in int32 (same result, slower). The
    query-major orientation (rows read through a transposed view) measured 1.7x faster than the
    row-major one for ~70k rows x 384 dims x 22 tokens on one core.

    Examples
    --------
    >>> b = np.array([[127, 127]], dtype=np.int8); a = np.array([[127, -127], [1, 2]], dtype=np.int8)
    >>> int8_matmul(b, a).tolist()
    [[0, 381]]
    """
    try:
        import torch

        return torch._int_mm(torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(np.ascontiguousarray(rows)).T).numpy()
    except (ImportError, AttributeError, RuntimeError):
        return codes.astype(np.int32) @ rows.astype(np.int32).T


def approximate_maxsim(
    codes: np.ndarray, scales: np.ndarray, tokens: np.ndarray, offsets: np.ndarray, set_ids: np.ndarray, row_scale: np.ndarray,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Weighted MaxSim of the int8 query ``codes * scales`` against the chosen sets of an int8 store.

    Empty sets score ``-inf``; scores are aligned with ``set_ids``.

    Examples
    --------
    >>> store = np.array([[127, 0], [0, 127], [90, 90]], dtype=np.int8); scale = 1 / np.linalg.norm(store, axis=1)
    >>> codes, scales, _ = quantize_query(np.array([[1.0, 0.0]], dtype=np.float32))
    >>> s = approximate_maxsim(codes, scales, store, np.array([0, 2, 2, 3]), np.array([0, 1, 2]), scale)
    >>> [round(float(x), 3) for x in s]
    [1.0, -inf, 0.707]
    """
    set_ids, scores, nonempty = scoreable_sets(offsets, set_ids)
    if len(nonempty) == 0:
        return scores
    ids = set_ids[nonempty]
    w = np.ones(len(codes), dtype=np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    weighted = scales * w  # the query scales are > 0: they commute with the max
    out = np.empty(len(ids), dtype=np.float32)
    # a cache-sized block of similarities at a time: ~400 scifact candidates (~70k rows) took 7.4 ms
    # in blocks of 2^18 values against 9.5 ms in one product (200 test queries, alternated)
    for lo, hi in length_blocks(offsets[ids + 1] - offsets[ids], int8_block_rows(len(codes))):
        rows, starts = gather_rows(offsets, ids[lo:hi])
        sim = int8_matmul(codes, np.take(tokens, rows, axis=0)).astype(np.float32)  # exact: |values| < 2^24
        sim *= row_scale[rows]
        out[lo:hi] = weighted @ np.maximum.reduceat(sim, starts[:-1], axis=1)
    scores[nonempty] = out
    return scores


def length_blocks(lengths: np.ndarray, block_rows: int) -> Iterator[tuple[int, int]]:
    """Consecutive ranges ``lo:hi`` of sets whose ``lengths`` sum to at most ``block_rows`` (at least one set each).

    Examples
    --------
    >>> list(length_blocks(np.array([3, 1, 4, 9, 2]), 5))
    [(0, 2), (2, 3), (3, 4), (4, 5)]
    """
    ends = np.cumsum(lengths)
    lo = 0
    while lo < len(lengths):
        base = ends[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(ends, base + block_rows, side="right")))
        yield lo, hi
        lo = hi


def prunable(tokens: np.ndarray, row_scale: np.ndarray | None) -> bool:
    """Whether the prefilter applies: an int8 store with its per-row scales."""
    return tokens.dtype == np.int8 and row_scale is not None


def maxsim_top_groups(
    query: np.ndarray,
    tokens: np.ndarray,
    offsets: np.ndarray,
    set_ids: np.ndarray,
    group_offsets: np.ndarray,
    k: int,
    weights: np.ndarray | None = None,
    row_scale: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Exact MaxSim of every set that can matter for the top ``k`` groups; ``-inf`` for the others.

    Sets ``set_ids[group_offsets[g]:group_offsets[g+1]]`` form group ``g`` (a document's chunks);
    a group's score is its best set's. The top ``k`` groups by the returned scores, with their
    scores and best sets, are exactly those of :func:`tasks.rerank.maxsim_candidates` (see the
    module docstring). Returns the scores and the share of sets that were re-scored exactly (1.0
    when the store is not int8 or there are at most ``k`` groups: everything is scored exactly).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> from storage.token_codec import int8_rows, encode
    >>> unit = rng.normal(size=(400, 16)).astype(np.float32); unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    >>> store, scale = int8_rows(encode(unit, "int8"), "int8")
    >>> offsets = np.arange(0, 401, 4); sets = np.arange(100); groups = np.arange(0, 101, 2)
    >>> q = rng.normal(size=(5, 16)).astype(np.float32); q /= np.linalg.norm(q, axis=1, keepdims=True)
    >>> pruned, share = maxsim_top_groups(q, store, offsets, sets, groups, 3, row_scale=scale)
    >>> exact = maxsim_candidates(q, store, offsets, sets, row_scale=scale)
    >>> top = lambda s: np.argsort(-group_max(s, groups)[0], kind="stable")[:3].tolist()
    >>> top(pruned) == top(exact), share < 1.0
    (True, True)
    """
    set_ids = np.asarray(set_ids, dtype=np.int64)
    n_groups = len(group_offsets) - 1
    if not prunable(tokens, row_scale) or n_groups <= k or k < 1 or len(set_ids) == 0:
        return maxsim_candidates(query, tokens, offsets, set_ids, weights, row_scale), 1.0
    codes, scales, residuals = quantize_query(query)
    w = np.ones(len(codes), dtype=np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    bound = float(np.abs(w) @ residuals) + _ROUNDING_SLACK * float(np.abs(w).sum())
    approx = approximate_maxsim(codes, scales, tokens, offsets, set_ids, row_scale, w)
    group_best, _ = group_max(approx, group_offsets)
    kth = np.partition(group_best, n_groups - k)[n_groups - k]
    if not np.isfinite(kth):
        return maxsim_candidates(query, tokens, offsets, set_ids, weights, row_scale), 1.0
    keep = np.flatnonzero(approx >= kth - 2 * bound)
    scores = np.full(len(set_ids), -np.inf, dtype=np.float32)
    scores[keep] = maxsim_candidates(query, tokens, offsets, set_ids[keep], weights, row_scale)
    return scores, len(keep) / len(set_ids)


# The int8 passes keep a block's similarities (query tokens x rows, int32) near the cache size: one
# 22-token scifact query over the whole store took 201-209 ms in blocks of 2^18 values against
# 282-299 ms in blocks of 2^25 (41 tokens: 274-299 against 478-562 ms; one thread, alternated).
# Many stacked queries (brute force over a batch) still get blocks of a few thousand rows.
_INT8_BLOCK_VALUES = 1 << 18
_INT8_MIN_BLOCK_ROWS = 2048


def int8_block_rows(query_tokens: int) -> int:
    """Store rows per block of an int8 pass, for ``query_tokens`` (stacked) query tokens.

    Examples
    --------
    >>> int8_block_rows(22), int8_block_rows(6600)
    (11915, 2048)
    """
    return max(_INT8_MIN_BLOCK_ROWS, _INT8_BLOCK_VALUES // max(1, query_tokens))


def maxsim_exhaustive_top_groups(
    queries: list[np.ndarray],
    tokens: np.ndarray,
    offsets: np.ndarray,
    group_offsets: np.ndarray,
    k: int,
    row_scale: np.ndarray | None = None,
    *,
    block_values: int | None = None,
) -> np.ndarray:
    """Brute force with the same guarantee as :func:`maxsim_top_groups`: every set of the store is a candidate.

    Returns float32 (n_queries, n_sets): the exact MaxSim of every set that can be among a query's
    top ``k`` groups or their best sets, ``-inf`` for the others, so the top ``k`` groups, their
    order, scores and best sets are those of :func:`tasks.rerank.maxsim_exhaustive` up to float
    rounding: the survivors are re-scored by the rerank's kernel (:func:`tasks.rerank.maxsim_candidates`),
    whose float32 sums may differ from brute force's in the last bit, so groups whose scores tie
    exactly (duplicate documents) can come in another order, as they can between two blockings of
    plain brute force.

    The int8 pass reads the store in contiguous blocks (no gather) with every query's codes
    stacked, one ``int8 x int8`` product per block of about ``block_values`` int32 similarities
    (default: :func:`int8_block_rows`); only the survivors (~2% of scifact's chunks for a
    top 100) are re-scored exactly. Falls back to the plain brute force where there are no int8
    codes.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> from storage.token_codec import int8_rows, encode
    >>> from tasks.rerank import maxsim_exhaustive
    >>> unit = rng.normal(size=(600, 16)).astype(np.float32); unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    >>> store, scale = int8_rows(encode(unit, "int8"), "int8")
    >>> offsets = np.concatenate([[0, 0], np.arange(6, 601, 6)]); groups = np.append(np.arange(0, 101, 3), 101)  # set 0 is empty
    >>> qs = [rng.normal(size=(n, 16)).astype(np.float32) for n in (4, 7)]
    >>> pruned = maxsim_exhaustive_top_groups(qs, store, offsets, groups, 5, scale, block_values=200)
    >>> exact = maxsim_exhaustive(qs, store, offsets, row_scale=scale)
    >>> top = lambda s: np.argsort(-group_max(s, groups)[0], kind="stable")[:5].tolist()
    >>> all(top(p) == top(e) for p, e in zip(pruned, exact)), bool(np.isinf(pruned).any())
    (True, True)
    """
    from tasks.rerank import maxsim_exhaustive, set_blocks

    n_sets, n_groups = len(offsets) - 1, len(group_offsets) - 1
    if not prunable(tokens, row_scale) or n_groups <= k or k < 1 or not queries:
        return maxsim_exhaustive(queries, tokens, offsets, row_scale=row_scale)
    quantized = [quantize_query(q) for q in queries]
    codes = np.ascontiguousarray(np.concatenate([c for c, _, _ in quantized]))
    q_offsets = np.concatenate([[0], np.cumsum([len(q) for q in queries])])
    approx = np.full((len(queries), n_sets), -np.inf, dtype=np.float32)
    rows = int8_block_rows(len(codes)) if block_values is None else max(1, block_values // max(1, len(codes)))
    for lo, hi, nonempty in set_blocks(offsets, rows):
        sim = int8_matmul(codes, tokens[lo:hi]).astype(np.float32)  # (all query tokens, rows): exact int32 values
        sim *= row_scale[lo:hi]
        maxima = np.maximum.reduceat(sim, offsets[nonempty] - lo, axis=1)  # (all query tokens, non-empty sets)
        for i, (_, scales, _) in enumerate(quantized):
            approx[i, nonempty] = scales @ maxima[q_offsets[i] : q_offsets[i + 1]]
    out = np.full_like(approx, -np.inf)
    for i, (query, (_, _, residuals)) in enumerate(zip(queries, quantized)):
        bound = float(residuals.sum()) + _ROUNDING_SLACK * len(residuals)
        group_best, _ = group_max(approx[i], group_offsets)
        kth = np.partition(group_best, n_groups - k)[n_groups - k]
        if not np.isfinite(kth):  # fewer than k groups hold a token: nothing to prune; blocked, like plain brute force
            out[i] = maxsim_exhaustive([query], tokens, offsets, row_scale=row_scale)[0]
            continue
        keep = np.flatnonzero(approx[i] >= kth - 2 * bound)
        out[i, keep] = maxsim_candidates(query, tokens, offsets, keep, None, row_scale)
    return out
