"""Stage 4: a FAISS inner-product index over the FDEs (row ``i`` is chunk ``i``).

FDEs are unnormalised and their inner product is the similarity estimate, so every index type here
uses METRIC_INNER_PRODUCT, never L2 or cosine.

* ``flat``: exact search; the default below 5,000 chunks.
* ``hnsw``: graph search, the default from 5,000 chunks, over 8-bit scalar-quantised vectors
  (``hnsw_storage="sq8"``; ``flat`` keeps float32, ``fp16`` halves them). At scifact's 9,907 chunks
  x 10,240 dims and 400 candidates, one thread (BENCHMARKS.md section 3,
  ``evaluation/benchmarks/hnsw_storage.py``): float32 storage at efSearch 256 took 8.3 ms and
  returned 96.7% of flat search's candidate documents; SQ8 takes 3.7 ms at 256 (96.7%) and 5.5 ms
  at 512 (99.3%), since a graph search is bound by reading the vectors it visits. SQ8 at efSearch
  512 is the default: a quarter of the memory, nearly flat's candidates, less time than before.
  efSearch bounds the candidates it can return well (FAISS does not raise it to k): at 64 it found
  only 85% of flat's top-200 documents.
* ``ivfpq``: inverted lists + product quantisation: ~20-30x less memory, fastest, lossy; it needs
  enough vectors to train (39 per list), so small corpora fall back to fewer lists.

With faiss-gpu and a visible GPU, flat and IVF-PQ indexes are searched on the GPU; the saved index
is always the CPU form so it opens anywhere.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

import faiss
import numpy as np

ANN_KINDS = ("auto", "flat", "hnsw", "ivfpq")
HNSW_STORAGES = {"flat": None, "fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}
AUTO_FLAT_LIMIT = 5_000


@dataclass(frozen=True)
class ANNConfig:
    """FAISS index choice and its knobs (search-time knobs can be changed when opening an index)."""

    kind: str = "auto"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 512
    hnsw_storage: str = "sq8"
    ivf_lists: int | None = None  # None: about 4 * sqrt(n), bounded by the training data
    pq_subquantizers: int = 64
    ivf_nprobe: int = 16

    def __post_init__(self) -> None:
        if self.kind not in ANN_KINDS:
            raise ValueError(f"ann kind must be one of {ANN_KINDS}, got {self.kind!r}")
        if self.hnsw_storage not in HNSW_STORAGES:
            raise ValueError(f"hnsw_storage must be one of {tuple(HNSW_STORAGES)}, got {self.hnsw_storage!r}")

    def to_dict(self) -> dict[str, Any]:
        # 'auto' resolves by a threshold of this module: record it, so that changing it changes the build key
        return {**asdict(self), "auto_flat_limit": AUTO_FLAT_LIMIT} if self.kind == "auto" else asdict(self)

    def resolved_kind(self, n: int) -> str:
        """The concrete index type for ``n`` vectors ('auto' picks flat for small corpora, else HNSW)."""
        if self.kind != "auto":
            return self.kind
        return "flat" if n < AUTO_FLAT_LIMIT else "hnsw"


def _ivf_lists(n: int, requested: int | None) -> int:
    lists = requested or int(4 * np.sqrt(n))
    # FAISS wants ~39 training points per centroid; never fewer than one list
    return max(1, min(lists, n // 39))


def _pq_subquantizers(dim: int, requested: int) -> int:
    m = min(requested, dim)
    while dim % m:
        m -= 1
    return m


@contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """Run the block with FAISS's OpenMP pool at ``n`` threads, then restore the previous count."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def build_ann(vectors: np.ndarray, config: ANNConfig, *, seed: int = 0) -> tuple[faiss.Index, dict[str, Any]]:
    """Build an inner-product FAISS index over ``vectors`` (float32, n x d); return it and its facts.

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    >>> index, facts = build_ann(x, ANNConfig(kind="flat"))
    >>> scores, ids = index.search(x[:1], 1)
    >>> int(ids[0, 0]) == int(np.argmax(x @ x[0])), facts["kind"]
    (True, 'flat')
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected an (n, dim) matrix of vectors, got shape {vectors.shape}")
    return build_ann_from_blocks(lambda: iter([vectors]), vectors.shape, config, seed=seed)


def build_ann_from_blocks(
    blocks: Callable[[], Iterable[np.ndarray]], shape: tuple[int, int], config: ANNConfig, *, seed: int = 0
) -> tuple[faiss.Index, dict[str, Any]]:
    """:func:`build_ann` over vectors that arrive in blocks, never all in memory at once.

    ``blocks()`` yields the ``shape[0]`` vectors in row order as (rows, ``shape[1]``) arrays; it is
    called again for each pass over them (an SQ8 HNSW reads the per-dimension ranges first, an IVF
    index its training sample), so memory stays near the index plus one block. The index equals
    the one built from the whole matrix: SQ8 trains on each dimension's minimum and maximum, which
    the two rows of those extremes give exactly, and IVF-PQ trains on at most 256 vectors per list,
    the sample FAISS itself would draw (here by ``seed``; all vectors below that).

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    >>> config = ANNConfig(kind="hnsw", hnsw_m=8)  # over SQ8 codes
    >>> whole, _ = build_ann(x, config)
    >>> blocked, facts = build_ann_from_blocks(lambda: (x[i : i + 64] for i in range(0, 300, 64)), x.shape, config)
    >>> codes = lambda index: faiss.vector_to_array(faiss.downcast_index(index.storage).codes)
    >>> facts["ntotal"], bool((codes(blocked) == codes(whole)).all())
    (300, True)
    """
    with faiss_threads(os.cpu_count() or 1):
        return _build_ann(blocks, shape, config, seed)


def _build_ann(blocks: Callable[[], Iterable[np.ndarray]], shape: tuple[int, int], config: ANNConfig, seed: int) -> tuple[faiss.Index, dict[str, Any]]:
    n, dim = shape
    if n == 0:
        raise ValueError("cannot build an ANN index over zero vectors")
    kind = config.resolved_kind(n)
    facts: dict[str, Any] = {"kind": kind, "dim": dim, "ntotal": n}
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        quantizer = HNSW_STORAGES[config.hnsw_storage]
        if quantizer is None:
            index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexHNSWSQ(dim, quantizer, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            if not index.is_trained:  # SQ8's per-dimension ranges; fp16 needs none
                index.train(_value_ranges(_checked(blocks(), shape)))
        index.hnsw.efConstruction = config.hnsw_ef_construction
        facts.update(m=config.hnsw_m, ef_construction=config.hnsw_ef_construction, storage=config.hnsw_storage)
    else:
        lists = _ivf_lists(n, config.ivf_lists)
        m = _pq_subquantizers(dim, config.pq_subquantizers)
        bits = 8 if n >= 256 * 39 else max(1, int(np.log2(max(2, n // 39))))
        index = faiss.index_factory(dim, f"IVF{lists},PQ{m}x{bits}", faiss.METRIC_INNER_PRODUCT)
        index.train(_sample_rows(_checked(blocks(), shape), n, min(n, _MAX_TRAIN_PER_LIST * lists), seed))
        facts.update(lists=lists, subquantizers=m, bits=bits)
    for batch in _add_batches(_checked(blocks(), shape), dim, _ADD_BATCH_BYTES):
        index.add(batch)
    configure_search(index, config)
    return index, facts


# FAISS's k-means samples at most this many training vectors per centroid (ClusteringParameters)
_MAX_TRAIN_PER_LIST = 256
# Vectors go to FAISS in batches of up to this many bytes, however small the blocks that arrive: an
# HNSW over scifact's 9,907 FDEs of 10,240 dims took 24.6-25.0 s added 1,600 at a time (a 64 MB
# Parquet batch), 17.3-18.2 s 6,500 at a time and 16.8-17.3 s all at once (same vectors, one run).
_ADD_BATCH_BYTES = 1 << 30


def _checked(blocks: Iterable[np.ndarray], shape: tuple[int, int]) -> Iterator[np.ndarray]:
    """The blocks as contiguous float32 of ``shape[1]`` columns; raises if they do not add up to ``shape[0]`` rows."""
    rows = 0
    for block in blocks:
        block = np.ascontiguousarray(block, dtype=np.float32)
        if block.ndim != 2 or block.shape[1] != shape[1]:
            raise ValueError(f"a block of vectors has shape {block.shape}, expected (rows, {shape[1]})")
        rows += len(block)
        if rows > shape[0]:
            raise ValueError(f"the blocks hold more than the {shape[0]} vectors announced")
        yield block
    if rows != shape[0]:
        raise ValueError(f"the blocks hold {rows} vectors, {shape[0]} announced")


def _add_batches(blocks: Iterable[np.ndarray], dim: int, max_bytes: int) -> Iterator[np.ndarray]:
    """The blocks' rows regrouped into batches of ``max_bytes`` (a block that size or larger passes as is).

    Batches are views of one reused buffer: each is valid until the next is asked for.

    Examples
    --------
    >>> blocks = [np.full((n, 2), n, dtype=np.float32) for n in (1, 2, 3, 9)]
    >>> [b[:, 0].tolist() for b in _add_batches(iter(blocks), 2, 4 * 2 * 4)]
    [[1.0, 2.0, 2.0, 3.0], [3.0, 3.0], [9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0]]
    """
    capacity = max(1, max_bytes // (4 * dim))
    buffer, filled = np.empty((0, dim), dtype=np.float32), 0
    for block in blocks:
        if len(block) >= capacity:
            if filled:
                yield buffer[:filled]
                filled = 0
            yield block
            continue
        if len(buffer) == 0:
            buffer = np.empty((capacity, dim), dtype=np.float32)
        taken = 0
        while taken < len(block):
            step = min(capacity - filled, len(block) - taken)
            buffer[filled : filled + step] = block[taken : taken + step]
            filled, taken = filled + step, taken + step
            if filled == capacity:
                yield buffer
                filled = 0
    if filled:
        yield buffer[:filled]


def _value_ranges(blocks: Iterable[np.ndarray]) -> np.ndarray:
    """Two rows: every dimension's minimum and maximum over all blocks."""
    low = high = None
    for block in blocks:
        if len(block):
            low = block.min(axis=0) if low is None else np.minimum(low, block.min(axis=0))
            high = block.max(axis=0) if high is None else np.maximum(high, block.max(axis=0))
    return np.stack([low, high])


