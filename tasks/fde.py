"""Stage 3: MUVERA Fixed Dimensional Encodings (Dhulipala et al. 2024, arXiv 2405.19504).

An FDE maps a set of token vectors to one vector such that ``<FDE_q(Q), FDE_d(D)>`` approximates the
Chamfer / MaxSim similarity ``sum_{q in Q} max_{d in D} <q, d>``, so a single-vector inner-product
index (FAISS) can find candidates for exact MaxSim re-ranking. Per repetition ``r``:

1. SimHash: ``k_sim`` Gaussian hyperplanes split space into ``B = 2**k_sim`` partitions; a token's
   partition is its sign bits ``x @ G > 0`` read as a binary number (bit ``j`` weighs ``2**j``). The
   reference C++ (google/graph-mining, ``sketching/point_cloud/fixed_dimensional_encoding.cc``)
   numbers partitions by a Gray code instead: that is a fixed permutation of the partitions applied
   to queries and documents alike, so inner products are identical.
2. Inner projection ``psi(x) = S^T x`` with ``S`` (dim x d_proj) of i.i.d. +-1 entries scaled by
   ``1/sqrt(d_proj)``, so ``E <psi(x), psi(y)> = <x, y>``. This is the paper's dense version; the C++
   reference uses a count-sketch (one unscaled +-1 per input coordinate) instead. ``projection_dim``
   None means the identity (``d_proj = dim``).
3. Aggregation per partition: queries **sum** their projected tokens, documents **average** them.
   With ``fill_empty_partitions`` a document's empty partition takes the projected token whose
   SimHash bits are nearest in Hamming distance to the partition's bits (ties: the earliest token
   of the set, like the reference's strict ``<`` scan). Queries never fill. An empty set encodes to
   all zeros.

Repetition ``r`` draws ``G`` then ``S`` from ``np.random.default_rng(seed + r)``. Blocks are laid out
``[rep][partition][d_proj]``, so the dimension is ``R * 2**k_sim * d_proj``. An optional final
count-sketch (seeded ``seed + FINAL_SEED_OFFSET``; the reference reuses ``seed``) maps that to
``final_dim``; it is linear and preserves inner products in expectation.

Everything works on a whole batch of token sets in CSR form (a flat token matrix and offsets);
the only Python loops run over repetitions and over memory-bounded chunks of sets. Documents add
their raw tokens to their partitions first (a numba kernel, ``tasks.fde_cells``) and project the
per-partition sums after, which the linearity of step 2 allows: ~3x faster than projecting every
token at the defaults (1.0 s instead of 3.1 s per 300k tokens on one core). Computation is in
float32 (numpy float16 matrix products are extremely slow on CPU).

The defaults (R=20, k_sim=4, d_proj=32: 10,240 dims, no final projection) match the paper's
10,240-dim budget; the README discusses how they were chosen for this project.
"""
from __future__ import annotations

import contextlib
import functools
import numbers
import os
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

if TYPE_CHECKING:
    from storage.shards import StageRun
    from tasks.fde_cells import CellSums

# The final count-sketch draws from default_rng(seed + FINAL_SEED_OFFSET): far away from the
# per-repetition seeds seed + r (r < R), so the sketch is independent of the SimHash matrices.
FINAL_SEED_OFFSET = 1_000_003
# Upper bound on the floats of the large per-chunk temporaries (token copies, projected tokens,
# token x partition distances, pre-sketch FDEs): bounds memory, not speed.
_BATCH_FLOATS = 1 << 24
# Rows per matrix product of the inner projection (see _project_rows): a few hundred cells per
# repetition and batch, so padding wastes little.
_PROJECTION_ROWS = 64
MAX_SIMHASH_BITS = 16


