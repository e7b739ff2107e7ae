"""Scaling study (issue 7): query latency and quality of ``fde-rerank`` vs ``maxsim-exact`` from 1k to 100k documents.

Run (heavy: take the machine's lock; the 100k size is opt-in, see "Cost" below)::

    flock /tmp/lateflow-heavy.lock .venv/bin/python -m evaluation.benchmarks.scaling \
        --sizes 1000 full 10000 --reuse --out reports/benchmarks/scaling-scifact.md
    flock /tmp/lateflow-heavy.lock .venv/bin/python -m evaluation.benchmarks.scaling \
        --sizes 1000 full 10000 100000 --reuse --out reports/benchmarks/scaling-scifact.md

What is measured, per corpus size and FAISS index kind (``flat``, ``hnsw``, ``ivfpq``), on a real
lateflow index folder opened with :meth:`lateflow.engine.LateIndex.open` (one query thread):

* ``fde-rerank`` = ``index.rank(index.encode(q), 10)`` (the default search: default candidate count)
  and ``maxsim-exact`` = ``index.rank_exhaustive([index.encode(q)], 10)`` on the same opening, whose
  int8 prefilter re-scores exactly only the chunks that can reach the top (the exact top 10, the
  fastest brute force we have: since 2026-12-01; earlier reports timed the next one as maxsim-exact),
  and brute force scoring every chunk (``prefilter=False``, on the ``--exact-token-memory``
  opening), each timed per query with the query encoding inside the timed region, after
  ``--warmup`` untimed queries. Latency p50/p95
  is taken over a fixed subset of ``--latency-queries`` scifact test queries (chosen by a hash of
  their ids, :func:`evaluation.datasets.subsample`); the systems alternate query by query, so
  machine noise hits them alike. ``maxsim-exact`` does not depend on the ANN index, so it is
  measured once per size (beside the first index kind).
* nDCG@10 (ranx, :mod:`evaluation.scoring`) of both systems over ``--ndcg-queries`` test queries;
  above ``--exact-all-max-docs`` documents brute force is run on the latency subset only, and the
  share of ``maxsim-exact`` is then computed on that subset (the report says which).
* Build time of each corpus and each ANN index, the FAISS knobs used, peak resident memory of the
  build and of every opened index, and the disk used.

Corpora (``--sizes``; the folders go to ``--scale-dir``, default ``/work/scale``)
-------------------------------------------------------------------------------------
Everything is assembled from the token store of an existing scifact index (``--source-index``,
default ``/work/idx/scifact``: 5,183 documents, 9,907 chunks of <= 256 tokens, 1.77M token vectors
of dim 384, float16), which is only read.

* ``full`` (5,183 documents): the real scifact corpus, as indexed.
* smaller sizes (e.g. ``1000``): every document judged in the evaluated split (339 for scifact
  test) plus documents drawn at random (``--seed``) from the others, in corpus order. The judged
  documents are all present, so the subset is easier than a random 1k sample would be.
* larger sizes (e.g. ``10000``, ``100000``): all real documents plus synthetic *distractor*
  documents, resampled from real token rows:

  1. Length: a real chunk's kept-token count drawn at random from all 9,907 chunks, times
     ``--synthetic-mean-tokens / 179`` (179 = the real mean), rounded, within 1 .. the longest
     source chunk. With the default 48 that is 2..66 tokens, mean ~48: one chunk per synthetic
     document, about the size of a web passage.
  2. Runs: the length is split into ``--min-runs``..``--max-runs`` (2..4) contiguous runs, each at
     least one token (a uniformly random composition).
  3. Each run copies a contiguous span of token rows (vectors *and* token ids, so IDF and PRF see
     real vocabulary) from one real chunk drawn at random from the chunks of documents **not judged**
     in the evaluated split, at a random offset; a source shorter than its run is redrawn.
  4. The document's pooled vector (the ``dense`` baseline's only) is the normalised mean of its rows;
     FDEs are computed by :func:`tasks.fde.encode_documents` with the source index's FDE settings.
  Synthetic documents carry no text beyond a placeholder that names their sources, metadata
  ``{"synthetic": true}``, and ids ``syn<seed>-<n>``. Reused real rows are bit-identical.

Why so short: 100k scifact-like documents (1.9 chunks of 179 tokens each) would hold ~34M token
vectors, 26 GB in float16 on disk (this machine has ~13 GB of disk to spare) and 13 GB held as int8
per opening of the folder (``--token-memory``, as a default index is served; see ``token_memory``
in :meth:`LateIndex.open`), twice that when brute force gets its own opening, in 24 GB of RAM that
the corpus build also needs (it gathers the flat float16 store). So at 100k the store stays near 5
GB: 1.77M real + ~4.55M synthetic rows = ~6.3M rows, 4.9 GB in float16 (2.4 GB held as int8).
(Before 2026-12-01 the engine also read ``tokens.parquet`` whole, peaking at ~2.5x its size; it now
streams it, see :func:`storage.index_files.read_token_store`.) ``tokens.parquet`` is written as one
row group, which no longer matters to readers.

How the recipe can flatter or hurt each system:

* Quality (both): mixed-topic fragments rarely match every token of a query, and the sources exclude
  judged documents (so no unjudged near-copy of a relevant document becomes a false negative): the
  distractors are easier than real documents on neighbouring topics, which flatters nDCG of both
  systems at 10k/100k. Each of the ~9,250 non-judged real chunks lends a run to ~31 synthetic
  documents at 100k (~1.6 at 10k), which crowds the FDE space with near-duplicates of the same real
  neighbourhoods (harder for the ANN, which must tell them apart).
* ``fde-rerank`` quality: a short document averages few tokens per FDE partition, so its FDE has a
  larger norm than a long one's and may take ANN candidate slots that exact MaxSim would not give
  it; this hurts ``fde-rerank`` (the report gives the share of synthetic documents in each system's
  top 10).
* Latency: ``maxsim-exact`` costs time linear in the token count; at 100k this corpus holds ~5x
  fewer tokens than 100k real scifact documents, which flatters ``maxsim-exact`` and so makes the
  ratio target *harder* for ``fde-rerank``. Short candidates are cheap to rerank, which flatters
  ``fde-rerank``'s rerank stage at 100k; its ANN search (flat: linear in chunks) is unaffected.

Folders and reuse: ``SCALE/scifact-n<docs>-seed<seed>/base`` holds docs, chunks, tokens, FDE, IDF and
rejected Parquet files (written with the project's schemas and writers); ``.../<kind>`` is a complete
plain index folder (those files hard-linked, plus ``ann.faiss`` and ``manifest.json``) that
``LateIndex.open`` serves. With ``--reuse``, a folder whose manifest carries the same recipe key
(source index, size, seed, recipe) is used as is; without it every requested folder is rebuilt.

Cost (2 cores): the 1k/full/10k part builds in ~5 minutes the first time (HNSW over 15k FDEs is
most of it) and measures in ~10; 100k builds in ~40 minutes (IVF k-means and HNSW over 100k
10,240-dim FDEs) and measures in ~30, peaking at ~13 GB resident, using ~18 GB of disk.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from evaluation.benchmarks import print_and_save
from flows.settings import apply_quiet_defaults

apply_quiet_defaults()

REPO = Path(__file__).resolve().parents[2]
ANN_KINDS = ("flat", "hnsw", "ivfpq")
DEPTH = 10  # nDCG@10 needs the top 10 only; fde-rerank is called exactly as a user asking for 10 hits
FULL = "full"
# issue 7's latency targets: fde-rerank p50 at most this share of maxsim-exact's p50
RATIO_TARGETS = {FULL: 1 / 20, 100_000: 1 / 100}
SHARE_TARGET = 0.995
BASE_FILES = ("docs.parquet", "chunks.parquet", "tokens.parquet", "fde.parquet", "idf.parquet", "rejected.parquet")
RECIPE_VERSION = 1  # bump when the corpus recipe changes, so --reuse never serves a stale folder


# --------------------------------------------------------------------------------------------
# Synthetic distractor documents (pure numpy: see tests/test_scaling_corpus.py)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticRecipe:
    """How synthetic distractor documents are resampled from real token rows (see the module docstring)."""

    mean_tokens: float = 48.0
    min_runs: int = 2
    max_runs: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mean_tokens <= 0:
            raise ValueError(f"mean_tokens must be positive, got {self.mean_tokens}")
        if not 1 <= self.min_runs <= self.max_runs:
            raise ValueError(f"need 1 <= min_runs <= max_runs, got {self.min_runs}, {self.max_runs}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SyntheticDocs:
    """Synthetic documents as CSR row selections from a source token store.

    Document ``i`` is the source rows ``rows[offsets[i]:offsets[i+1]]``; it is made of runs
    ``run_offsets[i]:run_offsets[i+1]``, run ``j`` copying ``run_lengths[j]`` consecutive rows of
    source chunk ``run_sources[j]`` from position ``run_starts[j]`` within that chunk.
    """

    rows: np.ndarray
    offsets: np.ndarray
    run_sources: np.ndarray
    run_starts: np.ndarray
    run_lengths: np.ndarray
    run_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1


def synthetic_lengths(source_lengths: np.ndarray, n: int, mean_tokens: float, max_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """Token counts of ``n`` synthetic documents: real chunk lengths resampled, scaled to ``mean_tokens``.

    Scaling (rather than, say, a cap) keeps the shape of the real distribution; counts are clipped to
    ``1..max_tokens``.

    Examples
    --------
    >>> lengths = synthetic_lengths(np.array([100, 200, 300]), 5, 20.0, 50, np.random.default_rng(0))
    >>> sorted(set(lengths.tolist())) <= [10, 20, 30]
    True
    """
    drawn = rng.choice(np.asarray(source_lengths, dtype=np.float64), size=n)
    scaled = np.rint(drawn * (mean_tokens / float(np.mean(source_lengths))))
    return np.clip(scaled, 1, max_tokens).astype(np.int64)


def split_runs(lengths: np.ndarray, min_runs: int, max_runs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cut each length into ``min_runs..max_runs`` positive parts (never more parts than tokens).

    Returns the part lengths, document after document, and the CSR offsets of each document's parts.
    Part sizes are one token each plus a random composition of the rest (exponential weights make the
    proportions uniform on the simplex); the rounding remainder goes to the first parts.

    Examples
    --------
    >>> parts, offsets = split_runs(np.array([10, 1, 7]), 2, 3, np.random.default_rng(0))
    >>> [int(parts[a:b].sum()) for a, b in zip(offsets[:-1], offsets[1:])], bool((parts >= 1).all())
    ([10, 1, 7], True)
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = np.minimum(rng.integers(min_runs, max_runs + 1, size=len(lengths)), lengths)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    doc_of_run = np.repeat(np.arange(len(lengths)), counts)
    weights = rng.exponential(size=int(offsets[-1]))
    share = weights / np.add.reduceat(weights, offsets[:-1])[doc_of_run] if len(weights) else weights
    parts = 1 + np.floor((lengths - counts)[doc_of_run] * share).astype(np.int64)
    missing = lengths - (np.add.reduceat(parts, offsets[:-1]) if len(parts) else np.zeros(0, np.int64))
    position = np.arange(len(parts)) - offsets[:-1][doc_of_run]
    parts += position < missing[doc_of_run]
    return parts, offsets


def _draw_sources(pool: np.ndarray, pool_lengths: np.ndarray, parts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random source chunk (index into ``pool``) per run, redrawn until it is at least as long as the run."""
    choice = rng.integers(0, len(pool), size=len(parts))
    short = pool_lengths[choice] < parts
    while short.any():  # terminates: every part fits the longest pool chunk (lengths are capped by it)
        choice[short] = rng.integers(0, len(pool), size=int(short.sum()))
        short = pool_lengths[choice] < parts
    return choice