def _sample_rows(blocks: Iterable[np.ndarray], n: int, size: int, seed: int) -> np.ndarray:
    """``size`` of the ``n`` rows (all of them when ``size >= n``), chosen by ``seed``, in row order."""
    if size >= n:
        return np.concatenate(list(blocks))
    wanted = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    picked, start = [], 0
    for block in blocks:
        lo, hi = np.searchsorted(wanted, [start, start + len(block)])
        picked.append(block[wanted[lo:hi] - start])
        start += len(block)
    return np.concatenate(picked)


def configure_search(index: faiss.Index, config: ANNConfig) -> None:
    """Apply the search-time knobs (efSearch, nprobe) of ``config`` to a built or loaded index."""
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = config.hnsw_ef_search
    ivf = faiss.try_extract_index_ivf(index) if not isinstance(index, (faiss.IndexFlat, faiss.IndexHNSW)) else None
    if ivf is not None:
        ivf.nprobe = min(config.ivf_nprobe, ivf.nlist)


def to_device(index: faiss.Index) -> faiss.Index:
    """Move a flat or IVF index to the GPU(s) when faiss-gpu sees one; HNSW stays on the CPU."""
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpus > 0 and not isinstance(index, faiss.IndexHNSW):
        return faiss.index_cpu_to_all_gpus(index)
    return index