@dataclass(frozen=True)
class FDEConfig:
    """MUVERA settings. ``output_dim = final_dim or repetitions * 2**simhash_bits * d_proj``.

    Parameters
    ----------
    dim
        Token embedding dimension ``d``.
    repetitions
        Number of independent repetitions ``R``.
    simhash_bits
        SimHash hyperplanes ``k_sim`` per repetition (0..16); ``2**k_sim`` partitions.
    projection_dim
        Inner projection dimension ``d_proj``; None keeps the tokens as they are (``d_proj = dim``).
    final_dim
        If set, a final count-sketch projects the FDE to this many dimensions.
    fill_empty_partitions
        Documents only: fill an empty partition with the Hamming-nearest token.
    seed
        Non-negative base seed of every random draw.

    Examples
    --------
    >>> FDEConfig(dim=384).output_dim
    10240
    >>> FDEConfig(dim=384, repetitions=40, simhash_bits=6, projection_dim=16, final_dim=10240).output_dim
    10240
    >>> FDEConfig.from_dict(FDEConfig(dim=8, projection_dim=None).to_dict()) == FDEConfig(dim=8, projection_dim=None)
    True
    >>> FDEConfig(dim=8, simhash_bits=17)
    Traceback (most recent call last):
    ...
    ValueError: FDEConfig.simhash_bits must be an integer in 0..16, got 17
    """

    dim: int
    repetitions: int = 20
    simhash_bits: int = 4
    projection_dim: int | None = 32
    final_dim: int | None = None
    fill_empty_partitions: bool = True
    seed: int = 42

    def __post_init__(self) -> None:
        checks = {
            "dim": (1, None, False),
            "repetitions": (1, None, False),
            "simhash_bits": (0, MAX_SIMHASH_BITS, False),
            "projection_dim": (1, None, True),
            "final_dim": (1, None, True),
            "seed": (0, None, False),  # default_rng rejects negative seeds
        }
        for name, (low, high, optional) in checks.items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            if high is not None:
                what = f"an integer in {low}..{high}"
            else:
                what = "a positive integer" if low == 1 else f"an integer >= {low}"
            if optional:
                what += " or None"
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise ValueError(f"FDEConfig.{name} must be {what}, got {value!r}")
            if value < low or (high is not None and value > high):
                raise ValueError(f"FDEConfig.{name} must be {what}, got {value!r}")
            # normalise numpy integers so to_dict() stays JSON-able and equal configs hash equally
            object.__setattr__(self, name, int(value))
        if not isinstance(self.fill_empty_partitions, (bool, np.bool_)):
            raise ValueError(f"FDEConfig.fill_empty_partitions must be a bool, got {self.fill_empty_partitions!r}")
        object.__setattr__(self, "fill_empty_partitions", bool(self.fill_empty_partitions))

    @property
    def partitions(self) -> int:
        """Number of SimHash partitions ``B = 2**simhash_bits``."""
        return 1 << self.simhash_bits

    @property
    def block_dim(self) -> int:
        """Dimension of one partition's block (``projection_dim``, or ``dim`` without projection)."""
        return self.projection_dim if self.projection_dim is not None else self.dim

    @property
    def full_dim(self) -> int:
        """Dimension before the optional final projection: ``R * B * block_dim``."""
        return self.repetitions * self.partitions * self.block_dim

    @property
    def output_dim(self) -> int:
        """Dimension of the encodings returned."""
        return self.final_dim if self.final_dim is not None else self.full_dim

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (for the manifest and cache keys)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FDEConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (a manifest of another version)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"FDEConfig.from_dict: unknown field(s) {unknown}")
        if "dim" not in data:
            raise ValueError("FDEConfig.from_dict: missing field 'dim'")
        return cls(**data)


# --------------------------------------------------------------------------------------------
# Random matrices (drawn once per setting, cached)
# --------------------------------------------------------------------------------------------