def synthetic_documents(source_offsets: np.ndarray, pool: np.ndarray, n_docs: int, recipe: SyntheticRecipe) -> SyntheticDocs:
    """Resample ``n_docs`` synthetic documents from the source chunks in ``pool`` (see the module docstring).

    Parameters
    ----------
    source_offsets
        CSR offsets of the source token store: chunk ``c`` owns rows ``source_offsets[c]:source_offsets[c+1]``.
    pool
        Chunk ids that may be copied from (for the study: chunks of documents not judged in the split).
    n_docs
        Number of documents to make.
    recipe
        Length, runs and seed; the same recipe and inputs always give the same documents.

    Returns
    -------
    SyntheticDocs
        Row selections only: gather ``vectors[rows]`` and ``token_ids[rows]`` from the store.

    Examples
    --------
    >>> docs = synthetic_documents(np.array([0, 5, 9, 20]), np.array([0, 2]), 3, SyntheticRecipe(mean_tokens=4))
    >>> len(docs), bool(np.isin(docs.run_sources, [0, 2]).all())
    (3, True)
    """
    source_offsets = np.asarray(source_offsets, dtype=np.int64)
    pool = np.asarray(pool, dtype=np.int64)
    if n_docs == 0:
        empty = np.zeros(0, dtype=np.int64)
        return SyntheticDocs(rows=empty, offsets=np.zeros(1, np.int64), run_sources=empty, run_starts=empty, run_lengths=empty, run_offsets=np.zeros(1, np.int64))
    pool_lengths = source_offsets[pool + 1] - source_offsets[pool]
    pool, pool_lengths = pool[pool_lengths > 0], pool_lengths[pool_lengths > 0]
    if n_docs and len(pool) == 0:
        raise ValueError("no non-empty source chunk to resample from")
    rng = np.random.default_rng(recipe.seed)
    # lengths follow every source chunk's length, not only the pool's: the pool is a sampling
    # constraint, the length distribution is the corpus's
    all_lengths = np.diff(source_offsets)
    lengths = synthetic_lengths(all_lengths[all_lengths > 0], n_docs, recipe.mean_tokens, int(pool_lengths.max(initial=1)), rng)
    parts, run_offsets = split_runs(lengths, recipe.min_runs, recipe.max_runs, rng)
    choice = _draw_sources(pool, pool_lengths, parts, rng)
    sources, source_lengths = pool[choice], pool_lengths[choice]
    starts = np.floor(rng.random(len(parts)) * (source_lengths - parts + 1)).astype(np.int64)
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # row of token t of run r = the run's first source row + t, built without a Python loop
    run_first = np.cumsum(parts) - parts
    rows = np.repeat(source_offsets[sources] + starts - run_first, parts) + np.arange(int(parts.sum()), dtype=np.int64)
    return SyntheticDocs(rows=rows, offsets=offsets, run_sources=sources, run_starts=starts, run_lengths=parts, run_offsets=run_offsets)