def search_ann(index: faiss.Index, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n`` (scores, row ids) per query; missing results (fewer rows than n) are dropped by callers (id -1).

    Examples
    --------
    >>> x = np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32)
    >>> index, _ = build_ann(x, ANNConfig(kind="flat"))
    >>> scores, ids = search_ann(index, x[:2], 5)
    >>> bool((ids == faiss.IndexFlatIP.search(index, x[:2], 5)[1]).all()), scores.shape
    (True, (2, 5))
    """
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k = min(n, index.ntotal)
    if type(index) is faiss.IndexFlatIP and k > 0:
        return _flat_search_blas(index, q, k)
    return index.search(q, k)


def _flat_search_blas(index: faiss.IndexFlatIP, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products over a CPU flat index's own vectors with one BLAS product.

    For a few queries FAISS's flat search keeps a k-heap per query while scanning; a BLAS product
    plus a partial sort over the same (zero-copy) vectors was 1.7x faster for one query over scifact's
    9,907 x 10,240 FDEs at k=400 (evaluation/benchmarks, BENCHMARKS.md). Ties go to the lower id.
    """
    vectors = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
    scores = queries @ vectors.T  # (nq, ntotal)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < index.ntotal else np.tile(np.arange(index.ntotal), (len(queries), 1))
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -top_scores), axis=1)
    return np.take_along_axis(top_scores, order, axis=1), np.take_along_axis(top, order, axis=1).astype(np.int64)