def simhash_matrices(config: FDEConfig) -> tuple[tuple[np.ndarray, np.ndarray | None], ...]:
    """Per repetition, the SimHash matrix ``G`` and the inner projection ``S`` (or None).

    ``G`` is float32 (dim, simhash_bits) standard Gaussian; ``S`` is float32 (dim, projection_dim)
    with entries ``+-1/sqrt(projection_dim)``, None when ``projection_dim`` is None. Repetition ``r``
    draws ``G`` then ``S`` from ``np.random.default_rng(config.seed + r)``. The arrays are cached and
    read-only.

    Examples
    --------
    >>> mats = simhash_matrices(FDEConfig(dim=6, repetitions=2, simhash_bits=3, projection_dim=4))
    >>> len(mats), mats[0][0].shape, mats[0][1].shape, sorted(set(mats[0][1].ravel().tolist()))
    (2, (6, 3), (6, 4), [-0.5, 0.5])
    """
    # keyed on the fields that matter only, so configs differing in final_dim/fill share the draw
    return _draw_matrices(config.dim, config.repetitions, config.simhash_bits, config.projection_dim, config.seed)


@functools.lru_cache(maxsize=16)
def _draw_matrices(dim: int, repetitions: int, bits: int, proj: int | None, seed: int) -> tuple[tuple[np.ndarray, np.ndarray | None], ...]:
    out = []
    for rep in range(repetitions):
        rng = np.random.default_rng(seed + rep)
        gaussian = rng.standard_normal((dim, bits)).astype(np.float32)
        gaussian.flags.writeable = False
        projection = None
        if proj is not None:
            signs = rng.integers(0, 2, size=(dim, proj)).astype(np.float32) * 2 - 1
            projection = signs / np.float32(np.sqrt(proj))
            projection.flags.writeable = False
        out.append((gaussian, projection))
    return tuple(out)


@functools.lru_cache(maxsize=16)
def _stacked_matrices(config: FDEConfig) -> tuple[np.ndarray, ...]:
    """Per repetition ``[G | S]`` (dim, k_sim + d_proj), or ``G`` alone without projection."""
    stacked = []
    for gaussian, projection in simhash_matrices(config):
        matrix = gaussian if projection is None else np.ascontiguousarray(np.concatenate([gaussian, projection], axis=1))
        matrix.flags.writeable = False
        stacked.append(matrix)
    return tuple(stacked)


@functools.lru_cache(maxsize=16)
def _all_reps_matrix(config: FDEConfig) -> np.ndarray:
    """Every repetition's ``[G | S]`` side by side: one wide product instead of R skinny ones.

    A (tokens x dim) @ (dim x R(k_sim + d_proj)) product ran 2.4x faster than R products of
    (dim x (k_sim + d_proj)) here (BLAS is far from peak on skinny matrices), and the FDE is the
    largest cost of indexing after the encoder.
    """
    matrix = np.ascontiguousarray(np.concatenate(_stacked_matrices(config), axis=1))
    matrix.flags.writeable = False
    return matrix


@functools.lru_cache(maxsize=16)
def _gaussians_matrix(config: FDEConfig) -> np.ndarray:
    """Every repetition's SimHash matrix ``G`` side by side: (dim, R * k_sim)."""
    matrix = np.ascontiguousarray(np.concatenate([gaussian for gaussian, _ in simhash_matrices(config)], axis=1))
    matrix.flags.writeable = False
    return matrix


def count_sketch(config: FDEConfig) -> tuple[np.ndarray, np.ndarray]:
    """The final projection: bucket ``h(i)`` in ``[0, final_dim)`` and sign ``s(i)`` of every input coordinate.

    ``out[:, h(i)] += s(i) * fde[:, i]`` for ``i < full_dim``; drawn (buckets, then signs) from
    ``np.random.default_rng(config.seed + FINAL_SEED_OFFSET)``. Raises ValueError without ``final_dim``.

    Examples
    --------
    >>> buckets, signs = count_sketch(FDEConfig(dim=4, repetitions=1, simhash_bits=1, projection_dim=None, final_dim=3))
    >>> buckets.shape, bool(buckets.max() < 3), set(signs.tolist()) <= {-1.0, 1.0}
    ((8,), True, True)
    """
    if config.final_dim is None:
        raise ValueError("FDEConfig.final_dim is None: there is no final projection")
    buckets, signs, _, _, _ = _count_sketch_plan(config.full_dim, config.final_dim, config.seed)
    return buckets, signs