def select_real_documents(n_real: int, judged: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` real documents: every judged one plus random others, in corpus order.

    Examples
    --------
    >>> picked = select_real_documents(10, np.array([7, 2]), 4, seed=0)
    >>> len(picked), {2, 7} <= set(picked.tolist()), bool((np.diff(picked) > 0).all())
    (4, True, True)
    """
    judged = np.unique(np.asarray(judged, dtype=np.int64))
    if n >= n_real:
        return np.arange(n_real)
    if n < len(judged):
        raise ValueError(f"a {n}-document subset cannot keep the {len(judged)} judged documents")
    others = np.setdiff1d(np.arange(n_real), judged)
    extra = np.random.default_rng(seed).choice(others, size=n - len(judged), replace=False)
    return np.sort(np.concatenate([judged, extra]))


# --------------------------------------------------------------------------------------------
# Memory and disk accounting
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


_highest_peak_kib = 0  # the process's peak across resets


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM), so each phase reports its own peak (Linux only)."""
    global _highest_peak_kib
    _highest_peak_kib = max(_highest_peak_kib, _status_kib("VmHWM") or 0)
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        pass  # the peak then covers the process so far: an over-estimate, never an under-estimate


def peak_rss_gib() -> float:
    """Peak resident memory since the last :func:`reset_peak_rss` (else since start), GiB."""
    kib = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / 2**20, 2)


def process_peak_rss_gib() -> float:
    """Peak resident memory of the whole process so far, across :func:`reset_peak_rss` calls, GiB."""
    return round(max(_highest_peak_kib, _status_kib("VmHWM") or 0) / 2**20, 2)


def rss_gib() -> float:
    """Current resident memory, GiB."""
    return round((_status_kib("VmRSS") or 0) / 2**20, 2)


def release_memory() -> None:
    """Hand freed memory back to the OS: Python garbage, then Arrow's pool.

    Arrow's default allocator (mimalloc) keeps freed pages: after ``LateIndex.open`` on scifact the
    process held 8.7 GiB instead of 3.3 (measured), which would not leave room for 100k here.
    """
    gc.collect()
    pa.default_memory_pool().release_unused()


def disk_gib(folder: Path) -> float:
    """Bytes on disk under ``folder``, hard links counted once, GiB."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            stat = path.stat()
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512
    return round(total / 2**30, 2)


# --------------------------------------------------------------------------------------------
# Building the index folders
# --------------------------------------------------------------------------------------------


@dataclass
class Source:
    """The read-only source index: its manifest, tables, token store and pooled vectors."""

    folder: Path
    manifest: dict[str, Any]
    docs: pa.Table
    chunks: pa.Table
    vectors: np.ndarray  # (tokens, dim) float16
    token_ids: np.ndarray
    offsets: np.ndarray  # CSR over chunks
    pooled: np.ndarray  # (chunks, dim) float32
    doc_ids: list[str]  # documents in chunk order
    doc_chunk_offsets: np.ndarray  # document i owns chunks doc_chunk_offsets[i]:doc_chunk_offsets[i+1]

    @classmethod
    def open(cls, path: Path) -> "Source":
        import pyarrow.parquet as pq

        from storage import index_files as files
        from storage.manifest import read_manifest, resolve_index_dir

        folder = resolve_index_dir(path)
        manifest = read_manifest(folder)
        chunks = pq.read_table(folder / files.CHUNKS_FILE)
        store = files.read_token_store(folder / files.TOKENS_FILE)
        chunk_docs = np.array(chunks.column("doc_id").to_pylist(), dtype=object)
        starts = np.flatnonzero(np.r_[True, chunk_docs[1:] != chunk_docs[:-1]])
        source = cls(
            folder=folder,
            manifest=manifest,
            docs=pq.read_table(folder / files.DOCS_FILE),
            chunks=chunks,
            vectors=store.vectors,
            token_ids=store.token_ids,
            offsets=store.offsets,
            pooled=files.read_pooled(folder / files.TOKENS_FILE),
            doc_ids=[str(chunk_docs[s]) for s in starts],
            doc_chunk_offsets=np.append(starts, len(chunk_docs)).astype(np.int64),
        )
        release_memory()
        return source

    @property
    def index_id(self) -> str:
        return self.manifest["index_id"]

    def fde_config(self):
        from tasks.fde import FDEConfig

        return FDEConfig.from_dict(self.manifest["fde"])


@dataclass
class CorpusPlan:
    """Which real documents and which synthetic ones make one corpus size."""

    n_docs: int
    real_docs: np.ndarray  # indices into Source.doc_ids
    real_chunks: np.ndarray  # source chunk ids, in order
    synthetic: SyntheticDocs
    recipe: SyntheticRecipe

    @property
    def n_real_chunks(self) -> int:
        return len(self.real_chunks)


def plan_corpus(source: Source, n_docs: int, judged_docs: set[str], recipe: SyntheticRecipe) -> CorpusPlan:
    """Real documents (a subset below the real size) plus synthetic ones above it."""
    from tasks.rerank import gather_rows

    n_real = len(source.doc_ids)
    judged = np.array([i for i, d in enumerate(source.doc_ids) if d in judged_docs], dtype=np.int64)
    real_docs = select_real_documents(n_real, judged, min(n_docs, n_real), recipe.seed)
    real_chunks, _ = gather_rows(source.doc_chunk_offsets, real_docs)
    # distractors copy only chunks of documents nobody judged: see the module docstring
    judged_chunks, _ = gather_rows(source.doc_chunk_offsets, judged)
    pool = np.setdiff1d(np.arange(len(source.offsets) - 1), judged_chunks)
    synthetic = synthetic_documents(source.offsets, pool, max(0, n_docs - n_real), recipe)
    return CorpusPlan(n_docs=n_docs, real_docs=real_docs, real_chunks=real_chunks, synthetic=synthetic, recipe=recipe)


def _renumbered(table: pa.Table, first_id: int = 0) -> pa.Table:
    ids = pa.array(np.arange(first_id, first_id + table.num_rows, dtype=np.int64))
    return table.set_column(table.schema.get_field_index("chunk_id"), table.schema.field("chunk_id"), ids)


def _synthetic_text(plan: CorpusPlan, source: Source) -> tuple[list[str], list[str]]:
    """Ids and placeholder texts of the synthetic documents (the text names the token runs' sources)."""
    syn = plan.synthetic
    ids = [f"syn{plan.recipe.seed}-{i:07d}" for i in range(len(syn))]
    texts = []
    for i, doc_id in enumerate(ids):
        runs = range(syn.run_offsets[i], syn.run_offsets[i + 1])
        # source chunk ids are row numbers of the source's chunks.parquet (0..n-1, checked on load)
        spans = ", ".join(f"{syn.run_sources[j]}[{syn.run_starts[j]}:{syn.run_starts[j] + syn.run_lengths[j]}]" for j in runs)
        texts.append(f"[synthetic distractor {doc_id}: token rows of scifact chunks {spans}]")
    return ids, texts


def _chunks_table(plan: CorpusPlan, source: Source, syn_ids: list[str], syn_texts: list[str], syn_token_ids: np.ndarray) -> pa.Table:
    """chunks.parquet: the real chunks' rows, then one chunk per synthetic document (placeholder text)."""
    from storage.hashing import sha256_text
    from storage.schemas import CHUNKS

    real = source.chunks.take(pa.array(plan.real_chunks))
    lengths = np.diff(plan.synthetic.offsets).astype(np.int32)
    synthetic = pa.Table.from_pydict(
        {
            "chunk_id": np.zeros(len(syn_ids), np.int64),
            "doc_id": syn_ids,
            "ordinal": np.zeros(len(syn_ids), np.int32),
            "char_start": np.zeros(len(syn_ids), np.int32),
            "char_end": np.array([len(t) for t in syn_texts], np.int32),
            "token_start": np.zeros(len(syn_ids), np.int32),
            "token_end": lengths,
            "text": syn_texts,
            "input_ids": pa.ListArray.from_arrays(pa.array(plan.synthetic.offsets.astype(np.int32)), pa.array(syn_token_ids.astype(np.int32))),
            "content_hash": [sha256_text(t) for t in syn_texts],
        },
        schema=CHUNKS,
    )
    return _renumbered(pa.concat_tables([real.select(CHUNKS.names).cast(CHUNKS), synthetic]))


def _docs_table(plan: CorpusPlan, source: Source, syn_ids: list[str], syn_texts: list[str]) -> pa.Table:
    """docs.parquet: the chosen real documents' rows, then the synthetic documents."""
    from storage.hashing import sha256_text
    from storage.schemas import DOCS

    row_of = {d: i for i, d in enumerate(source.docs.column("doc_id").to_pylist())}
    real = source.docs.take(pa.array([row_of[source.doc_ids[i]] for i in plan.real_docs], type=pa.int64()))
    synthetic = pa.Table.from_pydict(
        {
            "doc_id": syn_ids,
            "title": [""] * len(syn_ids),
            "text": syn_texts,
            "metadata": [json.dumps({"synthetic": True})] * len(syn_ids),
            "content_hash": [sha256_text(t) for t in syn_texts],
        },
        schema=DOCS,
    )
    return pa.concat_tables([real.select(DOCS.names).cast(DOCS), synthetic])


def _pooled(vectors: np.ndarray, offsets: np.ndarray, block_rows: int = 1 << 18) -> np.ndarray:
    """Unit mean of each CSR set's rows, float32 (n_sets, dim), computed a block of sets at a time."""
    out = np.zeros((len(offsets) - 1, vectors.shape[1]), dtype=np.float32)
    first = 0
    while first < len(offsets) - 1:
        last = int(np.searchsorted(offsets, offsets[first] + block_rows, side="right")) - 1
        last = min(max(last, first + 1), len(offsets) - 1)
        lo, hi = int(offsets[first]), int(offsets[last])
        sums = np.add.reduceat(vectors[lo:hi].astype(np.float32), offsets[first:last] - lo, axis=0)
        out[first:last] = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        first = last
    return out


def _synthetic_fdes(vectors: np.ndarray, offsets: np.ndarray, config, out: np.ndarray, batch: int = 4096) -> None:
    """Document FDEs of CSR sets into ``out``, ``batch`` sets at a time (bounded temporaries)."""
    from tasks.fde import encode_documents

    for first in range(0, len(offsets) - 1, batch):
        last = min(first + batch, len(offsets) - 1)
        lo, hi = int(offsets[first]), int(offsets[last])
        out[first:last] = encode_documents(vectors[lo:hi], offsets[first : last + 1] - lo, config)


def build_base(source: Source, plan: CorpusPlan, folder: Path) -> tuple[dict[str, Any], np.ndarray]:
    """Write every artifact but the ANN index into ``folder``; return the facts and the FDE matrix.

    Order keeps the peak low: the flat token store (4.9 GB at 100k) is gathered, written and turned
    into FDEs, and freed before the FDEs (4.1 GB at 100k) are written and the ANN indexes built.
    """
    import pyarrow.parquet as pq

    from storage import index_files as files
    from storage.atomic import write_json, write_parquet
    from tasks.encode import flat_tokens_table
    from tasks.idf import document_frequencies
    from tasks.rerank import gather_rows

    started = time.perf_counter()
    reset_peak_rss()
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    syn = plan.synthetic
    real_rows, real_offsets = gather_rows(source.offsets, plan.real_chunks)
    offsets = np.concatenate([real_offsets, real_offsets[-1] + syn.offsets[1:]])
    rows = np.concatenate([real_rows, syn.rows])
    vectors = np.empty((len(rows), source.vectors.shape[1]), dtype=np.float16)
    np.take(source.vectors, rows, axis=0, out=vectors)
    token_ids = source.token_ids[rows]
    del rows
    n_real_rows = int(real_offsets[-1])
    pooled = np.concatenate([source.pooled[plan.real_chunks], _pooled(vectors[n_real_rows:], syn.offsets)])
    write_parquet(flat_tokens_table(np.arange(len(offsets) - 1), token_ids, vectors, offsets, pooled), folder / files.TOKENS_FILE, compression="none")
    config = source.fde_config()
    fde = np.empty((len(offsets) - 1, config.output_dim), dtype=np.float32)
    fde[: plan.n_real_chunks] = files.read_fde(source.folder / files.FDE_FILE)[plan.real_chunks]  # same settings: same FDEs
    _synthetic_fdes(vectors[n_real_rows:], syn.offsets, config, fde[plan.n_real_chunks :])
    del vectors, pooled
    release_memory()
    write_parquet(files.fde_table(fde), folder / files.FDE_FILE, compression="none")
    syn_ids, syn_texts = _synthetic_text(plan, source)
    chunks = _chunks_table(plan, source, syn_ids, syn_texts, token_ids[n_real_rows:])
    write_parquet(chunks, folder / files.CHUNKS_FILE)
    write_parquet(_docs_table(plan, source, syn_ids, syn_texts), folder / files.DOCS_FILE)
    write_parquet(document_frequencies(token_ids, offsets, chunks.column("doc_id")), folder / files.IDF_FILE)
    write_parquet(pq.read_table(source.folder / files.REJECTED_FILE), folder / files.REJECTED_FILE)
    facts = {
        "docs": plan.n_docs,
        "real_docs": len(plan.real_docs),
        "synthetic_docs": len(syn),
        "chunks": len(offsets) - 1,
        "real_chunks": plan.n_real_chunks,
        "tokens": int(offsets[-1]),
        "synthetic_tokens": int(syn.offsets[-1]),
        "synthetic_tokens_mean": round(float(np.diff(syn.offsets).mean()), 1) if len(syn) else None,
        "base_build_seconds": round(time.perf_counter() - started, 1),
        "base_build_peak_rss_gib": peak_rss_gib(),
    }
    write_json(facts, folder / "base.json")
    return facts, fde


def _link_base(base: Path, folder: Path) -> None:
    """Hard-link the shared artifacts into an index folder (one copy on disk for every ANN kind)."""
    for name in BASE_FILES:
        target = folder / name
        if target.exists():
            target.unlink()
        os.link(base / name, target)


def build_kind(source: Source, base: Path, facts: dict[str, Any], fde: np.ndarray, kind: str, folder: Path, key: str, recipe: dict[str, Any]) -> dict[str, Any]:
    """Build one ANN kind over the FDEs and write a complete index folder (manifest last)."""
    from storage import index_files as files
    from storage.manifest import library_versions, write_manifest
    from tasks.ann import ANNConfig, build_ann

    config = ANNConfig(kind=kind)
    reset_peak_rss()
    started = time.perf_counter()
    index, ann_facts = build_ann(fde, config, seed=source.manifest["fde"]["seed"])
    seconds = time.perf_counter() - started
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _link_base(base, folder)
    files.write_faiss(index, folder / files.ANN_FILE)
    del index
    release_memory()
    body = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "version": folder.parent.name + "-" + kind,
        "corpus": {"path": str(source.folder), "note": "scaling study corpus: real scifact rows plus synthetic distractors"},
        "model": source.manifest["model"],
        "chunking": source.manifest["chunking"],
        "encoding": source.manifest["encoding"],
        "fde": source.manifest["fde"],
        "ann": {**config.to_dict(), **ann_facts},
        "counts": {"docs": facts["docs"], "chunks": facts["chunks"], "tokens": facts["tokens"], "rejected": 0, "fde_dim": int(fde.shape[1])},
        "versions": library_versions(),
        "build_seconds": round(facts["base_build_seconds"] + seconds, 1),
        "build_key": key,
        "scaling": {"key": key, "recipe": recipe, "corpus": facts, "ann_build_seconds": round(seconds, 1), "ann_build_peak_rss_gib": peak_rss_gib()},
    }
    return write_manifest(folder, body, [*BASE_FILES, files.ANN_FILE])


def corpus_key(source: Source, n_docs: int, recipe: SyntheticRecipe, split: str) -> tuple[str, dict[str, Any]]:
    """The reuse key of a corpus: source index, size, split (judged documents), recipe and its version."""
    from storage.hashing import stable_key

    # the source's build key, not just its id: a rebuilt source (new FDE defaults, say) must not reuse old folders
    described = {"source_index_id": source.index_id, "source_build_key": source.manifest.get("build_key"), "docs": n_docs, "split": split, "recipe": recipe.to_dict(), "recipe_version": RECIPE_VERSION}
    return stable_key(described), described


def _reusable(folder: Path, key: str) -> dict[str, Any] | None:
    """The manifest of a complete index folder built with ``key``, else None."""
    from storage.manifest import IndexFormatError, read_manifest

    try:
        manifest = read_manifest(folder)
    except IndexFormatError:
        return None
    return manifest if manifest.get("scaling", {}).get("key") == key else None


def ensure_indexes(source: Source, n_docs: int, kinds: Sequence[str], recipe: SyntheticRecipe, split: str, judged: set[str], scale_dir: Path, reuse: bool) -> dict[str, dict[str, Any]]:
    """Build (or reuse) the index folder of every requested ANN kind for one size; return their manifests."""
    from storage import index_files as files

    key, described = corpus_key(source, n_docs, recipe, split)
    root = scale_dir / f"scifact-n{n_docs}-seed{recipe.seed}"
    manifests = {k: _reusable(root / k, key) for k in kinds} if reuse else {k: None for k in kinds}
    todo = [k for k in kinds if manifests[k] is None]
    if not todo:
        print(f"  n={n_docs}: reusing {', '.join(kinds)} under {root}", flush=True)
        return manifests  # type: ignore[return-value]
    base = root / "base"
    facts = _reusable_base(base, key) if reuse else None
    if facts is not None:
        fde = files.read_fde(base / files.FDE_FILE)
        print(f"  n={n_docs}: reusing the corpus in {base}", flush=True)
    else:
        print(f"  n={n_docs}: building the corpus in {base}", flush=True)
        facts, fde = build_base(source, plan_corpus(source, n_docs, judged, recipe), base)
        facts["key"] = key
        from storage.atomic import write_json

        write_json(facts, base / "base.json")
        print(f"  n={n_docs}: corpus built in {facts['base_build_seconds']} s (peak RSS {facts['base_build_peak_rss_gib']} GiB)", flush=True)
    for kind in todo:
        manifests[kind] = build_kind(source, base, facts, fde, kind, root / kind, key, described)
        scaling = manifests[kind]["scaling"]
        print(f"  n={n_docs}: {kind} index built in {scaling['ann_build_seconds']} s (peak RSS {scaling['ann_build_peak_rss_gib']} GiB)", flush=True)
    del fde
    release_memory()
    return manifests  # type: ignore[return-value]


def _reusable_base(base: Path, key: str) -> dict[str, Any] | None:
    """The facts of a complete shared-artifacts folder built with ``key``, else None."""
    try:
        facts = json.loads((base / "base.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    complete = all((base / name).is_file() for name in BASE_FILES)
    return facts if complete and facts.get("key") == key else None


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


@dataclass
class Queries:
    """The evaluated queries: nDCG set (hash-ordered subset) and the latency subset inside it."""

    qrels: dict[str, dict[str, int]]
    texts: dict[str, str]  # nDCG queries, latency subset first
    latency_ids: list[str]


def load_queries(dataset: Path, split: str, ndcg_queries: int, latency_queries: int) -> Queries:
    """Fixed subsets by a hash of the query ids; the latency subset is a subset of the nDCG set."""
    from evaluation.datasets import load_dataset, subsample

    full = load_dataset(dataset, split)
    ndcg = subsample(full, ndcg_queries)
    latency = [q for q in subsample(full, min(latency_queries, len(ndcg.queries))).queries]
    ordered = latency + [q for q in ndcg.queries if q not in set(latency)]
    return Queries(qrels=full.qrels, texts={q: ndcg.queries[q] for q in ordered}, latency_ids=latency)


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = call()
    return result, (time.perf_counter() - started) * 1000


def _as_run(index, ranked: list[tuple[int, float, int]]) -> dict[str, float]:
    return {index.doc_ids[d]: float(s) for d, s, _ in ranked}


def open_index(folder: Path, token_memory: str = "int8"):
    """Open an index folder as a user would (one query thread), then return freed memory to the OS.

    The corpora are written as float16 (one row group, see the module docstring), so the default
    ``token_memory="int8"`` serves them as a default index (int8 store) is served: int8 in memory.
    """
    from lateflow.engine import LateIndex

    release_memory()
    reset_peak_rss()
    index, seconds = _timed(lambda: LateIndex.open(folder, token_memory=token_memory))
    load_peak = peak_rss_gib()
    release_memory()
    return index, {"open_seconds": round(seconds / 1000, 1), "open_peak_rss_gib": load_peak, "rss_after_open_gib": rss_gib(), "token_dtype": str(index.tokens.vectors.dtype)}


def measure_kind(index, queries: Queries, with_exact: bool, exact_all: bool, warmup: int, exact_batch: int, exact_index: Any = None) -> dict[str, Any]:
    """fde-rerank on every nDCG query (and both brute forces, alternating, on the latency subset) on one opened index.

    ``maxsim-exact`` is ``rank_exhaustive`` on ``index`` itself: with its int8 store, the prefilter
    prunes what cannot reach the top (same results, the fastest exact method we have).
    ``maxsim-exact-plain`` scores every chunk exactly (``prefilter=False``) on ``exact_index``, the
    same folder opened with another token store (e.g. float32, plain brute force's fastest kernel;
    default: ``index``).
    """
    brute = exact_index or index
    fde = lambda text: index.rank(index.encode(text), DEPTH)  # noqa: E731 - the engine's default search
    exact = lambda text: index.rank_exhaustive([index.encode(text)], DEPTH)[0]  # noqa: E731
    plain = lambda text: brute.rank_exhaustive([brute.encode(text)], DEPTH, prefilter=False)[0]  # noqa: E731
    latency_texts = [queries.texts[q] for q in queries.latency_ids]
    for text in latency_texts[:warmup]:  # model, BLAS, FAISS and page-cache warm-up
        fde(text)
        if with_exact:
            exact(text)
            plain(text)
    runs: dict[str, dict[str, dict[str, float]]] = {"fde-rerank": {}, "maxsim-exact": {}, "maxsim-exact-plain": {}}
    ms: dict[str, dict[str, float]] = {"fde-rerank": {}, "maxsim-exact": {}, "maxsim-exact-plain": {}}
    for qid, text in queries.texts.items():
        ranked, ms["fde-rerank"][qid] = _timed(lambda: fde(text))
        runs["fde-rerank"][qid] = _as_run(index, ranked)
        if with_exact and qid in queries.latency_ids:
            for name, system in (("maxsim-exact", exact), ("maxsim-exact-plain", plain)):
                ranked, ms[name][qid] = _timed(lambda: system(text))
                runs[name][qid] = _as_run(index, ranked)
    if with_exact and exact_all:
        rest = [q for q in queries.texts if q not in runs["maxsim-exact"]]
        for first in range(0, len(rest), exact_batch):  # untimed: batched brute force, for nDCG only
            batch = rest[first : first + exact_batch]
            ranked = index.rank_exhaustive([index.encode(queries.texts[q]) for q in batch], DEPTH)
            runs["maxsim-exact"].update({q: _as_run(index, r) for q, r in zip(batch, ranked)})
    return {"runs": runs, "ms": ms}


def rerank_work(index, texts: Sequence[str]) -> dict[str, float]:
    """What fde-rerank re-scores per query (untimed): candidate documents, token rows scored, synthetic share.

    Uses the engine's own candidate step (default candidate count, widened to 10 documents as
    ``rank(q, 10)`` does) and its default rerank scope (the retrieved chunks, or every chunk of
    their documents), so it explains the rerank part of the latency.
    """
    from lateflow.engine import DEFAULT_CANDIDATES, DEFAULT_RERANK_SCOPE
    from tasks.rerank import gather_rows

    lengths = np.diff(index.tokens.offsets)
    docs_n, rows_n, synthetic = [], [], []
    for text in texts:
        docs, retrieved = index._candidates(index.encode(text), DEFAULT_CANDIDATES, DEPTH, None)
        chunks = np.unique(retrieved) if DEFAULT_RERANK_SCOPE == "chunks" else gather_rows(index.doc_chunk_offsets, docs)[0]
        docs_n.append(len(docs))
        rows_n.append(int(lengths[chunks].sum()))
        synthetic.append(np.mean([index.doc_ids[d].startswith("syn") for d in docs]) if len(docs) else 0.0)
    return {
        "candidate_docs_mean": round(float(np.mean(docs_n)), 1),
        "candidate_token_rows_mean": round(float(np.mean(rows_n))),
        "candidate_synthetic_share": round(float(np.mean(synthetic)), 4),
    }


def _latency(ms: dict[str, float], ids: Sequence[str]) -> dict[str, float] | None:
    from evaluation.systems import latency_summary

    values = [ms[q] for q in ids if q in ms]
    return latency_summary(values) if values else None


def _finite(value: float) -> float | None:
    """None for NaN (ranx's p-value of two identical runs), which strict JSON cannot hold."""
    return None if math.isnan(value) else value


def quality(qrels: dict[str, dict[str, int]], fde_run: dict[str, dict[str, float]], exact_run: dict[str, dict[str, float]]) -> dict[str, Any]:
    """nDCG@10 of both systems on the queries both answered, fde-rerank's on all, overlap, synthetic shares."""
    from evaluation.scoring import score_run, significance, to_qrels, to_run

    common = [q for q in fde_run if q in exact_run]
    out: dict[str, Any] = {"fde_queries": len(fde_run), "exact_queries": len(common)}
    out["fde_ndcg_all"] = score_run(to_qrels({q: qrels[q] for q in fde_run}), to_run(fde_run, "fde-rerank"), ("ndcg@10",))["ndcg@10"]
    synthetic = lambda run, ids: float(np.mean([sum(d.startswith("syn") for d in run[q]) / max(1, len(run[q])) for q in ids]))  # noqa: E731
    out["fde_synthetic_share_top10"] = round(synthetic(fde_run, list(fde_run)), 4)
    if not common:
        return out
    sub_qrels = to_qrels({q: qrels[q] for q in common})
    runs = {"fde-rerank": to_run({q: fde_run[q] for q in common}, "fde-rerank"), "maxsim-exact": to_run({q: exact_run[q] for q in common}, "maxsim-exact")}
    fde_ndcg = score_run(sub_qrels, runs["fde-rerank"], ("ndcg@10",))["ndcg@10"]
    exact_ndcg = score_run(sub_qrels, runs["maxsim-exact"], ("ndcg@10",))["ndcg@10"]
    test = significance(sub_qrels, runs, "maxsim-exact", ("ndcg@10",))
    out.update(
        fde_ndcg=fde_ndcg,
        exact_ndcg=exact_ndcg,
        share=round(fde_ndcg / exact_ndcg, 4) if exact_ndcg else None,
        p_value=_finite(test["systems"]["fde-rerank"]["ndcg@10"]["p_value"]),
        recall_of_exact_top10=round(float(np.mean([len(set(fde_run[q]) & set(exact_run[q])) / max(1, len(exact_run[q])) for q in common])), 4),
        exact_synthetic_share_top10=round(synthetic(exact_run, common), 4),
    )
    return out


STAGES = {
    # function in the profile -> stage of fde-rerank. A frame's own time goes to the innermost
    # enclosing function listed here, so the stages add up to the total whatever the engine's
    # internal call structure (the names of the engine and tasks/ at the time of writing)
    "encode": "query encoding",
    "query_fde": "query FDE",
    "search_ann": "ANN search",
    "gather_rows": "gather",
    "gather_sets": "gather",
    "maxsim_kernel": "MaxSim",
    "maxsim_candidates": "MaxSim",  # a fused gather + MaxSim kernel counts as MaxSim
    "group_max": "best chunk per doc",
    "candidate_documents": "candidates: other",
    "_score": "rerank: other",
    "rank": "rank: other",
}


def stage_times(root: Any, stages: dict[str, str] = STAGES) -> dict[str, float]:
    """Seconds per stage of a pyinstrument frame tree (self time -> innermost listed ancestor).

    Examples
    --------
    >>> from types import SimpleNamespace as F
    >>> kernel = F(function="maxsim_kernel", time=3.0, children=[])
    >>> tree = F(function="<module>", time=10.0, children=[F(function="rank", time=6.0, children=[kernel])])
    >>> sorted(stage_times(tree).items())
    [('MaxSim', 3.0), ('other', 4.0), ('rank: other', 3.0)]
    """
    totals: dict[str, float] = {}
    pending = [(root, "other")]
    while pending:
        frame, stage = pending.pop()
        stage = stages.get(frame.function, stage)
        own = frame.time - sum(child.time for child in frame.children)
        totals[stage] = totals.get(stage, 0.0) + own
        pending.extend((child, stage) for child in frame.children)
    return totals


def profile_fde_rerank(index, texts: Sequence[str]) -> dict[str, Any]:
    """Where fde-rerank's time goes: pyinstrument over the latency queries, per stage (ms per query).

    The sampling profiler adds a little overhead; the stage shares, not the total, are the point.
    """
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005)
    profiler.start()
    for text in texts:
        index.rank(index.encode(text), DEPTH)
    profiler.stop()
    root = profiler.last_session.root_frame()
    seconds = stage_times(root)
    order = list(dict.fromkeys([*STAGES.values(), "other"]))
    per_query = {stage: round(seconds[stage] * 1000 / len(texts), 2) for stage in order if stage in seconds}
    print(profiler.output_text(unicode=False, color=False, show_all=False), flush=True)
    return {"queries": len(texts), "ms_per_query": per_query, "total_ms_per_query": round(root.time * 1000 / len(texts), 2)}


def measure_size(size_label: str, manifests: dict[str, dict[str, Any]], folders: dict[str, Path], queries: Queries, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every ANN kind of one corpus size: latency, quality, memory; maxsim-exact beside the first kind."""
    rows, exact = [], None
    for kind, folder in folders.items():
        index, memory = open_index(folder, args.token_memory)
        n_docs = len(index)
        with_exact = exact is None
        exact_index = None
        if with_exact and args.exact_token_memory and args.exact_token_memory != args.token_memory:
            exact_index, _ = open_index(folder, args.exact_token_memory)
            memory["exact_token_dtype"] = str(exact_index.tokens.vectors.dtype)
        reset_peak_rss()
        print(f"  {size_label} {kind}: measuring {len(queries.texts)} queries{' + maxsim-exact' if with_exact else ''}", flush=True)
        measured = measure_kind(index, queries, with_exact, n_docs <= args.exact_all_max_docs, args.warmup, args.exact_batch, exact_index)
        del exact_index
        memory["measure_peak_rss_gib"] = peak_rss_gib()
        work = rerank_work(index, [queries.texts[q] for q in queries.latency_ids])
        if with_exact:
            exact = {"run": measured["runs"]["maxsim-exact"], "ms": measured["ms"]["maxsim-exact"], "plain_ms": measured["ms"]["maxsim-exact-plain"]}
            exact["plain_agrees"] = _same_top(measured["runs"]["maxsim-exact"], measured["runs"]["maxsim-exact-plain"])
        profile = profile_fde_rerank(index, [queries.texts[q] for q in queries.latency_ids]) if f"{size_label}:{kind}" in args.profile else None
        manifest = manifests[kind]
        scaling = manifest["scaling"]
        rows.append(
            {
                "size": size_label,
                "docs": n_docs,
                "real_docs": scaling["corpus"]["real_docs"],
                "synthetic_docs": scaling["corpus"]["synthetic_docs"],
                "chunks": index.tokens.n_chunks,
                "tokens": int(index.tokens.offsets[-1]),
                "ann": kind,
                "ann_facts": {k: v for k, v in manifest["ann"].items() if k not in ("kind", "dim", "ntotal")},
                "ann_build_seconds": scaling["ann_build_seconds"],
                "corpus_build_seconds": scaling["corpus"]["base_build_seconds"],
                "fde_rerank_ms": _latency(measured["ms"]["fde-rerank"], queries.latency_ids),
                "fde_rerank_ms_all_queries": _latency(measured["ms"]["fde-rerank"], list(queries.texts)),
                "maxsim_exact_ms": _latency(exact["ms"], queries.latency_ids),
                "maxsim_exact_plain_ms": _latency(exact["plain_ms"], queries.latency_ids),
                "maxsim_exact_plain_agrees": exact["plain_agrees"],
                "latency_queries": len(queries.latency_ids),
                "quality": quality(queries.qrels, measured["runs"]["fde-rerank"], exact["run"]),
                "rerank_work": work,
                "memory": memory,
                "profile": profile,
            }
        )
        print(f"  {size_label} {kind}: {summary_line(rows[-1])}", flush=True)
        del index
        release_memory()
    return rows


def _same_top(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], k: int = 10) -> float:
    """Share of the queries both runs answered whose top ``k`` document ids are the same, in order.

    Examples
    --------
    >>> _same_top({"q1": {"a": 2.0, "b": 1.0}, "q2": {"a": 1.0}}, {"q1": {"a": 2.0, "b": 1.0}, "q2": {"c": 1.0}})
    0.5
    """
    top = lambda run: [d for d, _ in sorted(run.items(), key=lambda item: -item[1])[:k]]  # noqa: E731
    common = [q for q in a if q in b]
    return round(sum(top(a[q]) == top(b[q]) for q in common) / len(common), 4) if common else 0.0


def ratio_target(size_label: str, docs: int) -> float | None:
    return RATIO_TARGETS.get(FULL) if size_label == FULL else RATIO_TARGETS.get(docs)


def summary_line(row: dict[str, Any]) -> str:
    f, e, q = row["fde_rerank_ms"], row["maxsim_exact_ms"], row["quality"]
    share = f"{q['share']:.2%}" if q.get("share") is not None else "n/a"
    p = row.get("maxsim_exact_plain_ms") or {}
    plain = f"; every chunk scored p50 {p['p50']:.1f} (1/{p['p50'] / f['p50']:.1f})" if p else ""
    return f"fde-rerank p50 {f['p50']:.1f} ms p95 {f['p95']:.1f}; maxsim-exact p50 {e['p50']:.1f} p95 {e['p95']:.1f}; ratio 1/{e['p50'] / f['p50']:.1f}{plain}; nDCG@10 share {share}"


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def growth(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ANN kind, log-log slopes of p50 latency against document count between consecutive sizes.

    A slope below 1 is sublinear growth. maxsim-exact's slopes are given for comparison.

    Examples
    --------
    >>> r = [{"ann": "flat", "docs": 1000, "tokens": 10, "fde_rerank_ms": {"p50": 10.0}, "maxsim_exact_ms": {"p50": 10.0}},
    ...      {"ann": "flat", "docs": 10000, "tokens": 100, "fde_rerank_ms": {"p50": 20.0}, "maxsim_exact_ms": {"p50": 100.0}}]
    >>> g = growth(r)[0]; round(g["fde_slope"], 2), round(g["exact_slope"], 2)
    (0.3, 1.0)
    """
    out = []
    for kind in dict.fromkeys(r["ann"] for r in rows):
        ordered = sorted((r for r in rows if r["ann"] == kind), key=lambda r: r["docs"])
        for a, b in zip(ordered, ordered[1:]):
            span = math.log(b["docs"] / a["docs"])
            exact_growth = math.log(b["maxsim_exact_ms"]["p50"] / a["maxsim_exact_ms"]["p50"])
            out.append(
                {
                    "ann": kind,
                    "from_docs": a["docs"],
                    "to_docs": b["docs"],
                    "fde_slope": math.log(b["fde_rerank_ms"]["p50"] / a["fde_rerank_ms"]["p50"]) / span,
                    "exact_slope": exact_growth / span,
                    # brute force costs time per token, and synthetic documents are short
                    "exact_slope_vs_tokens": exact_growth / math.log(b["tokens"] / a["tokens"]) if b["tokens"] != a["tokens"] else None,
                }
            )
    return out


def _knobs(row: dict[str, Any]) -> str:
    a = row["ann_facts"]
    if row["ann"] == "hnsw":
        return f"M={a['m']}, efC={a['ef_construction']}, efSearch={a['hnsw_ef_search']}"
    if row["ann"] == "ivfpq":
        return f"{a['lists']} lists, PQ{a['subquantizers']}x{a['bits']}, nprobe={min(a['ivf_nprobe'], a['lists'])}"
    return "exact inner product"


def _p(value: float | None) -> str:
    """A p-value; ranx gives NaN when the two runs score every query alike."""
    if value is None or math.isnan(value):
        return "-"
    return "< 1e-6" if value < 1e-6 else f"{value:.3g}"


def _pct(value: float | None) -> str:
    return f"{value:.2%}" if value is not None else "n/a"


def _latency_query_counts(report: dict[str, Any]) -> str:
    """How many queries latency was taken over: one number, or one per size when merged runs differ.

    Examples
    --------
    >>> _latency_query_counts({"latency_queries": 50, "rows": [{"size": "full", "latency_queries": 100}, {"size": "100000", "latency_queries": 50}]})
    '100 (full) / 50 (100000)'
    >>> _latency_query_counts({"latency_queries": 100, "rows": [{"size": "full", "latency_queries": 100}]})
    '100'
    """
    per_size = {r["size"]: r.get("latency_queries", report["latency_queries"]) for r in report["rows"]}
    if len(set(per_size.values())) <= 1:
        return str(next(iter(per_size.values()), report["latency_queries"]))
    return " / ".join(f"{n} ({size})" for size, n in per_size.items())


def render(report: dict[str, Any]) -> str:
    """The Markdown report: corpora, latency/quality table, growth, memory, and profiles."""
    rows = report["rows"]
    lines = [
        f"Scaling study on {report['dataset']} ({report['split']}): fde-rerank (`index.rank(index.encode(q), 10)`, "
        f"{report['candidates']} candidate chunks) vs maxsim-exact (`index.rank_exhaustive([index.encode(q)], 10)` on the same "
        "opening: the int8 prefilter re-scores exactly only what can reach the top, the fastest exact brute force here) and "
        "brute force scoring every chunk (`prefilter=False`"
        f"{', on a ' + report['exact_token_memory'] + ' opening of the folder' if report.get('exact_token_memory') else ''}), query "
        f"encoding included, one query thread, after {report['warmup']} warm-up queries; the three alternate query by query.",
        "",
        f"machine: {report['machine_line']}",
        "",
        f"Latency over a fixed {_latency_query_counts(report)} of the test queries (hash of their ids); nDCG@10 over "
        f"{report['ndcg_queries']} queries ({report['exact_note']}). Synthetic distractors: real token rows resampled "
        f"from non-judged scifact chunks ({report['recipe']['min_runs']}..{report['recipe']['max_runs']} runs, mean "
        f"{report['recipe']['mean_tokens']:g} tokens, seed {report['recipe']['seed']}; recipe in the module docstring of "
        "`evaluation/benchmarks/scaling.py`).",
        "",
        "| size | docs (real + synthetic) | chunks | tokens | ANN | knobs | fde-rerank p50 / p95 ms | maxsim-exact p50 / p95 ms | ratio (p50) | target | every chunk scored p50 / p95 ms (same top 10) | ratio to it | nDCG@10 fde / exact (q) | share | fde nDCG@10 (all q) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, e, q = r["fde_rerank_ms"], r["maxsim_exact_ms"], r["quality"]
        target = ratio_target(r["size"], r["docs"])
        ratio = f["p50"] / e["p50"]
        target_text = f"1/{round(1 / target)} {'met' if ratio <= target else 'not met'}" if target else "-"
        quality_text = f"{q['fde_ndcg']:.4f} / {q['exact_ndcg']:.4f} ({q['exact_queries']})" if "exact_ndcg" in q else "n/a"
        share = q.get("share")
        share_text = f"{_pct(share)} {'met' if share is not None and share >= SHARE_TARGET else 'not met'}" if share is not None else "n/a"
        p = r.get("maxsim_exact_plain_ms")
        plain_text = f"{p['p50']:.1f} / {p['p95']:.1f} ({r['maxsim_exact_plain_agrees']:.0%}) | 1/{p['p50'] / f['p50']:.1f}" if p else "- | -"
        lines.append(
            f"| {r['size']} | {r['docs']:,} ({r['real_docs']:,} + {r['synthetic_docs']:,}) | {r['chunks']:,} | {r['tokens']:,} | {r['ann']} | {_knobs(r)} "
            f"| {f['p50']:.1f} / {f['p95']:.1f} | {e['p50']:.1f} / {e['p95']:.1f} | 1/{e['p50'] / f['p50']:.1f} | {target_text} | {plain_text} | {quality_text} | {share_text} "
            f"| {q['fde_ndcg_all']:.4f} ({q['fde_queries']}) |"
        )
    lines += [
        "",
        "Targets: fde-rerank p50 <= 1/20 of maxsim-exact's at 5k (the full corpus) and <= 1/100 at 100k; nDCG@10 share >= 99.5%.",
        "",
        "Quality detail: recall of maxsim-exact's top 10 by fde-rerank, paired t-test p (nDCG@10), share of synthetic documents in each top 10.",
        "",
        "| size | ANN | recall of exact top-10 | p (t-test) | synthetic in fde top-10 | synthetic in exact top-10 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = r["quality"]
        lines.append(
            f"| {r['size']} | {r['ann']} | {q.get('recall_of_exact_top10', float('nan')):.3f} | {_p(q.get('p_value'))} "
            f"| {_pct(q.get('fde_synthetic_share_top10'))} | {_pct(q.get('exact_synthetic_share_top10'))} |"
        )
    lines += [
        "",
        "What fde-rerank re-scores per query (latency queries; the engine's candidate step and rerank scope): candidate documents, token rows scored, synthetic share.",
        "",
        "| size | ANN | candidate docs | token rows scored | synthetic among candidates |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        w = r.get("rerank_work")
        if w:
            lines.append(f"| {r['size']} | {r['ann']} | {w['candidate_docs_mean']:.0f} | {w['candidate_token_rows_mean']:,} | {_pct(w['candidate_synthetic_share'])} |")
    lines += [
        "",
        "Growth of p50 latency with corpus size (log-log slope of latency against documents, and for brute force also against "
        "tokens; < 1 is sublinear):",
        "",
        "| ANN | from -> to docs | fde-rerank vs docs | maxsim-exact vs docs | maxsim-exact vs tokens |",
        "|---|---|---|---|---|",
    ]
    for g in report["growth"]:
        per_token = f"{g['exact_slope_vs_tokens']:.2f}" if g.get("exact_slope_vs_tokens") is not None else "-"
        lines.append(f"| {g['ann']} | {g['from_docs']:,} -> {g['to_docs']:,} | {g['fde_slope']:.2f} | {g['exact_slope']:.2f} | {per_token} |")
    lines += [
        "",
        "Builds, memory and disk (peak RSS: the kernel's high-water mark, reset before each phase):",
        "",
        "| size | ANN | corpus build s | ANN build s | open s | peak RSS opening GiB | RSS open GiB | peak RSS measuring GiB | token store held as |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["memory"]
        lines.append(
            f"| {r['size']} | {r['ann']} | {r['corpus_build_seconds']} | {r['ann_build_seconds']} | {m['open_seconds']} | {m['open_peak_rss_gib']} "
            f"| {m['rss_after_open_gib']} | {m['measure_peak_rss_gib']} | {m['token_dtype']}{' (every-chunk brute force: ' + m['exact_token_dtype'] + ')' if m.get('exact_token_dtype') else ''} |"
        )
    lines += ["", "| size | synthetic tokens (mean per doc) | corpus build s | corpus build peak RSS GiB | ANN build s / peak RSS GiB | disk GiB |", "|---|---|---|---|---|---|"]
    for size, c in report["corpora"].items():
        ann = ", ".join(f"{k} {c['ann_build_seconds'][k]} s / {v}" for k, v in c["ann_build_peak_rss_gib"].items())
        lines.append(
            f"| {size} | {c['synthetic_tokens']:,} ({c['synthetic_tokens_mean'] or 0:g}) | {c['base_build_seconds']} | {c['base_build_peak_rss_gib']} | {ann} | {c['disk_gib']} |"
        )
    lines += ["", f"Whole process peak RSS {report['process_peak_rss_gib']} GiB; {report['scale_dir_disk_gib']} GiB under the scale folder."]
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        # stages in pipeline order, leaving out those no profiled configuration spent 0.05 ms on
        seen = {s for r in profiled for s, ms in r["profile"]["ms_per_query"].items() if ms >= 0.05}
        stages = [s for s in dict.fromkeys([*STAGES.values(), "other"]) if s in seen]
        lines += ["", "Where fde-rerank's time goes (pyinstrument, ms per query over the latency queries):", "", "| size | ANN | " + " | ".join(stages) + " | total |", "|---" * (len(stages) + 3) + "|"]
        for r in profiled:
            p = r["profile"]
            lines.append(f"| {r['size']} | {r['ann']} | " + " | ".join(f"{p['ms_per_query'].get(s, 0.0):.1f}" for s in stages) + f" | {p['total_ms_per_query']:.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_size(text: str) -> str | int:
    """``full`` or a positive document count."""
    if text == FULL:
        return FULL
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a size must be 'full' or a positive count, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[1000, FULL, 10000], help="document counts, 'full' = the real corpus (default: 1000 full 10000; add 100000 for the opt-in large size)")
    parser.add_argument("--ann", nargs="+", choices=ANN_KINDS, default=list(ANN_KINDS), help="FAISS index kinds (default: all three)")
    parser.add_argument("--dataset", type=Path, default=REPO.parent / "shared" / "datasets" / "scifact", help="BEIR folder with the queries and qrels")
    parser.add_argument("--split", default="test", help="qrels split (default test)")
    parser.add_argument("--source-index", type=Path, default=Path("/work/idx/scifact"), help="index of the real corpus, only read (default /work/idx/scifact)")
    parser.add_argument("--scale-dir", type=Path, default=Path("/work/scale"), help="where the corpora's index folders go (default /work/scale)")
    parser.add_argument("--reuse", action="store_true", help="use existing folders built with the same recipe instead of rebuilding them")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and the synthetic documents (default 0)")
    parser.add_argument("--synthetic-mean-tokens", type=float, default=48.0, help="mean length of a synthetic document (default 48; see the memory note)")
    parser.add_argument("--min-runs", type=int, default=2, help="fewest real-chunk runs per synthetic document (default 2)")
    parser.add_argument("--max-runs", type=int, default=4, help="most real-chunk runs per synthetic document (default 4)")
    parser.add_argument("--ndcg-queries", type=int, default=300, help="queries for nDCG@10 (default 300: all of scifact test)")
    parser.add_argument("--latency-queries", type=int, default=100, help="queries timed for p50/p95 (default 100)")
    parser.add_argument("--exact-all-max-docs", type=int, default=20000, help="above this many documents maxsim-exact runs on the latency queries only (default 20000)")
    parser.add_argument("--exact-batch", type=int, default=16, help="queries per brute-force batch for the untimed nDCG runs (default 16)")
    parser.add_argument("--token-memory", default="int8", choices=["int8", "float32", "float16", "auto"], help="LateIndex token_memory (default int8: as a default index, whose store is int8, is served)")
    parser.add_argument(
        "--exact-token-memory", default=None, choices=["int8", "float32", "float16", "auto"],
        help="token_memory of a second opening of the same folder that the every-chunk brute force runs on (default: the same "
        "as --token-memory); float32 gives it its fastest kernel (maxsim-exact itself runs on the served opening, with the prefilter)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up queries per opened index (default 3)")
    parser.add_argument("--profile", nargs="*", default=[], metavar="SIZE:KIND", help="profile fde-rerank with pyinstrument on these configurations, e.g. full:flat 100000:hnsw")
    parser.add_argument("--merge", action="store_true", help="keep the rows of other sizes already in the --out JSON (e.g. add 100k to a 1k-10k run)")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks" / "scaling-scifact.md", help="Markdown report (+ .json beside it)")
    return parser


def corpus_facts(n_docs: int, root: Path, manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Counts, build costs and disk use of one size's corpus (from its manifests)."""
    corpus = next(iter(manifests.values()))["scaling"]["corpus"]
    return {
        **{k: v for k, v in corpus.items() if k != "key"},
        "docs": n_docs,
        "folder": str(root),
        "ann_build_peak_rss_gib": {k: m["scaling"]["ann_build_peak_rss_gib"] for k, m in manifests.items()},
        "ann_build_seconds": {k: m["scaling"]["ann_build_seconds"] for k, m in manifests.items()},
        "disk_gib": disk_gib(root),
    }


def _merged(report: dict[str, Any], out: Path) -> dict[str, Any]:
    """Rows and corpora of sizes this run did not measure, taken from the previous report."""
    try:
        previous = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return report
    sizes = {r["size"] for r in report["rows"]}
    rows = [r for r in previous.get("rows", []) if r["size"] not in sizes] + report["rows"]
    rows.sort(key=lambda r: (r["docs"], ANN_KINDS.index(r["ann"])))
    corpora = {**{k: v for k, v in previous.get("corpora", {}).items() if k not in report["corpora"]}, **report["corpora"]}
    return {**report, "rows": rows, "corpora": dict(sorted(corpora.items(), key=lambda kv: kv[1]["docs"])), "merged_from_previous_run": sorted({r["size"] for r in rows} - sizes)}


def main(argv: list[str] | None = None) -> int:
    from evaluation.machine import describe_machine, machine_line
    from lateflow.engine import DEFAULT_CANDIDATES

    args = build_parser().parse_args(argv)
    args.profile = set(args.profile)
    machine = describe_machine()
    print(f"machine: {machine_line(machine)}", flush=True)
    recipe = SyntheticRecipe(mean_tokens=args.synthetic_mean_tokens, min_runs=args.min_runs, max_runs=args.max_runs, seed=args.seed)
    queries = load_queries(args.dataset, args.split, args.ndcg_queries, args.latency_queries)
    judged = {d for judgments in queries.qrels.values() for d in judgments}
    source = Source.open(args.source_index)
    source_facts = {"source_index": str(source.folder), "source_index_id": source.index_id}
    # build every size first, then let the source go: measuring 100k needs the room
    built = {}
    for size in args.sizes:
        n_docs = len(source.doc_ids) if size == FULL else int(size)
        built[FULL if size == FULL else str(size)] = (n_docs, ensure_indexes(source, n_docs, args.ann, recipe, args.split, judged, args.scale_dir, args.reuse))
    del source
    release_memory()
    rows: list[dict[str, Any]] = []
    corpora: dict[str, dict[str, Any]] = {}
    header = {
        "dataset": args.dataset.name,
        "split": args.split,
        "machine": machine,
        "machine_line": machine_line(machine),
        **source_facts,
        "candidates": DEFAULT_CANDIDATES,
        "warmup": args.warmup,
        "exact_token_memory": args.exact_token_memory,
        "ndcg_queries": len(queries.texts),
        "latency_queries": len(queries.latency_ids),
        "exact_note": f"maxsim-exact on all of them up to {args.exact_all_max_docs:,} documents, on the latency queries above",
        "recipe": recipe.to_dict(),
    }
    for label, (n_docs, manifests) in built.items():
        root = args.scale_dir / f"scifact-n{n_docs}-seed{recipe.seed}"
        corpora[label] = corpus_facts(n_docs, root, manifests)
        rows.extend(measure_size(label, manifests, {kind: root / kind for kind in args.ann}, queries, args))
        # saved after every size, so a failure at a large size keeps the smaller ones (printed at the end)
        report = assemble_report(header, rows, corpora, args)
        save_report(report, args.out, echo=label == list(built)[-1])
    return 0


def assemble_report(header: dict[str, Any], rows: list[dict[str, Any]], corpora: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The report's JSON: header, rows, corpora, whole-run memory and disk, growth (merged with the previous run on --merge)."""
    report = {
        **header,
        "rows": list(rows),
        "corpora": dict(corpora),
        "process_peak_rss_gib": process_peak_rss_gib(),
        "scale_dir_disk_gib": disk_gib(args.scale_dir),
    }
    if args.merge:
        report = _merged(report, args.out)
    report["growth"] = growth(report["rows"])
    return report


def save_report(report: dict[str, Any], out: Path, echo: bool) -> None:
    """Write the Markdown and JSON; print the Markdown only when ``echo``."""
    from storage.atomic import atomic_path, write_json

    if echo:
        print_and_save(render(report), report, out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(render(report) + "\n", encoding="utf-8")
    write_json(report, out.with_suffix(".json"))

if __name__ == "__main__":
    raise SystemExit(main())
