"""The MUVERA paper's Table 1 on our data: candidates needed for 80 / 90 / 95% recall of the exact
MaxSim top-10, FDE + ANN against the token heuristic, and each method's end-to-end latency at 90%.

Run (heavy: take the machine's lock)::

    flock /tmp/lateflow-heavy.lock .venv/bin/python -m evaluation.benchmarks.candidates_table \
        ../shared/datasets/scifact --index idx/scifact --cache-dir /work/scratch/candidates-table \
        --out reports/benchmarks/candidates-table-scifact.md

Definitions (the report repeats them):

* **Ground truth** of a query: the exact MaxSim top-10 *documents* (``LateIndex.rank_exhaustive``).
* **Candidates are documents** for every method. FDE + ANN ranks chunks by the inner product of
  their FDE with the query's FDE (exact flat search); the chunk ranking is deduplicated to documents
  in rank order, and recall@N is the share of the exact top-10 among the first N documents, averaged
  over queries. ``N@90%`` is the smallest N whose mean recall reaches 90%.
* **Token heuristic**: every query token retrieves its k' nearest document tokens (inner product)
  from an index over all document tokens; the candidates are those tokens' documents, deduplicated.
  Its candidate count varies per query, so its row reports, for the smallest k' whose mean recall
  reaches the target, the *mean* number of candidate documents per query at that k' (the median
  and p95 are in the JSON). Candidates are counted with exact kNN (FAISS brute-force inner
  product, the kernel of IndexFlatIP, run on the index's token matrix without copying it), and
  latency is measured with a realistic ANN token index (IVF-Flat by default), at the k' that
  index itself needs for 90%.
* **End-to-end latency** per query, single-threaded torch and FAISS as ``LateIndex.open`` sets them,
  query encoding included. FDE: encode + query FDE + flat FAISS search of the chunk FDEs +
  deduplication to the first N documents + the engine's exact MaxSim rerank of every chunk of those
  documents (``LateIndex.score_documents``) + top-10. Heuristic: encode + one ANN search for all
  query tokens + deduplication + the same rerank.

* **fde-rerank as served**: the same index folder opened again as a user opens it (its own ANN,
  e.g. HNSW over SQ8 codes; only the retrieved chunks reranked; the int8 prefilter), ``rank`` at
  several candidate-chunk counts; recall there is the share of the exact top-10 in the *returned*
  top 10, and the smallest count reaching 90% is timed end to end (:func:`served_fde`).

Settings are tuned (the best = fewest candidate documents at 90% recall) on the tuning split (a
fixed subset of scifact train by default) and reported on the report split. The index default and
the best setting are also searched through compressed FAISS indexes (``--fde-compressed``, SQ8 and
PQ with 8-dim sub-vectors by default, the paper's PQ-256-8) and measured the same way, since the flat float32 scan is the FDE path's main cost. Document FDEs, ground
truth, exact token hits and the token ANN index are cached under ``--cache-dir`` per index version.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from evaluation.benchmarks import print_and_save
from flows.settings import apply_quiet_defaults

apply_quiet_defaults()

TARGETS = (0.80, 0.90, 0.95)
LATENCY_TARGET = 0.90
TOP_K = 10
# tuning targets of GitHub issue 7: FDE + rerank at <= 1/5 of the heuristic's latency, >= 2x fewer candidates
MAX_LATENCY_RATIO = 0.2
MIN_CANDIDATES_RATIO = 2.0
# (R, k_sim, d_proj[:final][+nofill][@seed]); see parse_setting. The index default comes first.
DEFAULT_SETTINGS = (
    # the paper's filled document FDEs: 10,240 dims, then smaller and larger
    "20,4,32",
    "20,5,16",
    "20,3,64",
    "10,4,64",
    "20,5,8",
    "40,4,32",
    "40,5,16",
    "40,6,16",
    "80,4,32",
    # final count-sketch projections
    "40,6,16:10240",
    "80,4,32:10240",
    "20,4,32:2048",
    # empty document partitions left empty
    "20,4,32+nofill",
    "20,5,16+nofill",
    "20,3,64+nofill",
    "20,6,8+nofill",
    "40,5,8+nofill",
    "10,6,16+nofill",
    "40,4,32+nofill",
    "20,6,16+nofill",
    "40,6,8+nofill",
    "40,6,16+nofill",
    "60,6,16+nofill",
    "80,4,32+nofill",
    "40,6,16:10240+nofill",
    "80,4,32:10240+nofill",
    # another seed: the noise of N@90%
    "20,4,32@43",
    "20,4,32+nofill@43",
    "40,6,16@43",
    "40,6,16+nofill@43",
)
RECALL_POINTS = (10, 20, 50, 100, 200, 500, 1000)
FLAT = "Flat"  # the engine's FDE index: exact inner-product search
WARMUP_QUERIES = 5
# candidate chunk counts tried for fde-rerank as a default index serves it (see served_fde)
SERVED_CANDIDATES = (25, 50, 75, 100, 150, 200, 300, 400, 600)


# --------------------------------------------------------------------------------------------
# Pure functions: settings, rankings, recall curves, token hits (unit-tested)
# --------------------------------------------------------------------------------------------


def parse_setting(spec: str, dim: int):
    """An FDE setting from ``"R,k_sim,d_proj"`` with optional ``:final_dim``, ``+nofill``, ``@seed``.

    ``d_proj`` may be ``none`` (no inner projection).

    Examples
    --------
    >>> c = parse_setting("40,6,16:10240", 384)
    >>> (c.repetitions, c.simhash_bits, c.projection_dim, c.final_dim, c.output_dim)
    (40, 6, 16, 10240, 10240)
    >>> c = parse_setting("20,4,none+nofill@7", 8)
    >>> (c.projection_dim, c.fill_empty_partitions, c.seed, c.output_dim)
    (None, False, 7, 2560)
    """
    from tasks.fde import FDEConfig

    rest, seed = spec, 42
    if "@" in rest:
        rest, seed_text = rest.split("@", 1)
        seed = int(seed_text)
    fill = not rest.endswith("+nofill")
    rest = rest.removesuffix("+nofill")
    rest, final = (rest.split(":", 1) + [None])[:2]
    parts = rest.split(",")
    if len(parts) != 3:
        raise ValueError(f"an FDE setting is 'R,k_sim,d_proj[:final][+nofill][@seed]', got {spec!r}")
    proj = None if parts[2].strip().lower() == "none" else int(parts[2])
    return FDEConfig(
        dim=dim, repetitions=int(parts[0]), simhash_bits=int(parts[1]), projection_dim=proj,
        final_dim=int(final) if final else None, fill_empty_partitions=fill, seed=seed,
    )


def dedupe_in_order(ids: np.ndarray) -> np.ndarray:
    """The distinct non-negative ids of a best-first ranking, each at its first position.

    Examples
    --------
    >>> dedupe_in_order(np.array([3, 1, 3, -1, 2, 1])).tolist()
    [3, 1, 2]
    """
    ids = np.asarray(ids)
    ids = ids[ids >= 0]
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


def first_positions(ranking: np.ndarray, truth: np.ndarray, max_n: int) -> np.ndarray:
    """0-based positions, within the first ``max_n`` entries of ``ranking``, where truth ids first appear.

    Duplicates in the ranking (a document named by several chunks) count once, at their first place.

    Examples
    --------
    >>> first_positions(np.array([5, 7, 5, 9, 2]), np.array([9, 5, 4]), 5).tolist()
    [0, 3]
    """
    values, first = np.unique(np.asarray(ranking)[:max_n], return_index=True)
    return np.sort(first[np.isin(values, truth) & (values >= 0)])


def recall_curve(rankings: Sequence[np.ndarray], truths: Sequence[np.ndarray], max_n: int) -> np.ndarray:
    """Mean recall of the truth sets among the first N entries, for N = 1..max_n (element N-1).

    Examples
    --------
    >>> recall_curve([np.array([1, 2, 3]), np.array([9, 8, 7])], [np.array([2, 3]), np.array([7, 6])], 3).tolist()
    [0.0, 0.25, 0.75]
    """
    curve = np.zeros(max_n, dtype=np.float64)
    for ranking, truth in zip(rankings, truths):
        hits = np.bincount(first_positions(ranking, truth, max_n), minlength=max_n)
        curve += np.cumsum(hits) / max(1, len(truth))
    return curve / max(1, len(rankings))


def smallest_n(curve: np.ndarray, target: float) -> int | None:
    """Smallest N (1-based) with ``curve[N-1] >= target``; None if the curve never gets there.

    A tolerance of 1e-9 keeps e.g. 9 hits out of 10 at exactly 0.9.

    Examples
    --------
    >>> smallest_n(np.array([0.5, 0.8, 0.9, 0.95]), 0.9), smallest_n(np.array([0.5, 0.6]), 0.9)
    (3, None)
    """
    reached = np.flatnonzero(np.asarray(curve) >= target - 1e-9)
    return int(reached[0]) + 1 if len(reached) else None


def token_documents(offsets: np.ndarray, chunk_doc: np.ndarray) -> np.ndarray:
    """Document index of every row of a CSR token store (chunk ``i`` owns ``offsets[i]:offsets[i+1]``).

    Examples
    --------
    >>> token_documents(np.array([0, 2, 2, 5]), np.array([0, 0, 1])).tolist()
    [0, 0, 1, 1, 1]
    """
    return np.repeat(np.asarray(chunk_doc, dtype=np.int32), np.diff(offsets))


def token_hits_to_documents(hit_rows: np.ndarray, token_doc: np.ndarray) -> np.ndarray:
    """The distinct documents (sorted) of the token rows retrieved for all query tokens; -1 = no hit.

    Examples
    --------
    >>> token_hits_to_documents(np.array([[4, 0, -1], [1, 3, 4]]), np.array([0, 0, 1, 2, 2])).tolist()
    [0, 2]
    """
    rows = np.asarray(hit_rows).ravel()
    return np.unique(token_doc[rows[rows >= 0]])


def first_hit_ranks(hit_docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a query's (tokens x k) hit documents: each distinct document and the smallest column
    (0-based) at which any query token retrieves it, i.e. the heuristic keeps it for every k' > rank.

    Examples
    --------
    >>> docs, ranks = first_hit_ranks(np.array([[2, 5, 2], [5, -1, 7]]))
    >>> docs.tolist(), ranks.tolist()
    ([2, 5, 7], [0, 0, 2])
    """
    hit_docs = np.asarray(hit_docs)
    cols = np.broadcast_to(np.arange(hit_docs.shape[1]), hit_docs.shape)
    valid = hit_docs >= 0
    docs, ranks = hit_docs[valid], cols[valid]
    order = np.lexsort((ranks, docs))  # by document, then by rank
    docs, ranks = docs[order], ranks[order]
    first = np.r_[True, docs[1:] != docs[:-1]] if len(docs) else np.zeros(0, dtype=bool)
    return docs[first], ranks[first]