@functools.lru_cache(maxsize=16)
def _count_sketch_plan(full_dim: int, final_dim: int, seed: int) -> tuple[np.ndarray, ...]:
    """Count-sketch plus its vectorised form: coordinates sorted by bucket, segment starts, targets."""
    rng = np.random.default_rng(seed + FINAL_SEED_OFFSET)
    buckets = rng.integers(0, final_dim, size=full_dim)
    signs = (rng.integers(0, 2, size=full_dim) * 2 - 1).astype(np.float32)
    order = np.argsort(buckets, kind="stable")
    sorted_buckets = buckets[order]
    starts = np.flatnonzero(np.r_[True, sorted_buckets[1:] != sorted_buckets[:-1]])
    plan = (buckets, signs, order, starts, sorted_buckets[starts])
    for array in plan:
        array.flags.writeable = False
    return plan


def _apply_count_sketch(full: np.ndarray, config: FDEConfig) -> np.ndarray:
    """(n, full_dim) -> (n, final_dim): gather columns grouped by bucket, then sum each group."""
    _, signs, order, starts, targets = _count_sketch_plan(config.full_dim, config.final_dim, config.seed)
    out = np.zeros((full.shape[0], config.final_dim), dtype=np.float32)
    if full.shape[0]:
        out[:, targets] = np.add.reduceat(full[:, order] * signs[order], starts, axis=1)
    return out


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _popcount(partitions: int) -> np.ndarray:
    """Number of set bits of 0..partitions-1 (Hamming distance of two ids = popcount of their XOR)."""
    counts = np.zeros(partitions, dtype=np.int64)
    for bit in range(max(partitions.bit_length() - 1, 0)):  # loop over bits, not values
        counts += (np.arange(partitions) >> bit) & 1
    return counts


def _validate(tokens: Any, offsets: Any, config: FDEConfig) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(tokens)
    offsets = np.asarray(offsets)
    if tokens.ndim != 2 or tokens.shape[1] != config.dim:
        raise ValueError(f"tokens must have shape (n_tokens, dim={config.dim}), got {tokens.shape}")
    if not (np.issubdtype(tokens.dtype, np.floating) or np.issubdtype(tokens.dtype, np.integer)):
        raise ValueError(f"tokens must be a real numeric array (float16/float32), got dtype {tokens.dtype}")
    if offsets.ndim != 1 or len(offsets) < 1:
        raise ValueError(f"offsets must be a 1-D array of length n_sets + 1 >= 1, got shape {offsets.shape}")
    if not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"offsets must be integers, got dtype {offsets.dtype}")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != len(tokens):
        raise ValueError(f"offsets must start at 0 and end at the token count {len(tokens)}, got {offsets[0]}..{offsets[-1]}")
    if np.any(np.diff(offsets) < 0):
        raise ValueError("offsets must be non-decreasing (CSR: set i is tokens[offsets[i]:offsets[i+1]])")
    return tokens, offsets


def _chunks(offsets: np.ndarray, max_tokens: int, max_sets: int) -> Iterator[tuple[int, int]]:
    """Consecutive ranges ``[first, last)`` of sets with at most ``max_tokens`` tokens (or one set) and ``max_sets`` sets."""
    n_sets = len(offsets) - 1
    first = 0
    while first < n_sets:
        last = int(np.searchsorted(offsets, offsets[first] + max_tokens, side="right")) - 1
        last = min(max(last, first + 1), first + max_sets, n_sets)
        yield first, last
        first = last


