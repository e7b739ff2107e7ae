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
from typing import Any, Iterator

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
    with faiss_threads(os.cpu_count() or 1):
        return _build_ann(np.ascontiguousarray(vectors, dtype=np.float32), config)


def _build_ann(vectors: np.ndarray, config: ANNConfig) -> tuple[faiss.Index, dict[str, Any]]:
    n, dim = vectors.shape
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
            index.train(vectors)  # per-dimension ranges; the ANN is rebuilt from every FDE on each version
        index.hnsw.efConstruction = config.hnsw_ef_construction
        facts.update(m=config.hnsw_m, ef_construction=config.hnsw_ef_construction, storage=config.hnsw_storage)
    else:
        lists = _ivf_lists(n, config.ivf_lists)
        m = _pq_subquantizers(dim, config.pq_subquantizers)
        bits = 8 if n >= 256 * 39 else max(1, int(np.log2(max(2, n // 39))))
        index = faiss.index_factory(dim, f"IVF{lists},PQ{m}x{bits}", faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        facts.update(lists=lists, subquantizers=m, bits=bits)
    index.add(vectors)
    configure_search(index, config)
    return index, facts


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