def heuristic_curves(hit_docs: Sequence[np.ndarray], truths: Sequence[np.ndarray], k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query and k' = 1..k_max: recall of the truth among the deduplicated candidates, and their count.

    ``hit_docs[q]`` is query q's (tokens x >= k_max) hit documents (-1 = no hit). Returns two
    (queries, k_max) arrays, column k'-1 for k'.

    Examples
    --------
    >>> recall, count = heuristic_curves([np.array([[2, 5, 2], [5, -1, 7]])], [np.array([7, 9])], 3)
    >>> recall.tolist(), count.tolist()
    ([[0.0, 0.0, 0.5]], [[2, 2, 3]])
    """
    recall = np.zeros((len(hit_docs), k_max))
    count = np.zeros((len(hit_docs), k_max), dtype=np.int64)
    for q, (hits, truth) in enumerate(zip(hit_docs, truths)):
        docs, ranks = first_hit_ranks(np.asarray(hits)[:, :k_max])
        count[q] = np.cumsum(np.bincount(ranks, minlength=k_max))
        found = np.bincount(ranks[np.isin(docs, truth)], minlength=k_max)
        recall[q] = np.cumsum(found) / max(1, len(truth))
    return recall, count


def heuristic_points(recall: np.ndarray, count: np.ndarray, targets: Sequence[float] = TARGETS) -> dict[str, dict[str, Any] | None]:
    """For each target: the smallest k' whose mean recall reaches it and its candidate counts.

    Examples
    --------
    >>> pts = heuristic_points(np.array([[0.5, 1.0], [0.5, 0.9]]), np.array([[3, 6], [2, 4]]), (0.9, 0.99))
    >>> pts["0.9"]["k"], pts["0.9"]["candidates_mean"], pts["0.99"]
    (2, 5.0, None)
    """
    mean = recall.mean(axis=0)
    out: dict[str, dict[str, Any] | None] = {}
    for target in targets:
        k = smallest_n(mean, target)
        if k is None:
            out[str(target)] = None
            continue
        counts = count[:, k - 1]
        out[str(target)] = {
            "k": k,
            "recall": round(float(mean[k - 1]), 4),
            "candidates_mean": round(float(counts.mean()), 1),
            "candidates_p50": float(np.median(counts)),
            "candidates_p95": float(np.percentile(counts, 95)),
        }
    return out


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50 and p95 of latency samples (ms), rounded.

    Examples
    --------
    >>> percentiles([1.0, 2.0, 3.0])
    {'p50': 2.0, 'p95': 2.9}
    """
    return {"p50": round(float(np.percentile(samples_ms, 50)), 2), "p95": round(float(np.percentile(samples_ms, 95)), 2)}


# --------------------------------------------------------------------------------------------
# Caching: arrays keyed by index version and inputs, written atomically
# --------------------------------------------------------------------------------------------


def cache_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (file names of cached arrays)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_arrays(path: Path, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load the .npz at ``path``, or compute the arrays, write them atomically and return them."""
    from storage.atomic import atomic_path

    if path.is_file():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    arrays = compute()
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return arrays


def cached_matrix(path: Path, compute: Callable[[], np.ndarray]) -> Path:
    """Compute a big matrix once and keep it as .npy; return the path (read it with :func:`read_rows`)."""
    from storage.atomic import atomic_path

    if not path.is_file():
        matrix = compute()
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, matrix)
        del matrix
    return path


def read_rows(path: Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows ``start:stop`` of a 2-D .npy file, read with plain file reads.

    Not a memory map: mapped pages would count in this process's resident memory on top of the
    copies FAISS makes (1.6 GB per 40,960-dim FDE matrix here).

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "m.npy"
    >>> np.save(path, np.arange(12, dtype=np.float32).reshape(4, 3))
    >>> read_rows(path, 1, 3).tolist()
    [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]
    """
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as handle:
        shape, fortran, dtype = readers[np.lib.format.read_magic(handle)](handle)
        if len(shape) != 2 or fortran:
            raise ValueError(f"{path}: expected a C-ordered 2-D array, got shape {shape}")
        stop = shape[0] if stop is None else min(stop, shape[0])
        handle.seek(start * shape[1] * dtype.itemsize, 1)
        return np.fromfile(handle, dtype=dtype, count=max(0, stop - start) * shape[1]).reshape(-1, shape[1])


def matrix_rows(path: Path) -> int:
    """Number of rows of a 2-D .npy file (header only)."""
    return int(np.load(path, mmap_mode="r").shape[0])


# --------------------------------------------------------------------------------------------
# Queries and ground truth
# --------------------------------------------------------------------------------------------


@dataclass
class QuerySet:
    """A split's queries, encoded as the engine encodes them, with their exact MaxSim top-10 documents."""

    label: str
    split: str
    qids: list[str]
    texts: list[str]
    encoded: list[Any]  # lateflow.engine.QueryTokens
    truths: list[np.ndarray]
    sampled_from: int


def open_index(path: str):
    """``LateIndex.open`` (1 torch + 1 FAISS thread) holding float32 tokens, as ``auto`` does here.

    The token store is opened as float16 (a view of Arrow's buffer), Arrow's freed pages are handed
    back, and only then widened to float32: on scifact that peaks at 4.8 GB instead of 8.2 GB, and
    settles at 3.6 GB instead of 5.0 GB (mimalloc keeps ~1.4 GB of freed read buffers otherwise).
    Searches then run exactly as on an index opened with ``token_memory="auto"``.
    """
    import pyarrow as pa

    from lateflow.engine import LateIndex

    index = LateIndex.open(path, token_memory="float16")
    pa.default_memory_pool().release_unused()
    index.tokens.vectors = index.tokens.vectors.astype(np.float32)
    pa.default_memory_pool().release_unused()
    return index


def exact_top_documents(index, encoded: Sequence[Any], k: int = TOP_K, batch: int = 32) -> list[np.ndarray]:
    """The exact MaxSim top-k documents of each query, brute force (batches bound the score matrix)."""
    out = []
    for start in range(0, len(encoded), batch):
        for ranked in index.rank_exhaustive(list(encoded[start : start + batch]), k):
            out.append(np.array([d for d, _, _ in ranked], dtype=np.int64))
    return out


def load_queries(index, dataset_dir: str, split: str, max_queries: int | None, cache: Path) -> QuerySet:
    """A split's (subsampled) queries, encoded one at a time, with their cached ground truth."""
    from evaluation.datasets import load_dataset, subsample

    full = load_dataset(dataset_dir, split)
    dataset = subsample(full, max_queries)
    qids = list(dataset.queries)
    texts = [dataset.queries[q] for q in qids]
    encoded = [index.encode(t) for t in texts]
    path = cache / f"truth-{split}-{cache_key(qids, TOP_K)}.npz"
    truth = cached_arrays(path, lambda: {"top": np.stack(exact_top_documents(index, encoded))})["top"]
    label = f"{dataset.name} {split} ({len(qids)}" + (f" of {len(full.queries)}" if len(qids) < len(full.queries) else "") + " queries)"
    return QuerySet(label, split, qids, texts, encoded, list(truth), len(full.queries))


# --------------------------------------------------------------------------------------------
# FDE + ANN candidates
# --------------------------------------------------------------------------------------------


def document_fdes(index, config, cache: Path) -> Path:
    """Chunk FDEs of the index's token store under ``config``: the path of their cached .npy."""
    from tasks.fde import encode_documents

    path = cache / f"fde-{cache_key(config.to_dict())}.npy"
    return cached_matrix(path, lambda: encode_documents(index.tokens.vectors, index.tokens.offsets, config))


def query_fdes(queries: QuerySet, config) -> np.ndarray:
    """Query FDEs of every query in one batched call (the same values as the engine's per-query ones)."""
    from tasks.fde import encode_queries

    vectors = [q.vectors for q in queries.encoded]
    offsets = np.zeros(len(vectors) + 1, dtype=np.int64)
    np.cumsum([len(v) for v in vectors], out=offsets[1:])
    return encode_queries(np.concatenate(vectors), offsets, config)


def fde_chunk_rankings(fde_path: Path, query_fde: np.ndarray, factory: str, batch: int = 64) -> np.ndarray:
    """Every chunk, ranked per query by FDE inner product: exact (``Flat``) or through a compressed FAISS index."""
    import faiss

    from tasks.ann import faiss_threads

    if factory == FLAT:
        base = read_rows(fde_path)
        search = lambda q: faiss.knn(q, base, len(base), metric=faiss.METRIC_INNER_PRODUCT)[1]  # noqa: E731
    else:
        compressed = load_fde_index(fde_path, factory)
        search = lambda q: compressed.search(q, compressed.ntotal)[1]  # noqa: E731
    out = np.empty((len(query_fde), matrix_rows(fde_path)), dtype=np.int32)
    with faiss_threads(2):
        for start in range(0, len(query_fde), batch):
            out[start : start + batch] = search(np.ascontiguousarray(query_fde[start : start + batch]))
    return out


def fde_factory(factory: str, dim: int) -> str:
    """A FAISS factory string for FDEs of ``dim`` dims; ``{d8}`` stands for dim / 8 (PQ with 8-dim sub-vectors).

    Examples
    --------
    >>> fde_factory("PQ{d8}x8", 10240), fde_factory("SQ8", 10240)
    ('PQ1280x8', 'SQ8')
    """
    return factory.format(d8=dim // 8)


def load_fde_index(fde_path: Path, factory: str):
    """A FAISS inner-product index over cached chunk FDEs: ``Flat`` (what the engine builds) or e.g. ``SQ8``.

    A flat index is filled in slices (no second full copy); others are trained on all the FDEs and
    cached beside them (PQ training takes a minute).
    """
    import faiss

    from tasks.ann import faiss_threads

    n = matrix_rows(fde_path)
    first = read_rows(fde_path, 0, 1024)
    index = faiss.index_factory(first.shape[1], fde_factory(factory, first.shape[1]), faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        path = fde_path.with_name(f"{fde_path.stem}-{cache_key(factory)}.faiss")
        if path.is_file():
            return faiss.read_index(str(path))
        everything = read_rows(fde_path)
        if hasattr(index, "pq"):
            # 9,907 chunks are just short of FAISS's 39 points per centroid: k-means is fine, silence
            # its warning (printed once per sub-quantizer, i.e. thousands of times)
            index.pq.cp.min_points_per_centroid = 1
        with faiss_threads(2):
            index.train(everything)
            index.add(everything)
        faiss.write_index(index, str(path))
        return index
    with faiss_threads(2):
        index.add(first)
        for start in range(1024, n, 1024):
            index.add(read_rows(fde_path, start, start + 1024))
    return index


def fde_recall(chunk_rankings: np.ndarray, chunk_doc: np.ndarray, truths: Sequence[np.ndarray], n_docs: int) -> dict[str, np.ndarray]:
    """Recall curves of the exact top-10 over candidate documents (deduplicated) and over chunk depth."""
    doc_rankings = chunk_doc[chunk_rankings]  # (queries, chunks): documents, duplicates included
    return {
        "docs": recall_curve([dedupe_in_order(r) for r in doc_rankings], truths, n_docs),
        "chunks": recall_curve(list(doc_rankings), truths, chunk_rankings.shape[1]),
    }


def summarize_curve(curve: np.ndarray, chunk_curve: np.ndarray | None = None) -> dict[str, Any]:
    """N at each target, and recall at a few fixed N (and the chunk depth at each target)."""
    out: dict[str, Any] = {"n": {str(t): smallest_n(curve, t) for t in TARGETS}}
    out["recall_at"] = {str(n): round(float(curve[n - 1]), 4) for n in RECALL_POINTS if n <= len(curve)}
    if chunk_curve is not None:
        out["chunks"] = {str(t): smallest_n(chunk_curve, t) for t in TARGETS}
    return out


def fde_setting_results(index, config, factory: str, queries: QuerySet, cache: Path) -> dict[str, Any]:
    """Recall curves of one FDE setting and FAISS index type on one query set, summarised (the full doc curve kept for transfer checks)."""
    rankings = fde_chunk_rankings(document_fdes(index, config, cache), query_fdes(queries, config), factory)
    curves = fde_recall(rankings, index.chunk_doc, queries.truths, len(index.doc_ids))
    return {**summarize_curve(curves["docs"], curves["chunks"]), "curve": curves["docs"]}


# --------------------------------------------------------------------------------------------
# Token heuristic: exact kNN for counting, an ANN token index for latency
# --------------------------------------------------------------------------------------------


def exact_token_hits(index, queries: QuerySet, k_max: int, token_doc: np.ndarray, cache: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per query, the documents and the token rows of each query token's k_max nearest document tokens (exact kNN)."""
    import faiss

    from tasks.ann import faiss_threads

    def compute() -> dict[str, np.ndarray]:
        stacked = np.concatenate([q.vectors for q in queries.encoded]).astype(np.float32)
        with faiss_threads(2):
            # faiss.knn is IndexFlatIP's brute-force kernel, without copying the 2.7 GB token matrix
            _, rows = faiss.knn(stacked, index.tokens.vectors, k_max, metric=faiss.METRIC_INNER_PRODUCT)
        return {"rows": rows.astype(np.int64)}

    path = cache / f"token-knn-{cache_key(queries.qids, k_max)}.npz"
    rows = cached_arrays(path, compute)["rows"]
    return split_by_query(np.where(rows >= 0, token_doc[rows], -1), queries), split_by_query(rows, queries)


def split_by_query(matrix: np.ndarray, queries: QuerySet) -> list[np.ndarray]:
    """Rows of a stacked (all query tokens x k) matrix, split back per query."""
    bounds = np.cumsum([len(q.vectors) for q in queries.encoded])[:-1]
    return np.split(matrix, bounds)


def build_token_ann(vectors: np.ndarray, factory: str, train_size: int, cache: Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A FAISS inner-product ANN index over every document token (cached file); and its build facts."""
    import faiss

    from tasks.ann import faiss_threads

    path = cache / f"token-ann-{cache_key(factory, train_size, seed)}.faiss"
    facts_path = path.with_suffix(".json")
    if path.is_file() and facts_path.is_file():
        return faiss.read_index(str(path)), json.loads(facts_path.read_text())
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    started = time.perf_counter()
    with faiss_threads(2):
        if not index.is_trained:
            sample = np.random.default_rng(seed).choice(len(vectors), min(train_size, len(vectors)), replace=False)
            index.train(np.ascontiguousarray(vectors[np.sort(sample)], dtype=np.float32))
        for start in range(0, len(vectors), 1 << 18):  # add in slices: no second full float32 copy
            index.add(np.ascontiguousarray(vectors[start : start + (1 << 18)], dtype=np.float32))
    seconds = time.perf_counter() - started
    faiss.write_index(index, str(path))
    facts = {"factory": factory, "vectors": int(index.ntotal), "train_size": min(train_size, len(vectors)), "build_seconds_2_threads": round(seconds, 1),
             "bytes": path.stat().st_size}
    facts_path.write_text(json.dumps(facts))
    return index, facts


def set_search_param(index, name: str, value: int) -> None:
    """Set a FAISS search-time parameter (``nprobe`` for IVF, ``efSearch`` for HNSW)."""
    import faiss

    faiss.ParameterSpace().set_index_parameter(index, name, value)


def search_param_name(factory: str) -> str:
    """The knob that trades an ANN token index's speed for recall.

    Examples
    --------
    >>> search_param_name("IVF4096,Flat"), search_param_name("HNSW32")
    ('nprobe', 'efSearch')
    """
    return "efSearch" if factory.upper().startswith("HNSW") else "nprobe"


def ann_token_hits(token_index, queries: QuerySet, k_max: int) -> np.ndarray:
    """Token rows retrieved by the ANN index for all query tokens of all queries (both cores)."""
    from tasks.ann import faiss_threads

    stacked = np.ascontiguousarray(np.concatenate([q.vectors for q in queries.encoded]), dtype=np.float32)
    with faiss_threads(2):
        _, rows = token_index.search(stacked, k_max)
    return rows


def token_overlap(ann_rows: np.ndarray, exact_rows: np.ndarray, k: int) -> float:
    """Mean share of each query token's exact top-k tokens that the ANN also returns in its top-k.

    Examples
    --------
    >>> token_overlap(np.array([[1, 2, 9], [4, 5, 6]]), np.array([[2, 1, 3], [6, 7, 4]]), 2)
    0.5
    """
    shares = [len(np.intersect1d(a[:k], e[:k])) / k for a, e in zip(ann_rows, exact_rows)]
    return float(np.mean(shares)) if shares else 0.0


def heuristic_results(hit_docs: list[np.ndarray], queries: QuerySet, k_max: int) -> dict[str, Any]:
    """The token heuristic's points at each target and its mean recall per k' (for transfer checks)."""
    recall, count = heuristic_curves(hit_docs, queries.truths, k_max)
    return {"points": heuristic_points(recall, count), "mean_recall": recall.mean(axis=0), "mean_candidates": count.mean(axis=0)}


# --------------------------------------------------------------------------------------------
# End-to-end latency (single-threaded, query encoding included)
# --------------------------------------------------------------------------------------------


def fde_candidates(index, fde_config, flat, query, n_docs: int) -> np.ndarray:
    """The first ``n_docs`` documents of the FDE chunk ranking, as the engine finds them.

    The flat search costs about the same for any depth much below the chunk count, so it asks for
    4x as many chunks as documents (scifact averages 1.9 chunks per document) and, like the engine,
    widens 4x in the rare case that names too few documents.
    """
    from tasks.ann import search_ann
    from tasks.fde import encode_query

    fde = encode_query(query.vectors, fde_config)[None, :]
    depth = min(4 * n_docs, flat.ntotal)
    while True:
        _, rows = search_ann(flat, fde, depth)
        docs = dedupe_in_order(index.chunk_doc[rows[0][rows[0] >= 0]])
        if len(docs) >= n_docs or depth >= flat.ntotal:
            return docs[:n_docs]
        depth = min(4 * depth, flat.ntotal)


def rerank_top(index, query, docs: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """The engine's exact MaxSim rerank of the candidates' chunks; the top-k documents."""
    scores, _ = index.score_documents(query, docs)
    return docs[np.argsort(-scores, kind="stable")[:k]]


def time_queries(texts: Sequence[str], index, candidates: Callable[[Any], np.ndarray]) -> dict[str, Any]:
    """Per query: encode, candidates, rerank, each timed; after a few warm-up queries."""
    for text in texts[:WARMUP_QUERIES]:
        query = index.encode(text)
        rerank_top(index, query, candidates(query))
    stages: dict[str, list[float]] = {"encode": [], "candidates": [], "rerank": [], "total": []}
    n_docs = []
    for text in texts:
        t0 = time.perf_counter()
        query = index.encode(text)
        t1 = time.perf_counter()
        docs = candidates(query)
        t2 = time.perf_counter()
        rerank_top(index, query, docs)
        t3 = time.perf_counter()
        for name, ms in zip(stages, ((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t3 - t0) * 1e3)):
            stages[name].append(ms)
        n_docs.append(len(docs))
    return {
        "total_ms": percentiles(stages["total"]),
        "stage_p50_ms": {name: round(float(np.median(v)), 2) for name, v in stages.items() if name != "total"},
        "reranked_docs_mean": round(float(np.mean(n_docs)), 1),
    }


def fde_latency(index, config, factory: str, queries: QuerySet, n_docs: int, cache: Path) -> dict[str, Any]:
    """End-to-end latency of FDE + FAISS search (flat unless ``factory`` says otherwise) + rerank of ``n_docs`` documents."""
    fde_index = load_fde_index(document_fdes(index, config, cache), factory)
    try:
        return time_queries(queries.texts, index, lambda q: fde_candidates(index, config, fde_index, q, n_docs))
    finally:
        fde_index.reset()


def heuristic_latency(index, token_index, token_doc: np.ndarray, queries: QuerySet, k: int) -> dict[str, Any]:
    """End-to-end latency of the token heuristic: one ANN search for all query tokens, dedupe, rerank."""

    def candidates(query) -> np.ndarray:
        _, rows = token_index.search(np.ascontiguousarray(query.vectors, dtype=np.float32), k)
        return token_hits_to_documents(rows, token_doc)

    return time_queries(queries.texts, index, candidates)


def top_k_recall(tops: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> float:
    """Mean share of each query's truth documents found in its returned top documents.

    Examples
    --------
    >>> top_k_recall([np.array([1, 2, 3]), np.array([4])], [np.array([3, 9]), np.array([4])])
    0.75
    """
    return float(np.mean([len(set(top.tolist()) & set(truth.tolist())) / len(truth) for top, truth in zip(tops, truths)]))


def smallest_count(recall_by_count: dict[int, float], target: float) -> int | None:
    """The smallest count whose recall reaches ``target`` (9 of 10 hits count as 90% despite float noise).

    Examples
    --------
    >>> smallest_count({100: 0.85, 50: 0.7, 200: 0.9 - 1e-12, 400: 0.97}, 0.9)
    200
    >>> smallest_count({100: 0.5}, 0.9) is None
    True
    """
    return min((count for count, recall in recall_by_count.items() if recall >= target - 1e-9), default=None)


def open_served(path: str):
    """The index folder opened as a user opens it (``LateIndex.open`` defaults: one query thread, its own store codec)."""
    from lateflow.engine import LateIndex

    return LateIndex.open(path)


def served_fde(served, queries: QuerySet, grid: Sequence[int] = SERVED_CANDIDATES) -> dict[str, Any]:
    """fde-rerank exactly as a default index serves it, at the candidate count that reaches 90% recall.

    The rows above time FDE candidates through the exact flat search of every chunk FDE and rerank
    every chunk of the candidate documents, so that each setting is measured alike; a default index
    serves a query differently (its own ANN, HNSW over SQ8 codes from 5,000 chunks; only the
    retrieved chunks reranked; the int8 prefilter over an int8 store held as int8). ``served`` is
    the index folder opened again as a user opens it (:func:`open_served`), and
    ``rank(query, 10, candidates=c)`` is run for every ``c`` of ``grid`` on the report split.
    Recall is the stricter, final one: the share of the exact top-10 in the *returned* top 10 (the
    rows above count it among the candidates, before any rerank). The smallest ``c`` reaching 90%,
    and the engine's default count, are then timed end to end, query encoding included.
    """
    from lateflow.engine import DEFAULT_CANDIDATES

    def top(query, count: int) -> np.ndarray:
        return np.array([doc for doc, _, _ in served.rank(query, TOP_K, candidates=count)], dtype=np.int64)

    recall = {}
    for count in grid:
        recall[int(count)] = round(top_k_recall([top(q, count) for q in queries.encoded], queries.truths), 4)
        print(f"served fde-rerank, {count} candidate chunks: recall of the exact top-10 {recall[count]:.3f}", flush=True)
    at_target = smallest_count(recall, LATENCY_TARGET)
    out: dict[str, Any] = {"ann": {k: served.ann_config.to_dict().get(k) for k in ("kind", "hnsw_ef_search", "hnsw_storage")},
                           "ann_kind_built": type(served.ann).__name__, "token_dtype": str(served.tokens.vectors.dtype),
                           "recall_by_candidates": recall, "candidates_at_90": at_target}
    for name, count in (("at_90", at_target), ("default", DEFAULT_CANDIDATES)):
        if count is not None:
            out[name] = {"candidates": int(count), "recall": recall.get(int(count)), **time_served(served, queries.texts, lambda q, c=int(count): top(q, c))}
    return out


def served_heuristic(served, token_index, queries: QuerySet, k: int) -> dict[str, Any]:
    """The token heuristic with the served rerank, for a like-for-like time against :func:`served_fde`.

    Candidates are the chunks of each query token's ``k`` nearest document tokens (``token_index``
    holds the store's rows in order), reranked as a default index reranks: only those chunks, with
    the int8 prefilter (``LateIndex._score`` with ``top=10``, what ``rank`` calls). Recall is again
    the share of the exact top-10 in the returned top 10.
    """
    lengths = np.diff(served.tokens.offsets)
    token_chunk = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)

    def top(query) -> np.ndarray:
        _, rows = token_index.search(np.ascontiguousarray(query.vectors, dtype=np.float32), k)
        chunks = np.unique(token_chunk[rows[rows >= 0]])
        docs = dedupe_in_order(served.chunk_doc[chunks])
        scores, _ = served._score(query, docs, chunks, top=TOP_K).best()
        return docs[np.argsort(-scores, kind="stable")[:TOP_K]]

    recall = round(top_k_recall([top(q) for q in queries.encoded], queries.truths), 4)
    return {"k": int(k), "recall": recall, **time_served(served, queries.texts, top)}


def time_served(index, texts: Sequence[str], search: Callable[[Any], Any]) -> dict[str, Any]:
    """Per query, after warm-up: encode, then ``search`` (candidates + rerank to the top 10), each timed."""
    for text in texts[:WARMUP_QUERIES]:
        search(index.encode(text))
    encode_ms, rank_ms, total_ms = [], [], []
    for text in texts:
        t0 = time.perf_counter()
        query = index.encode(text)
        t1 = time.perf_counter()
        search(query)
        t2 = time.perf_counter()
        encode_ms.append((t1 - t0) * 1e3)
        rank_ms.append((t2 - t1) * 1e3)
        total_ms.append((t2 - t0) * 1e3)
    return {"total_ms": percentiles(total_ms), "stage_p50_ms": {"encode": round(float(np.median(encode_ms)), 2), "rank": round(float(np.median(rank_ms)), 2)}}


# --------------------------------------------------------------------------------------------
# The whole benchmark
# --------------------------------------------------------------------------------------------


def method_key(spec: str, factory: str) -> str:
    """Row name of an FDE setting searched with a FAISS index type (plain spec for the engine's flat index).

    Examples
    --------
    >>> method_key("20,4,32", "Flat"), method_key("20,4,32", "SQ8")
    ('20,4,32', '20,4,32 [SQ8]')
    """
    return spec if factory == FLAT else f"{spec} [{factory}]"


def fde_tables(index, methods: Sequence[tuple[str, str]], query_sets: Sequence[QuerySet], cache: Path) -> dict[str, dict[str, Any]]:
    """Per (setting, FAISS index type) and query set: recall summary (document FDEs computed once per setting)."""
    out: dict[str, dict[str, Any]] = {}
    dim = index.fde_config.dim
    for spec, factory in methods:
        config = parse_setting(spec, dim)
        started = time.perf_counter()
        key = method_key(spec, factory)
        out[key] = {"spec": spec, "faiss": factory, "config": config.to_dict(), "dim": config.output_dim}
        for qs in query_sets:
            out[key][qs.label] = fde_setting_results(index, config, factory, qs, cache)
        n90 = [out[key][qs.label]["n"][str(LATENCY_TARGET)] for qs in query_sets]
        print(f"fde {key} ({config.output_dim} dims): N@90% {n90} ({time.perf_counter() - started:.0f} s)", flush=True)
    return out


def compressed_methods(factories: Sequence[str], default: str, best: str) -> list[tuple[str, str]]:
    """(setting, factory) pairs: each factory for the index default and the best setting, or the default only (``@default``).

    Examples
    --------
    >>> compressed_methods(["SQ8", "PQ{d8}x8@default"], "20,4,32", "40,6,16")
    [('20,4,32', 'SQ8'), ('40,6,16', 'SQ8'), ('20,4,32', 'PQ{d8}x8')]
    """
    out = []
    for factory in factories:
        factory, _, scope = factory.partition("@")
        out += [(spec, factory) for spec in dict.fromkeys([default] if scope == "default" else [default, best])]
    return out


def choose_best(fde: dict[str, dict[str, Any]], label: str) -> str:
    """The flat-searched setting with the fewest candidate documents at 90% recall on ``label`` (ties: fewer dims)."""
    reached = [
        (r[label]["n"][str(LATENCY_TARGET)], r["dim"], spec)
        for spec, r in fde.items()
        if r["faiss"] == FLAT and r[label]["n"][str(LATENCY_TARGET)] is not None
    ]
    if not reached:
        raise RuntimeError("no FDE setting reached 90% recall")
    return min(reached)[2]


def token_ann_study(
    index, token_doc: np.ndarray, query_sets: Sequence[QuerySet], exact_rows: dict[str, list[np.ndarray]], args: argparse.Namespace, cache: Path
) -> dict[str, Any]:
    """Build/load the ANN token index; per search setting and query set, its heuristic points and token overlap.

    The index is dropped at the end (2.7 GB as IVF-Flat on scifact) and loaded again for the latency runs.
    """
    token_index, facts = build_token_ann(index.tokens.vectors, args.token_ann, args.token_ann_train, cache)
    name = search_param_name(args.token_ann)
    study: dict[str, Any] = {"facts": facts, "param": name, "settings": {}}
    for value in args.token_ann_values:
        set_search_param(token_index, name, value)
        per_set = {}
        for qs in query_sets:
            rows = ann_token_hits(token_index, qs, args.k_max)
            hit_docs = [np.where(r >= 0, token_doc[r], -1) for r in split_by_query(rows, qs)]
            result = heuristic_results(hit_docs, qs, args.k_max)
            point = result["points"][str(LATENCY_TARGET)]
            k = point["k"] if point else args.k_max
            exact = np.concatenate(exact_rows[qs.label])
            result["token_overlap_at_k"] = round(token_overlap(rows, exact, k), 4)
            per_set[qs.label] = result
        study["settings"][str(value)] = per_set
        print(f"token ANN {args.token_ann} {name}={value}: " + ", ".join(f"{lbl}: {r['points'][str(LATENCY_TARGET)]}" for lbl, r in per_set.items()), flush=True)
    return study


@contextlib.contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Limit numpy's BLAS pool to ``n`` threads for the block; None leaves it as the engine does."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of the report (see the module docstring)."""
    from evaluation.machine import describe_machine

    index = open_index(args.index)
    cache = args.cache_dir / index.index_id
    cache.mkdir(parents=True, exist_ok=True)
    token_doc = token_documents(index.tokens.offsets, index.chunk_doc)
    query_sets = []
    same = args.tune_split == args.report_split and args.tune_max_queries == args.report_max_queries
    if args.tune_split != "none" and not same:
        query_sets.append(load_queries(index, args.dataset, args.tune_split, args.tune_max_queries, cache))
    report_set = load_queries(index, args.dataset, args.report_split, args.report_max_queries, cache)
    query_sets.append(report_set)
    tune_set = query_sets[0]
    print(f"ground truth ready: {[qs.label for qs in query_sets]}", flush=True)

    heuristic, exact_rows = {}, {}
    for qs in query_sets:
        hit_docs, exact_rows[qs.label] = exact_token_hits(index, qs, args.k_max, token_doc, cache)
        heuristic[qs.label] = heuristic_results(hit_docs, qs, args.k_max)
        print(f"token heuristic (exact kNN) on {qs.label}: {heuristic[qs.label]['points']}", flush=True)

    fde = fde_tables(index, [(spec, FLAT) for spec in args.settings], query_sets, cache)
    best = args.best or choose_best(fde, tune_set.label)
    compressed = compressed_methods(args.fde_compressed, args.settings[0], best)
    fde.update(fde_tables(index, compressed, query_sets, cache))

    ann = token_ann_study(index, token_doc, query_sets, exact_rows, args, cache)
    with blas_threads(args.blas_threads):
        latency = measure_latencies(index, token_doc, report_set, fde, heuristic, ann, args, cache)
    return {
        "dataset": Path(args.dataset).name,
        "index": {"path": str(args.index), "index_id": index.index_id, "docs": len(index.doc_ids), "chunks": int(index.tokens.n_chunks),
                  "tokens": int(index.tokens.offsets[-1]), "fde_default": index.fde_config.to_dict()},
        "machine": describe_machine(),
        "query_sets": {qs.label: {"split": qs.split, "queries": len(qs.qids), "sampled_from": qs.sampled_from} for qs in query_sets},
        "tune_label": tune_set.label,
        "report_label": report_set.label,
        "best": best,
        "best_chosen_on": "given (--best)" if args.best else tune_set.label,
        "k_max": args.k_max,
        "blas_threads": args.blas_threads,
        "heuristic_exact": heuristic,
        "fde": fde,
        "token_ann": ann,
        "latency": latency,
    }


def measure_latencies(
    index, token_doc: np.ndarray, report_set: QuerySet, fde: dict, heuristic: dict, ann: dict, args: argparse.Namespace, cache: Path
) -> dict[str, Any]:
    """Latency at 90% recall on the report split: every FDE method at its N@90%, the ANN heuristic at its k'@90%.

    One big index in memory at a time (an FDE index, then the token index) keeps the peak near 7 GB on scifact.
    """
    label, target = report_set.label, str(LATENCY_TARGET)
    out: dict[str, Any] = {"fde": {}, "heuristic_ann": {}, "heuristic_exact": None}
    for key, result in fde.items():
        n = result[label]["n"][target]
        if n is None:
            continue
        config = parse_setting(result["spec"], index.fde_config.dim)
        out["fde"][key] = {"n_docs": n, **fde_latency(index, config, result["faiss"], report_set, n, cache)}
        print(f"latency fde {key} at N={n}: {out['fde'][key]['total_ms']}", flush=True)
    token_index, _ = build_token_ann(index.tokens.vectors, args.token_ann, args.token_ann_train, cache)
    name = ann["param"]
    for value, per_set in ann["settings"].items():
        point = per_set[label]["points"][target]
        if point is None:
            continue
        set_search_param(token_index, name, int(value))
        out["heuristic_ann"][value] = {"k": point["k"], **heuristic_latency(index, token_index, token_doc, report_set, point["k"])}
        print(f"latency heuristic {name}={value} at k'={point['k']}: {out['heuristic_ann'][value]['total_ms']}", flush=True)
    served = open_served(args.index)
    fastest = min(out["heuristic_ann"], key=lambda v: out["heuristic_ann"][v]["total_ms"]["p50"], default=None)
    if fastest is not None:
        set_search_param(token_index, name, int(fastest))
        out["heuristic_served"] = {"param_value": fastest, **served_heuristic(served, token_index, report_set, out["heuristic_ann"][fastest]["k"])}
        print(f"latency heuristic {name}={fastest}, served rerank: {out['heuristic_served']['total_ms']}", flush=True)
    exact_point = heuristic[label]["points"][target]
    del token_index
    if args.exact_latency_queries and exact_point is not None:
        out["heuristic_exact"] = {"k": exact_point["k"], "queries": args.exact_latency_queries, **exact_heuristic_latency(index, token_doc, report_set, exact_point["k"], args.exact_latency_queries)}
    out["fde_served"] = served_fde(served, report_set)
    return out


def exact_heuristic_latency(index, token_doc: np.ndarray, queries: QuerySet, k: int, n_queries: int) -> dict[str, Any]:
    """Latency of the heuristic with exact token kNN (brute force, one thread) on a few queries: a reference."""
    import faiss

    def candidates(query) -> np.ndarray:
        _, rows = faiss.knn(np.ascontiguousarray(query.vectors, dtype=np.float32), index.tokens.vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
        return token_hits_to_documents(rows, token_doc)

    return time_queries(queries.texts[:n_queries], index, candidates)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _n(value: Any) -> str:
    return "—" if value is None else (f"{value:,}" if isinstance(value, int) else f"{value:,.1f}")


def candidates_table(report: dict[str, Any], label: str) -> list[str]:
    """Markdown: candidate documents needed per target, token heuristic first, then every FDE setting."""
    tune = report["tune_label"]
    transfer = label != tune
    head = "| method | dims | N@80% | N@90% | N@95% | chunks@90% | recall@100 docs |" + (" recall at tuning N@90% |" if transfer else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    h = report["heuristic_exact"][label]
    pts = h["points"]
    cells = [_n(pts[str(t)]["candidates_mean"]) + f" (k'={pts[str(t)]['k']})" if pts[str(t)] else "—" for t in TARGETS]
    row = f"| token heuristic, exact kNN | — | {' | '.join(cells)} | — | — |"
    if transfer:
        tune_pt = report["heuristic_exact"][tune]["points"][str(LATENCY_TARGET)]
        row += f" {h['mean_recall'][tune_pt['k'] - 1]:.3f} (k'={tune_pt['k']}) |" if tune_pt else " — |"
    lines.append(row)
    for spec, r in report["fde"].items():
        res = r[label]
        name = f"**FDE {spec}** (best)" if spec == report["best"] else f"FDE {spec}"
        row = f"| {name} | {r['dim']:,} | " + " | ".join(_n(res["n"][str(t)]) for t in TARGETS)
        row += f" | {_n(res['chunks'][str(LATENCY_TARGET)])} | {res['recall_at'].get('100', float('nan')):.3f} |"
        if transfer:
            n_tune = r[tune]["n"][str(LATENCY_TARGET)]
            row += f" {res['curve'][n_tune - 1]:.3f} (N={n_tune}) |" if n_tune else " — |"
        lines.append(row)
    return lines


def latency_table(report: dict[str, Any]) -> list[str]:
    """Markdown: end-to-end latency at 90% recall on the report split."""
    lat = report["latency"]
    lines = [
        "| method | candidates (docs, mean) | p50 ms | p95 ms | encode p50 | candidates p50 | rerank p50 |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(name: str, r: dict[str, Any]) -> str:
        s = r["stage_p50_ms"]
        return f"| {name} | {r['reranked_docs_mean']:,.1f} | {r['total_ms']['p50']:.1f} | {r['total_ms']['p95']:.1f} | {s['encode']:.1f} | {s['candidates']:.1f} | {s['rerank']:.1f} |"

    param = report["token_ann"]["param"]
    factory = report["token_ann"]["facts"]["factory"]
    for value, r in lat["heuristic_ann"].items():
        lines.append(row(f"token heuristic, {factory} {param}={value}, k'={r['k']}", r))
    if lat.get("heuristic_exact"):
        r = lat["heuristic_exact"]
        lines.append(row(f"token heuristic, exact kNN, k'={r['k']} ({r['queries']} queries only)", r))
    for spec, r in lat["fde"].items():
        name = f"**FDE {spec}** (best)" if spec == report["best"] else f"FDE {spec}"
        lines.append(row(f"{name}, N={r['n_docs']}", r))
    served = lat.get("fde_served")
    if served:
        ann = served["ann"]
        lines += [
            "",
            f"fde-rerank as the index serves it ({served['ann_kind_built']}, efSearch {ann['hnsw_ef_search']}, {ann['hnsw_storage']} codes; "
            f"retrieved chunks reranked; {served['token_dtype']} store with the int8 prefilter), by candidate chunks; recall = "
            "share of the exact top-10 in the **returned** top 10 (stricter than the candidate recall above):",
            "",
            "| candidate chunks | " + " | ".join(str(c) for c in served["recall_by_candidates"]) + " |",
            "|---" * (len(served["recall_by_candidates"]) + 1) + "|",
            "| recall of the exact top-10 | " + " | ".join(f"{r:.3f}" for r in served["recall_by_candidates"].values()) + " |",
            "",
            "| fde-rerank as served | candidate chunks | recall | p50 ms | p95 ms | encode p50 | rank p50 (ANN + rerank) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, what in (("at_90", "smallest count for 90%"), ("default", "the default count")):
            r = served.get(name)
            if r:
                lines.append(f"| {what} | {r['candidates']} | {r['recall']:.3f} | {r['total_ms']['p50']:.1f} | {r['total_ms']['p95']:.1f} | "
                             f"{r['stage_p50_ms']['encode']:.1f} | {r['stage_p50_ms']['rank']:.1f} |")
        h = lat.get("heuristic_served")
        if h:
            lines.append(f"| token heuristic ({report['token_ann']['param']}={h['param_value']}, k'={h['k']}) with the served rerank | its tokens' chunks | {h['recall']:.3f} | "
                         f"{h['total_ms']['p50']:.1f} | {h['total_ms']['p95']:.1f} | {h['stage_p50_ms']['encode']:.1f} | {h['stage_p50_ms']['rank']:.1f} |")
    return lines


def token_ann_table(report: dict[str, Any]) -> list[str]:
    """Markdown: the ANN token index against exact kNN, per search setting, on the report split."""
    ann, label = report["token_ann"], report["report_label"]
    exact = report["heuristic_exact"][label]["points"]
    lines = [
        f"| {ann['param']} | k'@90% | candidates@90% (mean) | N@80% | N@95% | token top-k' overlap with exact |",
        "|---|---|---|---|---|---|",
    ]
    e90 = exact[str(LATENCY_TARGET)]
    if e90:
        lines.append(f"| exact | {e90['k']} | {e90['candidates_mean']:.1f} | {_pt(exact['0.8'])} | {_pt(exact['0.95'])} | 1.000 |")
    for value, per_set in ann["settings"].items():
        r = per_set[label]
        p = r["points"]
        p90 = p[str(LATENCY_TARGET)]
        lines.append(f"| {value} | {p90['k'] if p90 else '—'} | {_n(p90['candidates_mean']) if p90 else '—'} | {_pt(p['0.8'])} | {_pt(p['0.95'])} | {r['token_overlap_at_k']:.3f} |")
    return lines


def _pt(point: dict[str, Any] | None) -> str:
    return "—" if point is None else f"{point['candidates_mean']:.1f} (k'={point['k']})"


def latency_ratios(fde_lat: dict[str, Any], heur_lat: dict[str, Any]) -> dict[str, float]:
    """FDE over heuristic latency: p50, p95, and p50 without the query encoding both share.

    Examples
    --------
    >>> lat = lambda p50, p95, enc: {"total_ms": {"p50": p50, "p95": p95}, "stage_p50_ms": {"encode": enc}}
    >>> latency_ratios(lat(20.0, 40.0, 10.0), lat(40.0, 80.0, 10.0))
    {'p50': 0.5, 'p95': 0.5, 'p50_without_encoding': 0.333}
    """
    def beyond_encoding(r: dict[str, Any]) -> float:
        return max(r["total_ms"]["p50"] - r["stage_p50_ms"]["encode"], 1e-9)

    return {
        "p50": round(fde_lat["total_ms"]["p50"] / heur_lat["total_ms"]["p50"], 3),
        "p95": round(fde_lat["total_ms"]["p95"] / heur_lat["total_ms"]["p95"], 3),
        "p50_without_encoding": round(beyond_encoding(fde_lat) / beyond_encoding(heur_lat), 3),
    }


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's two targets at 90% recall on the report split: the best setting, and the fastest FDE method."""
    label, best, target = report["report_label"], report["best"], str(LATENCY_TARGET)
    h_pt = report["heuristic_exact"][label]["points"][target]
    f_n = report["fde"][best][label]["n"][target]
    lat = report["latency"]
    heur_value, heur = min(lat["heuristic_ann"].items(), key=lambda item: item[1]["total_ms"]["p50"], default=(None, None))
    out: dict[str, Any] = {"best": best, "fastest_heuristic": heur_value}
    if h_pt and f_n:
        ratio = h_pt["candidates_mean"] / f_n
        out["candidates_ratio"] = round(ratio, 2)
        out["candidates_met"] = ratio >= MIN_CANDIDATES_RATIO
    if heur:
        out["heuristic_encode_share_p50"] = round(heur["stage_p50_ms"]["encode"] / heur["total_ms"]["p50"], 3)
        fastest = min(lat["fde"], key=lambda key: lat["fde"][key]["total_ms"]["p50"], default=None)
        for name, key in (("best", best), ("fastest_fde", fastest)):
            if key in lat["fde"]:
                ratios = latency_ratios(lat["fde"][key], heur)
                out[f"latency_{name}"] = {"method": key, **ratios, "met": ratios["p50"] <= MAX_LATENCY_RATIO}
        served = (lat.get("fde_served") or {}).get("at_90")
        if served:
            ratios = latency_ratios(served, heur)
            out["latency_served"] = {"method": f"as served, {served['candidates']} candidate chunks", **ratios, "met": ratios["p50"] <= MAX_LATENCY_RATIO}
            if lat.get("heuristic_served"):
                # like for like: both with the served rerank (the heuristic's recall is printed beside it)
                ratios = latency_ratios(served, lat["heuristic_served"])
                out["latency_served_like_for_like"] = {"method": f"as served, {served['candidates']} candidate chunks", **ratios, "met": ratios["p50"] <= MAX_LATENCY_RATIO}
    return out


def render(report: dict[str, Any]) -> str:
    """The Markdown report."""
    from evaluation.machine import machine_line

    idx = report["index"]
    lines = [
        f"# Candidates for 80 / 90 / 95% recall of the exact MaxSim top-10: {report['dataset']} (MUVERA Table 1)",
        "",
        f"machine: {machine_line(report['machine'])}",
        f"index: {idx['path']} ({idx['docs']:,} docs, {idx['chunks']:,} chunks, {idx['tokens']:,} tokens); "
        f"best FDE setting: **{report['best']}**, chosen on {report['best_chosen_on']} (fewest candidate documents at 90%).",
        "",
        "Candidates are documents for every method. N@x% = the smallest number of candidate documents whose mean recall "
        "of the exact MaxSim top-10 reaches x%. FDE: chunks ranked by exact inner product of FDEs, deduplicated to documents "
        "in rank order; `chunks@90%` is the chunk depth (the engine's `candidates` knob) for the same recall. "
        "FDE settings are `R,k_sim,d_proj`, `:D` a final count-sketch projection to D dims, `+nofill` without filling "
        "empty document partitions, `@s` another seed, `[F]` the FDEs searched through the FAISS index F instead of the "
        "engine's exact flat one (SQ8: 8-bit scalar quantizer; PQ<d/8>x8: product quantizer with 8-dim sub-vectors, the paper's PQ-256-8). Token heuristic: each query token's k' nearest document tokens, "
        "their documents deduplicated; for the smallest k' whose mean recall reaches x%, the cell gives the mean "
        f"number of candidate documents per query at that k' (k' swept 1..{report['k_max']}).",
    ]
    for label in report["query_sets"]:
        role = "tuning" if label == report["tune_label"] and label != report["report_label"] else "report"
        lines += ["", f"## {label}: {role}", ""] + candidates_table(report, label)
    lines += [
        "",
        f"## End-to-end latency at 90% recall, {report['report_label']}",
        "",
        "Per query, after warm-up, one torch and one FAISS thread (`LateIndex.open`; numpy's BLAS pool "
        + ("left as the engine leaves it" if report.get("blas_threads") is None else f"limited to {report['blas_threads']} thread(s)")
        + "), query encoding included; every "
        "method reranks its candidates with the engine's exact MaxSim (`LateIndex.score_documents`). FDE searches the "
        "chunk FDEs with a flat FAISS index at its own N@90%; the heuristic uses the ANN token index at the k' that index needs for 90%.",
        "",
    ] + latency_table(report)
    facts = report["token_ann"]["facts"]
    lines += [
        "",
        f"## The ANN token index ({facts['factory']}, inner product) against exact kNN, {report['report_label']}",
        "",
        f"{facts['vectors']:,} token vectors; built in {facts['build_seconds_2_threads']} s on 2 threads (k-means on "
        f"{facts['train_size']:,} sampled tokens, then adding all); {facts['bytes'] / 2**30:.2f} GiB serialized (about its size in memory).",
        "",
    ] + token_ann_table(report)
    t = targets(report)
    lines += ["", "## Targets (issue 7), 90% recall, report split", ""]
    if "candidates_ratio" in t:
        lines.append(f"- candidates: token heuristic (exact kNN) / FDE {t['best']} = **{t['candidates_ratio']:.2f}x** (target >= {MIN_CANDIDATES_RATIO:g}x): "
                     f"{'met' if t['candidates_met'] else 'not met'}")
    param = report["token_ann"]["param"]
    for name, what in (("best", "the best setting"), ("fastest_fde", "the fastest FDE method"), ("served", "fde-rerank as served"),
                       ("served_like_for_like", "fde-rerank as served")):
        r = t.get(f"latency_{name}")
        if r:
            other = "the same heuristic with the served rerank" if name == "served_like_for_like" else "the fastest token heuristic"
            lines.append(
                f"- latency, {what} (FDE {r['method']}) / {other} ({param}={t['fastest_heuristic']}): p50 **{r['p50']:.2f}** "
                f"(p95 {r['p95']:.2f}; without query encoding {r['p50_without_encoding']:.2f}; target <= {MAX_LATENCY_RATIO:g}): {'met' if r['met'] else 'not met'}"
            )
    if t.get("heuristic_encode_share_p50", 0) > MAX_LATENCY_RATIO:
        lines.append(f"- query encoding alone is {t['heuristic_encode_share_p50']:.0%} of that heuristic's p50: above {MAX_LATENCY_RATIO:.0%}, "
                     "no candidate generation can meet the latency target on this collection while encoding is counted.")
    return "\n".join(lines)


def json_ready(report: dict[str, Any]) -> dict[str, Any]:
    """The report without the long curves, and with numpy values as plain numbers."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in ("curve", "mean_recall", "mean_candidates")}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        return value

    return {**clean(report), "targets": targets(report)}


def main(argv: list[str] | None = None) -> int:
    from evaluation.machine import machine_line

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="BEIR-layout dataset folder")
    parser.add_argument("--index", required=True, help="index folder of the dataset's corpus (read only)")
    parser.add_argument("--tune-split", default="train", help="split the best FDE setting is chosen on ('none': no tuning split)")
    parser.add_argument("--tune-max-queries", type=int, default=300, help="fixed subset of the tuning split (hash of ids; default 300)")
    parser.add_argument("--report-split", default="test", help="split the tables and latencies are reported on")
    parser.add_argument("--report-max-queries", type=int, default=None, help="fixed subset of the report split (default: all)")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), help="FDE settings 'R,k_sim,d_proj[:final][+nofill][@seed]'")
    parser.add_argument("--best", default=None, help="use this setting as the best instead of choosing on the tuning split")
    parser.add_argument("--fde-compressed", nargs="*", default=["SQ8", "PQ{d8}x8@default"],
                        help="FAISS factory strings also tried for the index-default and best settings' FDEs ({d8} = dims / 8; "
                        "'@default': the index default only, as PQ training takes ~20 min at 10,240 dims here; give none to skip)")
    parser.add_argument("--k-max", type=int, default=256, help="largest k' of the token heuristic sweep (default 256)")
    parser.add_argument("--token-ann", default="IVF4096,Flat", help="FAISS factory string of the ANN token index (default IVF4096,Flat)")
    parser.add_argument("--token-ann-train", type=int, default=160_000, help="tokens sampled to train it (default 160,000)")
    parser.add_argument("--token-ann-values", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="its nprobe (IVF) or efSearch (HNSW) values")
    parser.add_argument("--exact-latency-queries", type=int, default=20, help="queries for the exact-kNN heuristic's latency (0: skip)")
    parser.add_argument("--blas-threads", type=int, default=None, help="limit numpy's BLAS threads while timing (default: as the engine, untouched)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lateflow" / "candidates-table", help="cache of FDEs, ground truth, hits")
    parser.add_argument("--out", type=Path, default=None, help="write the tables (.md) and the numbers (.json) here")
    args = parser.parse_args(argv)
    if args.best and args.best not in args.settings:
        args.settings = [args.best] + list(args.settings)
    report = run(args)
    print(f"machine: {machine_line(report['machine'])}")
    print_and_save(render(report), json_ready(report), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