def _encode_chunk(x: np.ndarray, offsets: np.ndarray, config: FDEConfig, is_query: bool, out: np.ndarray, scratch: CellSums | None) -> CellSums | None:
    """Write the pre-sketch FDEs of ``x[offsets[i]:offsets[i+1]]`` into zeroed ``out`` (n_sets, R, B, block).

    ``x`` is float32 with ``offsets[0] == 0``. Each token is added to its (set, repetition,
    partition) cell *before* the inner projection (``tasks.fde_cells``), then each repetition
    projects its occupied cells at once: the projection is linear, so this equals averaging (or
    summing) projected tokens, at a fraction of the flops. Queries with a projection take
    :func:`_sum_query_cells` instead. Returns the cell scratch space for the next chunk.
    """
    n_tok = len(x)
    if n_tok == 0:
        return scratch
    n_sets = len(offsets) - 1
    if is_query and config.projection_dim is not None:
        set_of_token = np.repeat(np.arange(n_sets, dtype=np.int64), np.diff(offsets))
        _sum_query_cells(x @ _all_reps_matrix(config), set_of_token, config, out)
        return scratch
    from tasks.fde_cells import sum_cells  # numba: imported and compiled on the first document batch only

    parts = config.partitions
    partition = _partitions(x, config)
    cells = sum_cells(x, offsets, partition, parts, reuse=scratch)
    fill = not is_query and config.fill_empty_partitions and config.simhash_bits > 0
    if fill:
        lengths = np.diff(offsets)
        nonempty = np.flatnonzero(lengths > 0)
        # int32 halves the (n_tok, B) temporary when distance * n_tok + index cannot overflow it
        rank_type = np.int32 if (config.simhash_bits + 1) * n_tok < 2**31 else np.int64
        popcount = _popcount(parts).astype(rank_type)
        rank_scale = rank_type(n_tok)
        token_index = np.arange(n_tok, dtype=rank_type)[:, None]
    for rep, (_, projection) in enumerate(simhash_matrices(config)):
        n_cells = int(cells.n_cells[rep])
        sets, cell_parts = cells.cell_set[rep, :n_cells], cells.cell_part[rep, :n_cells]
        sums = cells.sums[rep, :n_cells]
        values = _project_rows(sums, projection) if projection is not None else sums.copy()
        if not is_query:
            values /= cells.counts[rep, :n_cells, None].astype(np.float32)
        out[sets, rep, cell_parts] = values
        if not fill:
            continue
        occupied = np.zeros((n_sets, parts), dtype=bool)
        occupied[sets, cell_parts] = True
        empty_sets, empty_parts = np.nonzero(~occupied[nonempty])  # empty cells of non-empty sets
        if len(empty_sets) == 0:
            continue
        # Hamming distance of every token's bits to every partition's bits, with the token index as a
        # tie-breaker in the low digits, so a min over a set's rows picks the earliest nearest token.
        ranked = popcount[partition[:, rep, None] ^ np.arange(parts)] * rank_scale + token_index  # (n_tok, B)
        # reduceat over the starts of non-empty sets: each segment ends where the next non-empty set begins
        nearest = np.minimum.reduceat(ranked, offsets[nonempty], axis=0) % n_tok  # (len(nonempty), B)
        rows = x[nearest[empty_sets, empty_parts]]
        out[nonempty[empty_sets], rep, empty_parts] = _project_rows(rows, projection) if projection is not None else rows
    return cells


