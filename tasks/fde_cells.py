"""The FDE's aggregation kernel: add every raw token to its (set, repetition, partition) cell.

The inner projection of an FDE is linear, so a partition's average (or sum) of *projected* tokens
is the projection of the average of its *raw* tokens. Aggregating first and projecting the cells
afterwards replaces the product of every token with every repetition's projection
(``tokens x dim x R * d_proj``) by one product per occupied cell, and a cell holds on average
``tokens / partitions`` tokens of a set (~11 for a 180-token scifact chunk and 16 partitions). What
is left is the scatter-add itself, ``R * tokens * dim`` additions, which no BLAS call expresses:
scipy's sparse-dense product and torch's ``index_add_`` ran it at ~1.3-1.6 G additions/s on one
core here, no faster than the dense product it replaces, while this numba loop runs ~6.4 G/s (the
tokens of one set stay in cache across its R repetitions).

Only occupied cells are stored, numbered per repetition in order of (set, first token to reach the
cell), so the scratch space is bounded by the token count whatever the number of partitions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np


def _jit(function):
    """``numba.njit`` that releases the GIL (the FDE runs on a thread beside the encoder), cached on disk.

    numba caches beside the source or in the user's cache folder; where neither is writable (a
    read-only install and home) it refuses ``cache=True``, and the kernel is compiled per process
    instead (~0.4 s) rather than failing.
    """
    try:
        return numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:
        return numba.njit(nogil=True)(function)


@_jit
def _sum_cells_kernel(x, offsets, partition, slot, sums, counts, cell_set, cell_part, n_cells):  # pragma: no cover - compiled
    reps = partition.shape[1]
    dim = x.shape[1]
    for s in range(len(offsets) - 1):
        lo = offsets[s]
        hi = offsets[s + 1]
        for r in range(reps):
            for t in range(lo, hi):
                p = partition[t, r]
                c = slot[p]
                if c < 0:  # first token of this set in partition p: open a zeroed cell
                    c = n_cells[r]
                    n_cells[r] += 1
                    slot[p] = c
                    cell_set[r, c] = s
                    cell_part[r, c] = p
                    counts[r, c] = 0
                    for d in range(dim):
                        sums[r, c, d] = 0.0
                counts[r, c] += 1
                for d in range(dim):
                    sums[r, c, d] += x[t, d]
            for t in range(lo, hi):  # reset only the slots this set touched: O(tokens), not O(partitions)
                slot[partition[t, r]] = -1


@dataclass
class CellSums:
    """Per repetition ``r``, the first ``n_cells[r]`` rows of each array describe its occupied cells.

    ``sums[r, c]`` is the float32 sum of the raw tokens of set ``cell_set[r, c]`` in partition
    ``cell_part[r, c]``, and ``counts[r, c]`` their number (>= 1). Rows past ``n_cells[r]`` are
    scratch left from earlier calls.
    """

    sums: np.ndarray
    counts: np.ndarray
    cell_set: np.ndarray
    cell_part: np.ndarray
    n_cells: np.ndarray

    def capacity_for(self, reps: int, cells: int, dim: int) -> bool:
        return self.sums.shape[0] == reps and self.sums.shape[1] >= cells and self.sums.shape[2] == dim


def sum_cells(x: np.ndarray, offsets: np.ndarray, partition: np.ndarray, partitions: int, reuse: CellSums | None = None) -> CellSums:
    """Sum each token of a CSR batch of sets into its (set, repetition, partition) cell.

    Parameters
    ----------
    x
        float32 (n_tokens, dim) tokens, C-contiguous.
    offsets
        int64 (n_sets + 1,) CSR offsets into ``x``, starting at 0.
    partition
        int64 (n_tokens, R): the partition of token ``t`` in repetition ``r``, in ``0..partitions-1``.
    partitions
        The number of partitions.
    reuse
        The result of an earlier call, whose arrays are reused when large enough: a fresh
        allocation per batch would fault in tens of MB of pages every time.

    Returns
    -------
    CellSums

    Examples
    --------
    Three tokens of one set, two repetitions, two partitions:

    >>> x = np.array([[1, 0], [0, 1], [2, 2]], np.float32)
    >>> partition = np.array([[0, 1], [1, 1], [0, 0]])
    >>> cells = sum_cells(x, np.array([0, 3]), partition, partitions=2)
    >>> cells.n_cells.tolist()
    [2, 2]
    >>> cells.sums[0, :2].tolist(), cells.counts[0, :2].tolist(), cells.cell_part[0, :2].tolist()
    ([[3.0, 2.0], [0.0, 1.0]], [2, 1], [0, 1])
    >>> cells.sums[1, :2].tolist(), cells.counts[1, :2].tolist(), cells.cell_part[1, :2].tolist()
    ([[1.0, 1.0], [2.0, 2.0]], [2, 1], [1, 0])
    """
    n_tokens, dim = x.shape
    reps = partition.shape[1]
    n_sets = len(offsets) - 1
    # a repetition has at most one cell per token, and at most `partitions` per set
    cells = max(1, min(n_tokens, n_sets * partitions))
    if reuse is None or not reuse.capacity_for(reps, cells, dim):
        reuse = CellSums(
            sums=np.empty((reps, cells, dim), np.float32),
            counts=np.empty((reps, cells), np.int64),
            cell_set=np.empty((reps, cells), np.int64),
            cell_part=np.empty((reps, cells), np.int64),
            n_cells=np.zeros(reps, np.int64),
        )
    reuse.n_cells[:] = 0
    slot = np.full(partitions, -1, np.int64)
    _sum_cells_kernel(x, offsets, partition, slot, reuse.sums, reuse.counts, reuse.cell_set, reuse.cell_part, reuse.n_cells)
    return reuse