def _project_rows(rows: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """``rows @ projection`` in products of exactly ``_PROJECTION_ROWS`` rows (the last one zero-padded).

    A BLAS picks its kernel by the shape of the product (OpenBLAS has a separate small-matrix
    kernel, with another order of additions), so a cell projected in a batch of 40 cells could
    differ in the last bit from the same cell in a batch of 400. One shape for every product keeps a
    set's FDE independent of the batch it is encoded in: the FDEs computed while encoding equal those
    of the FDE stage bit for bit.
    """
    n, dim = rows.shape
    out = np.empty((n, projection.shape[1]), np.float32)
    whole = n - n % _PROJECTION_ROWS
    if whole:
        np.matmul(rows[:whole].reshape(-1, _PROJECTION_ROWS, dim), projection, out=out[:whole].reshape(-1, _PROJECTION_ROWS, projection.shape[1]))
    if whole < n:
        padded = np.zeros((_PROJECTION_ROWS, dim), np.float32)
        padded[: n - whole] = rows[whole:]
        out[whole:] = (padded @ projection)[: n - whole]
    return out


def _partitions(x: np.ndarray, config: FDEConfig) -> np.ndarray:
    """int64 (n_tok, R): every token's SimHash partition in every repetition (bit ``j`` weighs ``2**j``)."""
    reps, bits = config.repetitions, config.simhash_bits
    if bits == 0:
        return np.zeros((len(x), reps), dtype=np.int64)
    # fixed-shape products here too: a token near a hyperplane must fall on the same side in any batch
    signs = _project_rows(x, _gaussians_matrix(config)).reshape(len(x), reps, bits) > 0
    return signs.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))


def _sum_query_cells(products: np.ndarray, set_of_token: np.ndarray, config: FDEConfig, out: np.ndarray) -> None:
    """Queries: add every repetition's projected tokens to their (set, rep, partition) cells of ``out`` at once.

    A query needs neither averages nor filling, so the per-repetition sort + ``reduceat`` of the
    document path is one scatter-add over all repetitions here (torch's ``index_add_``; the sums
    differ from ``reduceat``'s by float32 rounding, ~4e-6 at 384 dims, as only the order of the
    additions changes). For a 22-token query it took the FDE from 0.68 to 0.24 ms on one core (the
    matrix product is most of what is left), on the path of every search. ``out`` is C-contiguous
    (a fresh array or a row range of one); the flat view below is made by setting ``shape``, which
    raises instead of silently copying (and losing the sums) if it ever were not.
    """
    import torch

    reps, bits, parts, block = config.repetitions, config.simhash_bits, config.partitions, config.block_dim
    by_rep = products.reshape(len(products), reps, bits + block)
    partition = (by_rep[:, :, :bits] > 0).astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))
    cell = (set_of_token[:, None] * reps + np.arange(reps)) * parts + partition  # (n_tok, R), row of out
    projected = np.ascontiguousarray(by_rep[:, :, bits:]).reshape(-1, block)
    cells = out.view()
    cells.shape = (-1, block)
    torch.from_numpy(cells).index_add_(0, torch.from_numpy(cell.ravel()), torch.from_numpy(projected))


def _encode(tokens: Any, offsets: Any, config: FDEConfig, is_query: bool) -> np.ndarray:
    tokens, offsets = _validate(tokens, offsets, config)
    n_sets = len(offsets) - 1
    shape = (config.repetitions, config.partitions, config.block_dim)
    out = np.zeros((n_sets, config.output_dim), dtype=np.float32)
    if is_query and config.projection_dim is not None:  # every repetition's SimHash values and projection per token
        per_token = config.repetitions * (config.simhash_bits + config.block_dim)
    else:  # the cell sums: at worst one raw-token cell per token and repetition
        per_token = config.repetitions * (config.dim + config.simhash_bits)
    max_tokens = max(1, _BATCH_FLOATS // max(config.dim, per_token, config.partitions))
    # the pre-sketch FDEs of a chunk are a temporary only when a final projection follows
    max_sets = max(1, _BATCH_FLOATS // config.full_dim) if config.final_dim is not None else n_sets
    scratch = None  # the cell sums' arrays, reused from chunk to chunk
    for first, last in _chunks(offsets, max_tokens, max_sets):
        lo, hi = offsets[first], offsets[last]
        x = np.ascontiguousarray(tokens[lo:hi], dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"tokens must be finite: a NaN or inf is in rows {lo}..{hi - 1}")
        if config.final_dim is None:
            full = out[first:last].reshape(last - first, *shape)  # a view: write in place
            scratch = _encode_chunk(x, offsets[first : last + 1] - lo, config, is_query, full, scratch)
        else:
            full = np.zeros((last - first, *shape), dtype=np.float32)
            scratch = _encode_chunk(x, offsets[first : last + 1] - lo, config, is_query, full, scratch)
            out[first:last] = _apply_count_sketch(full.reshape(last - first, -1), config)
    return out


def encode_documents(tokens: np.ndarray, offsets: np.ndarray, config: FDEConfig) -> np.ndarray:
    """Document FDEs (average per partition, empty partitions filled) of a CSR batch of token sets.

    Parameters
    ----------
    tokens
        (total_tokens, dim) token vectors, float16 or float32 (computed in float32).
    offsets
        (n_sets + 1,) integer CSR offsets: set ``i`` is ``tokens[offsets[i]:offsets[i+1]]``. An
        empty set gives an all-zero FDE.
    config
        FDE settings; ``config.dim`` must equal ``tokens.shape[1]``.

    Returns
    -------
    numpy.ndarray
        float32 (n_sets, config.output_dim).

    Raises
    ------
    ValueError
        If the shapes, dtypes or offsets are invalid, or a token is not finite.

    Examples
    --------
    One partition, one repetition, no projection: a document's FDE is the mean of its tokens.

    >>> cfg = FDEConfig(dim=2, repetitions=1, simhash_bits=0, projection_dim=None)
    >>> encode_documents(np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]), np.array([0, 2, 3]), cfg)
    array([[0.5, 0.5],
           [2. , 2. ]], dtype=float32)
    >>> encode_documents(np.zeros((5, 384), np.float16), np.array([0, 3, 3, 5]), FDEConfig(dim=384)).shape
    (3, 10240)
    """
    return _encode(tokens, offsets, config, is_query=False)


def warm_up(config: FDEConfig) -> None:
    """Import and load the compiled FDE kernel and build ``config``'s matrices, on a tiny batch.

    The first document batch otherwise pays for it (~0.9 s: importing numba, then loading the
    kernel from its disk cache) on the thread that runs beside the encoder, where every core is
    busy; the index flow calls this while the first segment is chunked, which leaves a core idle.
    """
    encode_documents(np.zeros((1, config.dim), np.float16), np.array([0, 1]), config)


def encode_queries(tokens: np.ndarray, offsets: np.ndarray, config: FDEConfig) -> np.ndarray:
    """Query FDEs (sum per partition, never filled) of a CSR batch of token sets.

    Parameters and return value as in :func:`encode_documents`.

    Examples
    --------
    >>> cfg = FDEConfig(dim=2, repetitions=1, simhash_bits=0, projection_dim=None)
    >>> encode_queries(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 2]), cfg)
    array([[1., 1.]], dtype=float32)
    """
    return _encode(tokens, offsets, config, is_query=True)


def encode_query(tokens: np.ndarray, config: FDEConfig) -> np.ndarray:
    """The FDE of one query given as an (n, dim) token matrix: float32 (config.output_dim,).

    Examples
    --------
    >>> cfg = FDEConfig(dim=3, repetitions=2, simhash_bits=2, projection_dim=None)
    >>> q = encode_query(np.eye(3, dtype=np.float32), cfg)
    >>> q.shape, q.dtype, float(q.sum())  # every token lands in exactly one block per repetition
    ((24,), dtype('float32'), 6.0)
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (n_tokens, dim={config.dim}), got {tokens.shape}")
    return encode_queries(tokens, np.array([0, len(tokens)]), config)[0]


class BackgroundDocumentFDEs:
    """Document FDEs computed on one worker thread while the caller runs the encoder.

    The fp32 forward pass keeps the CPU busy only ~85% of the time (Python between kernels,
    single-threaded ops), so computing each batch's FDEs on a second thread as soon as its tokens
    exist hides most of the FDE stage, and spares reading the token shard back. The bf16 forward
    pass leaves almost no idle core, and a thread competing with torch's pool delays every one of
    its parallel regions (they wait for their slowest thread). So on Linux the worker runs at the
    lowest priority (nice 19): it takes the cores' idle moments, and whatever is still queued when
    the encoder is done, :meth:`result` computes on the caller's thread beside it. Alternated A/B on
    300 scifact documents at bf16, 6 pairs: the encode stage 11.94 s -> 11.74 s (median; the bare
    encoder loop 11.40 s), from the lower priority alone (result() did not share work then;
    BENCHMARKS.md section 1). The result is bit-identical to :func:`encode_documents` on the stored
    (float16) tokens: each set's FDE depends on its own rows only, and the tokens are rounded to
    float16 before encoding, as stored.

    Examples
    --------
    >>> cfg = FDEConfig(dim=2, repetitions=1, simhash_bits=0, projection_dim=None)
    >>> with BackgroundDocumentFDEs(cfg, n_sets=2) as fdes:
    ...     fdes.submit([1], [np.array([[1.0, 0.0], [0.0, 1.0]], np.float16)])
    ...     fdes.submit([0], [np.array([[2.0, 2.0]], np.float16)])
    ...     fdes.result()
    array([[2. , 2. ],
           [0.5, 0.5]], dtype=float32)
    """

    def __init__(self, config: FDEConfig, n_sets: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.config = config
        self.out = np.zeros((n_sets, config.output_dim), dtype=np.float32)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fde", initializer=_lowest_thread_priority)
        self._queued: list[tuple[Any, np.ndarray, list[np.ndarray]]] = []

    def submit(self, set_indices: Any, token_sets: list[np.ndarray]) -> None:
        """Queue the FDEs of ``token_sets`` (float16 (n_i, dim) matrices) for rows ``set_indices``."""
        indices = np.asarray(set_indices, dtype=np.int64)
        self._queued.append((self._pool.submit(self._encode, indices, token_sets), indices, token_sets))

    def _encode(self, set_indices: np.ndarray, token_sets: list[np.ndarray]) -> None:
        offsets = np.zeros(len(token_sets) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in token_sets], out=offsets[1:])
        flat = np.concatenate(token_sets) if token_sets else np.zeros((0, self.config.dim), np.float16)
        self.out[set_indices] = encode_documents(flat, offsets, self.config)

    def result(self) -> np.ndarray:
        """Finish every queued batch (re-raising a failure of any of them); return the (n_sets, output_dim) FDEs.

        The caller takes the batches the worker has not started from the back of the queue while
        the worker goes on from the front, at normal priority: the two share what is left, and a
        busy machine cannot starve the worker's share. (Walking from the front, the caller would
        wait on the worker's batch, and the worker would claim the next one before the caller could:
        the caller never got one.)
        """
        started = []
        for future, indices, token_sets in reversed(self._queued):
            if future.cancel():
                self._encode(indices, token_sets)
            else:
                started.append(future)
        for future in reversed(started):
            future.result()
        return self.out

    def __enter__(self) -> "BackgroundDocumentFDEs":
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _lowest_thread_priority() -> None:
    """Give the calling thread nice 19 (Linux, where a thread's priority is its own); elsewhere nothing."""
    import sys
    import threading

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


@task(name="fde", cache_policy=NO_CACHE)
def fde_task(tokens_path: str, out_path: str, config: FDEConfig) -> StageRun:
    """Prefect task: document FDEs of one shard's token store into ``out_path`` (skipped if there)."""
    from storage.index_files import fde_table, read_token_store
    from storage.segments import read_checked
    from storage.shards import run_cached, timed_stage

    def compute():
        # only a resumed run gets here (the encode stage writes both files), with tokens from disk:
        # their page CRCs are checked as they are read, or FDEs of damaged tokens would stay cached
        store = read_checked(tokens_path, lambda: read_token_store(tokens_path, verify=True))
        return fde_table(encode_documents(store.vectors, store.offsets, config))

    return timed_stage(lambda: run_cached(out_path, compute, compression="none"))  # random-looking float32: zstd gains nothing
