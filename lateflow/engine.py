"""The loaded index: one in-process object that answers queries without the Prefect engine.

It holds the encoder, the FDE parameters, the FAISS index over chunk FDEs and the token store.
A query is encoded, turned into a query FDE, the ANN returns the top ``candidates`` chunks, those
chunks are re-scored by exact MaxSim (with ``scope="documents"``: every chunk of their documents),
and a document's score is the best of its scored chunks. On an int8 token store an int8 first pass
with a proven error bound skips the chunks that cannot reach the top k (:mod:`tasks.rerank_prune`):
the top k are those of the exact rerank, at about half its cost. The CLI, the batch flows and the
HTTP service all go through :class:`LateIndex`.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq

from storage import index_files as files
from storage.manifest import IndexFormatError, read_manifest, resolve_index_dir
from tasks.ann import ANNConfig, configure_search, search_ann, to_device
from tasks.encode import PRECISIONS, UNREADABLE_QUERY, EncoderConfig, load_encoder, resolve_model_path
from tasks.fde import FDEConfig, encode_query
from tasks.idf import idf_lookup
from tasks.prf import PRFConfig, expand_query, expansion_embeddings
from tasks.rerank import gather_rows, group_max, maxsim_candidates, maxsim_exhaustive
from tasks.rerank_prune import maxsim_exhaustive_top_groups, maxsim_top_groups

# ANN chunks reranked per query. On scifact train (300 queries, top-10 asked, unfilled FDEs, HNSW;
# evaluation/benchmarks/candidates_sweep.py) 100 / 200 / 300 / 400 candidates found 90.0 / 95.0 /
# 96.7 / 97.6% of the exact MaxSim top-10, at nDCG@10 differences within noise, and the rerank cost
# is linear in the count. nDCG@10 on 300 queries is too noisy to choose by, so the rule is the
# smallest count that finds >= 97% of the exact top-10 on train: 400. (200 looked free on train,
# 99.5% of exact nDCG@10, but cost 1.3% on scifact test, where it found 93.7% of the exact top-10.)
DEFAULT_CANDIDATES = 400

# What the exact rerank scores: "chunks" = only the chunks the ANN returned (a document scores as its
# best retrieved chunk); "documents" = every chunk of every candidate document. On scifact train
# (300 queries, top-10, evaluation/benchmarks/candidates_sweep.py --scopes) chunk scope reranks ~2/3
# of the token rows and is the better trade at every count: 400 chunks found 97.0% of the exact
# top-10 in 41 ms against 96.6% for 300 candidates' whole documents in 46 ms (97.5% at 400 in 55
# ms), at nDCG@10 within noise; on scifact test both scopes score 0.7325 at 400 candidates.
RERANK_SCOPES = ("chunks", "documents")
DEFAULT_RERANK_SCOPE = "chunks"


def set_query_threads(n: int) -> None:
    """Set torch's, FAISS's and numpy's BLAS thread counts for a process that answers queries (see :meth:`LateIndex.open`)."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(max(1, n))
    faiss.omp_set_num_threads(max(1, n))
    # numpy's OpenBLAS too: its pool woke both cores for each small per-candidate product, and with
    # another process busy the rerank's ~300 small products took 1.8 s instead of 40 ms (measured)
    threadpool_limits(limits=max(1, n), user_api="blas")


TOKEN_MEMORY = ("auto", "float32", "float16", "int8")


def _token_memory_dtype(choice: str, n_values: int, codec: str = "float16") -> type:
    """float32, float16 or int8 for a token store of ``n_values`` numbers written in ``codec`` (see :meth:`LateIndex.open`)."""
    if choice not in TOKEN_MEMORY:
        raise ValueError(f"token_memory must be one of {TOKEN_MEMORY}, got {choice!r}")
    if choice == "auto":
        if codec != "float16":
            return np.int8  # the codes themselves (int8) or within their own error (int4): no loss, a quarter of float32
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        return np.float32 if 4 * n_values <= ram / 4 else np.int8
    return {"float32": np.float32, "float16": np.float16, "int8": np.int8}[choice]


def _load_token_store(path: Path, manifest: dict[str, Any], token_memory: str) -> files.TokenStore:
    """The token store in its in-memory form (see :meth:`LateIndex.open`), whatever codec it was written in.

    The form is chosen from the manifest's token count and codec before reading, so a compressed
    store (:mod:`storage.token_codec`) goes straight into it, without a float16 intermediate.
    """
    tokens, dim = manifest.get("counts", {}).get("tokens"), manifest.get("model", {}).get("dim")
    codec = manifest.get("token_store", {}).get("codec", "float16")
    if tokens is not None and dim:
        return files.read_token_store(path, _token_memory_dtype(token_memory, int(tokens) * int(dim), codec))
    store = files.read_token_store(path)  # a manifest without counts: decide from the store itself
    wanted = _token_memory_dtype(token_memory, store.vectors.size, files.token_codec_of(path))
    if wanted == np.int8:
        from storage.token_codec import int8_rows

        store.vectors, store.row_scale = int8_rows(store.vectors, "float16")
    elif wanted == np.float32:
        store.vectors = store.vectors.astype(np.float32)
    return store


def _match_key(value: Any) -> tuple[str, Any] | None:
    """Hashable key under which a metadata value is matched; None for values that are not scalars.

    Booleans get their own kind because Python counts ``True == 1``; ints and floats share one
    (``2 == 2.0`` in JSON terms).

    Examples
    --------
    >>> _match_key(True), _match_key(1) == _match_key(1.0), _match_key({"a": 1})
    (('bool', True), True, None)
    """
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("num", value)
    if isinstance(value, str):
        return ("str", value)
    if value is None:
        return ("null", None)
    return None


def filter_keys(filter: Mapping[str, Any]) -> dict[str, set[tuple[str, Any]]]:
    """Validate a metadata filter; return, per field, the set of accepted value keys.

    A filter maps a metadata field to a scalar (equality) or a list of scalars ("any of"); all
    fields must match. Raises ValueError for anything else, naming the field.

    Examples
    --------
    >>> filter_keys({"source": "x", "year": [2020, 2021]})["year"] == {("num", 2020), ("num", 2021)}
    True
    >>> filter_keys({"source": {"nested": 1}})
    Traceback (most recent call last):
    ...
    ValueError: filter field 'source': values must be strings, numbers, booleans or null (or a list of them)
    """
    if not isinstance(filter, Mapping):
        raise ValueError(f"a filter must map metadata fields to values, got {type(filter).__name__}")
    keys: dict[str, set[tuple[str, Any]]] = {}
    for name, wanted in filter.items():
        values = wanted if isinstance(wanted, (list, tuple)) else [wanted]
        if not values:  # "any of nothing" would silently return no result at all
            raise ValueError(f"filter field {name!r}: an empty list matches no document; give at least one value")
        accepted = {_match_key(v) for v in values}
        if None in accepted:
            raise ValueError(f"filter field {name!r}: values must be strings, numbers, booleans or null (or a list of them)")
        keys[str(name)] = accepted  # type: ignore[assignment]
    return keys


@dataclass
class SearchHit:
    """One retrieved document with its best chunk (what a RAG application feeds its LLM)."""

    doc_id: str
    score: float
    rank: int
    chunk_id: int
    text: str
    char_start: int
    char_end: int
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _ScoredCandidates:
    """Candidate documents' chunks and their per-chunk MaxSim scores."""

    chunk_ids: np.ndarray
    group_offsets: np.ndarray  # document i owns chunk_ids[group_offsets[i]:group_offsets[i+1]]
    chunk_scores: np.ndarray

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        """Per document: the best chunk's score and that chunk's id."""
        if len(self.group_offsets) <= 1:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        best, arg = group_max(self.chunk_scores, self.group_offsets)
        return best, self.chunk_ids[arg]

    def with_chunk_scores(self, chunk_scores: np.ndarray) -> "_ScoredCandidates":
        return _ScoredCandidates(self.chunk_ids, self.group_offsets, chunk_scores)


@dataclass
class QueryTokens:
    """An encoded query: unit vectors (float32), their token ids, and per-token weights (PRF)."""

    vectors: np.ndarray
    token_ids: np.ndarray
    pooled: np.ndarray | None = None
    weights: np.ndarray | None = None


class LateIndex:
    """An opened lateflow index folder. Thread-safe for concurrent searches.

    Use :meth:`open`; see the module docstring for how a query is answered.
    """

    def __init__(
        self, path: Path, manifest: dict[str, Any], device: str | None = None, ann: ANNConfig | None = None, token_memory: str = "auto",
        query_precision: str | None = None, rerank_prefilter: bool = True,
    ) -> None:
        if query_precision is not None and query_precision not in PRECISIONS:
            raise ValueError(f"query_precision must be one of {PRECISIONS} or None, got {query_precision!r}")
        if device is not None:
            from tasks.encode import select_device

            select_device(device)  # an unknown device, or cuda without a GPU: a ValueError now, not at the first query
        self.path = path
        self.query_precision = query_precision or manifest["encoding"]["precision"]
        self.manifest = manifest
        self.device = device
        self.rerank_prefilter = rerank_prefilter
        self.fde_config = FDEConfig.from_dict(manifest["fde"])
        chunks = pq.read_table(path / files.CHUNKS_FILE, columns=["doc_id", "ordinal", "char_start", "char_end", "text"])
        self.chunk_doc_ids = chunks.column("doc_id").to_pylist()
        self.chunk_text = chunks.column("text")
        self.chunk_char_start = chunks.column("char_start").to_numpy()
        self.chunk_char_end = chunks.column("char_end").to_numpy()
        # chunks of a document are contiguous: doc i owns chunks doc_chunk_offsets[i]:doc_chunk_offsets[i+1]
        doc_of_chunk = np.array(self.chunk_doc_ids, dtype=object)
        starts = np.concatenate([[0], np.flatnonzero(doc_of_chunk[1:] != doc_of_chunk[:-1]) + 1]).astype(np.int64)
        self.doc_chunk_offsets = np.append(starts, len(doc_of_chunk))
        self.doc_ids = [self.chunk_doc_ids[s] for s in starts]
        self.chunk_doc = np.repeat(np.arange(len(self.doc_ids)), np.diff(self.doc_chunk_offsets))
        docs = pq.read_table(path / files.DOCS_FILE, columns=["doc_id", "title", "metadata"])
        doc_rows = {d: i for i, d in enumerate(docs.column("doc_id").to_pylist())}
        missing = [d for d in self.doc_ids if d not in doc_rows]
        if missing:
            raise IndexFormatError(f"{path / files.DOCS_FILE}: no row for chunk documents such as {missing[0]!r}")
        titles, metas = docs.column("title").to_pylist(), docs.column("metadata").to_pylist()
        self.doc_titles = [titles[doc_rows[d]] or "" for d in self.doc_ids]
        self.doc_metadata = [metas[doc_rows[d]] for d in self.doc_ids]
        self.tokens = _load_token_store(path / files.TOKENS_FILE, manifest, token_memory)
        if self.tokens.n_chunks != len(self.chunk_doc_ids):
            raise IndexFormatError(f"{path / files.TOKENS_FILE}: {self.tokens.n_chunks} chunks, chunks.parquet has {len(self.chunk_doc_ids)}")
        self.ann_config = ann or ANNConfig(**{k: v for k, v in manifest["ann"].items() if k in ANNConfig.__dataclass_fields__})
        index = files.read_faiss(path / files.ANN_FILE)
        if index.ntotal != self.tokens.n_chunks or index.d != self.fde_config.output_dim:
            raise IndexFormatError(f"{path / files.ANN_FILE}: {index.ntotal} x {index.d} vectors, expected {self.tokens.n_chunks} x {self.fde_config.output_dim}")
        configure_search(index, self.ann_config)
        self.ann = to_device(index)
        idf_table = pq.read_table(path / files.IDF_FILE)
        vocab = int(idf_table.column("token_id").to_numpy().max(initial=0)) + 1
        self.idf = idf_lookup(idf_table, max(vocab, int(self.tokens.token_ids.max(initial=0)) + 1))
        self._encoder_lock = threading.Lock()
        self._encoder = None
        # metadata field -> value key -> doc indices, built on the first filtered search
        self._postings: dict[str, dict[tuple[str, Any], np.ndarray]] | None = None
        self._postings_lock = threading.Lock()

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, path: str | os.PathLike, *, device: str | None = None, verify: bool = False, ann: ANNConfig | None = None,
        query_threads: int | None = 1, token_memory: str = "auto", query_precision: str | None = None,
        rerank_prefilter: bool = True,
    ) -> "LateIndex":
        """Open an index folder built by ``lateflow index``.

        Parameters
        ----------
        path
            The index folder (its current version is opened; :attr:`path` is that version's folder).
        device
            Encoder device (None: cuda when present, else cpu).
        verify
            Also check every artifact's sha256 against the manifest (reads every byte).
        ann
            Override search-time ANN knobs (``hnsw_ef_search``, ``ivf_nprobe``).
        query_threads
            Threads of torch, FAISS and numpy's BLAS in this process (None: leave them alone). One query gains
            little from more threads on a CPU, while torch's, OpenBLAS's and FAISS's pools spinning
            against each other on 2 cores made query encoding ~1.5x and the PRF k-means ~5x slower
            (measured); serve concurrency by answering several queries at once instead. Bulk
            encoding and ANN builds in the same process still use every core.
        token_memory
            ``float32``, ``float16``, ``int8`` or ``auto``: how the token store is held in memory.
            MaxSim is computed in float32 products. ``int8`` keeps per-vector codes and one scale
            per token (a quarter of float32; the kernels scale similarities instead of decoding
            rows); converting float16 rows on every query cost about as much as the product itself
            (numpy and torch alike, measured). ``auto``: int8 for a store written as int8 or int4
            (the codes are what it holds anyway), else float32 when that takes at most a quarter
            of the machine's RAM, else int8.
        query_precision
            Precision of the query encoder (``fp32``, ``bf16``, ``int8``; None: the precision the
            documents were encoded at). See BENCHMARKS.md section 5.3 before changing it: a query
            encoder at another precision than the documents' is faster but moves the query
            vectors away from the ones the index was built for.
        rerank_prefilter
            Rerank an int8 token store in two steps (:mod:`tasks.rerank_prune`): every candidate
            scored with an int8 query, then exact MaxSim only for the chunks that can still reach
            the top ``k`` under the int8 scores' error bound. The top ``k``, their order and scores
            are those of the one-step exact rerank (a theorem, and tested); about 2x faster on
            scifact (BENCHMARKS.md). False: score every candidate exactly. Not used with PRF, whose
            expansion re-scores every first-pass candidate.
        """
        # a versioned index folder: read the current version's folder (resolved once, so every file
        # comes from the same version even if a new one is switched in meanwhile)
        path = resolve_index_dir(Path(path))
        manifest = read_manifest(path, verify_hashes=verify)
        if query_threads is not None:
            set_query_threads(query_threads)
        return cls(
            path, manifest, device=device, ann=ann, token_memory=token_memory, query_precision=query_precision, rerank_prefilter=rerank_prefilter
        )

    @property
    def encoder(self):
        """The query encoder, loaded on first use (opening an index for inspection stays cheap)."""
        if self._encoder is None:
            with self._encoder_lock:
                if self._encoder is None:
                    enc = self.manifest["encoding"]
                    config = EncoderConfig(
                        # "default" resolves through the installed package, so an index moves between machines
                        model_path=resolve_model_path(self.manifest["model"].get("spec") or self.manifest["model"]["path"]),
                        precision=self.query_precision,
                        drop_punctuation=enc["drop_punctuation"],
                        max_query_tokens=enc.get("max_query_tokens", 128),
                    )
                    self._encoder = load_encoder(config, self.device)
        return self._encoder

    @property
    def index_id(self) -> str:
        return self.manifest["index_id"]

    def __len__(self) -> int:
        return len(self.doc_ids)

    # -- query side ------------------------------------------------------------------------------
    def encode(self, query: str) -> QueryTokens:
        """Encode one query (raises ValueError for an empty one)."""
        token_ids, vectors, pooled = self.encoder.encode_query(query)
        return QueryTokens(vectors=vectors, token_ids=token_ids, pooled=pooled)

    def encode_many(self, queries: Sequence[str]) -> list[QueryTokens]:
        """Encode many queries in length-bucketed batches."""
        return [QueryTokens(vectors=v, token_ids=t, pooled=p) for t, v, p in self.encoder.encode_queries(queries)]

    def query_fde(self, query: QueryTokens) -> np.ndarray:
        """The query's FDE; token weights (PRF) scale their vectors, which the FDE sums linearly."""
        vectors = query.vectors if query.weights is None else query.vectors * query.weights[:, None]
        return encode_query(vectors, self.fde_config)

    def filter_mask(self, filter: Mapping[str, Any] | None) -> np.ndarray | None:
        """Boolean mask over documents that match a metadata filter (None for no filter).

        ``{"source": "x", "year": [2020, 2021]}`` keeps documents whose metadata ``source`` equals
        ``"x"`` and whose ``year`` is 2020 or 2021. A document whose field holds a list matches when
        any element does. A document without the field never matches. Raises ValueError for a
        malformed filter (see :func:`filter_keys`).
        """
        if not filter:
            return None
        wanted = filter_keys(filter)
        postings = self._metadata_postings()
        mask = np.ones(len(self.doc_ids), dtype=bool)
        for name, keys in wanted.items():
            field_mask = np.zeros(len(self.doc_ids), dtype=bool)
            for key in keys:
                docs = postings.get(name, {}).get(key)
                if docs is not None:
                    field_mask[docs] = True
            mask &= field_mask
        return mask

    def _metadata_postings(self) -> dict[str, dict[tuple[str, Any], np.ndarray]]:
        """Inverted index of scalar metadata values, so a filter costs a few array ops, not a JSON scan."""
        if self._postings is None:
            with self._postings_lock:  # one build even when the first filtered searches arrive together
                if self._postings is None:
                    postings: dict[str, dict[tuple[str, Any], list[int]]] = {}
                    for doc, raw in enumerate(self.doc_metadata):
                        for name, value in (json.loads(raw) if raw else {}).items():
                            for item in value if isinstance(value, list) else [value]:
                                key = _match_key(item)
                                if key is not None:
                                    postings.setdefault(name, {}).setdefault(key, []).append(doc)
                    self._postings = {n: {k: np.unique(d) for k, d in v.items()} for n, v in postings.items()}
        return self._postings

    def _search_chunks(self, query: QueryTokens, n: int, min_docs: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """ANN top chunks (scores, rows) for the query FDE, widened until they cover ``min_docs`` documents.

        Long documents own many chunks, so the top ``n`` chunks may name fewer than ``min_docs``
        documents; the ANN is then asked for 4x more until enough documents or every chunk is seen.
        With ``allowed`` (a mask over documents), chunks of other documents are dropped and the
        search widens until ``n`` allowed chunks covering ``min_docs`` allowed documents are found (or
        every chunk is seen): a filtered search reranks as many candidates as an unfiltered one.
        """
        if allowed is not None and not allowed.any():
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        want, fde = n, self.query_fde(query)[None, :]
        while True:
            scores, rows = search_ann(self.ann, fde, n)
            valid = rows[0] >= 0
            scores, rows = scores[0][valid], rows[0][valid]
            if allowed is not None:
                keep = allowed[self.chunk_doc[rows]]
                scores, rows = scores[keep], rows[keep]
            docs = self.chunk_doc[rows]
            enough = len(np.unique(docs)) >= min_docs
            if allowed is not None:
                enough = enough and len(rows) >= want
            if n >= self.ann.ntotal or enough:
                break
            n *= 4
        if allowed is not None:
            # the last widening may overshoot: keep the top `want` chunks, or more if the
            # min_docs-th distinct document only appears further down
            _, first = np.unique(docs, return_index=True)
            needed = np.sort(first)[min(min_docs, len(first)) - 1] + 1 if len(first) else 0
            cut = max(want, int(needed))
            scores, rows = scores[:cut], rows[:cut]
            if not enough:
                scores, rows = self._add_unreached_chunks(scores, rows, allowed)
        return scores, rows

    def _add_unreached_chunks(self, scores: np.ndarray, rows: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ANN's rows, then every other chunk of the allowed documents (score ``-inf``: unranked).

        An approximate index can leave vectors out however many are asked for (IVF reads ``nprobe``
        lists, HNSW walks about ``efSearch`` nodes), so a filtered search whose widening reached the
        whole index without enough matching chunks would return fewer than ``k`` documents although
        ``k`` match. The exact rerank scores the added chunks, so such a search ranks the matching
        documents it needs exactly (all of them, if the filter is that selective).
        """
        missing = np.flatnonzero(allowed[self.chunk_doc])
        missing = missing[~np.isin(missing, rows)]
        if len(missing) == 0:
            return scores, rows
        return np.concatenate([scores, np.full(len(missing), -np.inf, np.float32)]), np.concatenate([rows, missing])

    def candidate_documents(self, query: QueryTokens, candidates: int, min_docs: int = 1, allowed: np.ndarray | None = None) -> np.ndarray:
        """Documents of the ANN's top ``candidates`` chunks (at least ``min_docs`` of them), first-seen order.

        ``allowed`` (a mask over documents, see :meth:`filter_mask`) restricts them to matching documents.
        """
        return self._candidates(query, candidates, min_docs, allowed)[0]

    def _candidates(self, query: QueryTokens, candidates: int, min_docs: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Candidate documents (first-seen order) and the chunk rows the ANN returned for them."""
        _, rows = self._search_chunks(query, candidates, min_docs, allowed)
        docs = self.chunk_doc[rows]
        _, first = np.unique(docs, return_index=True)
        return docs[np.sort(first)], rows

    def score_documents(self, query: QueryTokens, doc_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact (weighted) MaxSim of every chunk of the given documents; (best score, best chunk) per doc."""
        return self._score(query, doc_indices).best()

    def _score(
        self, query: QueryTokens, doc_indices: np.ndarray, chunk_rows: np.ndarray | None = None, top: int | None = None
    ) -> "_ScoredCandidates":
        """Score the documents' chunks (all of them, or only ``chunk_rows``); keep the chunk ids for a PRF pass.

        With ``top`` (and the prefilter on), only what can reach the top ``top`` documents is scored
        exactly; the other chunks score ``-inf`` (see :mod:`tasks.rerank_prune`).
        """
        if chunk_rows is None:
            chunk_ids, group_offsets = gather_rows(self.doc_chunk_offsets, doc_indices)
        else:
            chunk_ids, group_offsets = self._group_chunks(doc_indices, chunk_rows)
        return self._score_chunks(query, chunk_ids, group_offsets, top)

    def _score_chunks(self, query: QueryTokens, chunk_ids: np.ndarray, group_offsets: np.ndarray, top: int | None = None) -> "_ScoredCandidates":
        store = self.tokens
        if top is not None and self.rerank_prefilter:
            chunk_scores, _ = maxsim_top_groups(query.vectors, store.vectors, store.offsets, chunk_ids, group_offsets, top, query.weights, store.row_scale)
        else:
            chunk_scores = maxsim_candidates(query.vectors, store.vectors, store.offsets, chunk_ids, query.weights, store.row_scale)
        return _ScoredCandidates(chunk_ids, group_offsets, chunk_scores)

    def _group_chunks(self, doc_indices: np.ndarray, chunk_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``chunk_rows`` (each a chunk of one of ``doc_indices``) grouped by document in ``doc_indices`` order.

        Returns the chunk ids and offsets such that document i owns ``chunk_ids[offsets[i]:offsets[i+1]]``.
        """
        rows = np.unique(chunk_rows)
        doc_order = np.argsort(doc_indices, kind="stable")
        owner = doc_order[np.searchsorted(doc_indices, self.chunk_doc[rows], sorter=doc_order)]
        group = np.argsort(owner, kind="stable")
        offsets = np.zeros(len(doc_indices) + 1, dtype=np.int64)
        np.cumsum(np.bincount(owner, minlength=len(doc_indices)), out=offsets[1:])
        return rows[group], offsets

    def rank(
        self,
        query: QueryTokens,
        k: int = 10,
        *,
        candidates: int = DEFAULT_CANDIDATES,
        prf: PRFConfig | None = None,
        filter: Mapping[str, Any] | None = None,
        scope: str = DEFAULT_RERANK_SCOPE,
    ) -> list[tuple[int, float, int]]:
        """FDE + ANN candidates, exact MaxSim rerank, optional ColBERT-PRF.

        Returns ``(doc index, score, best chunk id)``, best first. With ``prf`` in ``rerank`` mode the
        first-pass candidates are re-scored with the expanded query; in ``retrieve`` mode the expanded
        query goes through FDE + ANN again and its candidates are re-scored with it. With ``filter``
        (see :meth:`filter_mask`) only matching documents are candidates, in both passes. ``scope``
        (see ``RERANK_SCOPES``) says whether every chunk of a candidate document is scored or only
        the chunks the ANN returned.
        """
        if scope not in RERANK_SCOPES:
            raise ValueError(f"scope must be one of {RERANK_SCOPES}, got {scope!r}")
        _require_tokens(query)
        only_retrieved = scope == "chunks"
        allowed = self.filter_mask(filter)
        docs, rows = self._candidates(query, candidates, k, allowed)
        # without PRF only the top k matter: the prefilter may skip what cannot reach them
        scored = self._score(query, docs, rows if only_retrieved else None, top=k if prf is None else None)
        scores, best_chunks = scored.best()
        if prf is not None:
            order = np.argsort(-scores, kind="stable")
            expanded = self.expand(query, docs[order[: prf.fb_docs]], prf)
            if query.weights is None and len(expanded.vectors) > len(query.vectors):
                # weighted MaxSim is a sum over query tokens, and the original ones keep weight 1: the
                # expanded score of a first-pass document is its first-pass score plus the expansion
                # tokens' part (about 4x less work than re-scoring); only documents new to the
                # second pass are scored from scratch
                n = len(query.vectors)
                extra = maxsim_candidates(
                    expanded.vectors[n:], self.tokens.vectors, self.tokens.offsets, scored.chunk_ids, expanded.weights[n:], self.tokens.row_scale
                )
                scores, best_chunks = scored.with_chunk_scores(scored.chunk_scores + extra).best()
                if prf.mode == "retrieve":
                    second_docs, second_rows = self._candidates(expanded, candidates, k, allowed)
                    docs, scores, best_chunks = self._merge_second_pass(
                        expanded, docs, scores, best_chunks, second_docs, second_rows if only_retrieved else None
                    )
            else:
                if prf.mode == "retrieve":
                    docs, rows = self._candidates(expanded, candidates, k, allowed)
                    rescored = self._score(expanded, docs, rows if only_retrieved else None)
                else:
                    rescored = self._score_chunks(expanded, scored.chunk_ids, scored.group_offsets)
                scores, best_chunks = rescored.best()
        order = np.argsort(-scores, kind="stable")[:k]
        # a document none of whose chunks could be scored (-inf) is not a result, even when k is larger
        return [(int(docs[i]), float(scores[i]), int(best_chunks[i])) for i in order if np.isfinite(scores[i])]

    def _merge_second_pass(
        self, expanded: QueryTokens, first_docs: np.ndarray, first_scores: np.ndarray, first_chunks: np.ndarray, second_docs: np.ndarray,
        second_rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores of the second pass's documents: reused where the first pass already has them.

        New documents are scored on every chunk, or on their ``second_rows`` (retrieved chunks) when given.
        """
        position = {int(d): i for i, d in enumerate(first_docs)}
        known = np.array([int(d) in position for d in second_docs], dtype=bool)
        scores = np.empty(len(second_docs), np.float32)
        chunks = np.empty(len(second_docs), np.int64)
        reuse = np.array([position[int(d)] for d in second_docs[known]], dtype=np.int64)
        scores[known], chunks[known] = first_scores[reuse], first_chunks[reuse]
        if (~known).any():
            new_docs = second_docs[~known]
            rows = None if second_rows is None else second_rows[np.isin(self.chunk_doc[second_rows], new_docs)]
            scores[~known], chunks[~known] = self._score(expanded, new_docs, rows).best()
        return second_docs, scores, chunks

    def expand(self, query: QueryTokens, feedback_docs: np.ndarray, prf: PRFConfig) -> QueryTokens:
        """ColBERT-PRF: append IDF-weighted centroids of the feedback documents' tokens to the query."""
        if len(feedback_docs) == 0:
            return query
        chunk_ids, _ = gather_rows(self.doc_chunk_offsets, feedback_docs)
        rows, _ = gather_rows(self.tokens.offsets, chunk_ids)
        expansion = expansion_embeddings(self.tokens.unit_vectors(rows), self.tokens.token_ids[rows], self.idf, prf)
        vectors, weights = expand_query(query.vectors, expansion)
        # FDEs are linear in the query tokens, so weighting a token = scaling its vector in the query FDE
        return QueryTokens(vectors=vectors, token_ids=np.concatenate([query.token_ids, expansion.token_ids]), pooled=query.pooled, weights=weights)

    def rank_fde_only(self, query: QueryTokens, k: int = 10) -> list[tuple[int, float, int]]:
        """FDE + ANN only, no rerank: a document's score is its best chunk's FDE inner product."""
        _require_tokens(query)
        scores, rows = self._search_chunks(query, k * 2, k)
        return self.documents_of_chunks(scores, rows, k)

    def documents_of_chunks(self, scores: np.ndarray, rows: np.ndarray, k: int) -> list[tuple[int, float, int]]:
        """Turn a best-first chunk ranking into the first ``k`` distinct documents (score of their best chunk)."""
        out, seen = [], set()
        for score, row in zip(scores, rows):
            if row < 0:
                continue
            doc = int(self.chunk_doc[row])
            if doc not in seen:
                seen.add(doc)
                out.append((doc, float(score), int(row)))
                if len(out) == k:
                    break
        return out

    def rank_exhaustive(
        self, queries: Sequence[QueryTokens], k: int = 100, *, prefilter: bool | None = None
    ) -> list[list[tuple[int, float, int]]]:
        """Brute-force MaxSim over every chunk of every document: the quality ceiling (no ANN).

        With an int8 store in memory and the prefilter on (``prefilter``, default: the index's
        ``rerank_prefilter``), every chunk is scored by the bounded int8 pass of
        :mod:`tasks.rerank_prune` and only those that can reach the top ``k`` are re-scored exactly:
        the same top ``k`` documents, order, scores and best chunks as scoring every chunk exactly
        (``prefilter=False``) up to float rounding (exact ties, e.g. duplicate documents, may come
        in another order), ~4.6x faster on scifact, ~3.7x at 100k short documents (BENCHMARKS.md 5.2, 5.5).
        """
        for query in queries:
            _require_tokens(query)
        vectors = [q.vectors for q in queries]
        if self.rerank_prefilter if prefilter is None else prefilter:
            chunk_scores = maxsim_exhaustive_top_groups(vectors, self.tokens.vectors, self.tokens.offsets, self.doc_chunk_offsets, k, self.tokens.row_scale)
        else:
            chunk_scores = maxsim_exhaustive(vectors, self.tokens.vectors, self.tokens.offsets, row_scale=self.tokens.row_scale)
        results = []
        for row in chunk_scores:
            best, arg = group_max(row, self.doc_chunk_offsets)
            top = np.argsort(-best, kind="stable")[:k]
            results.append([(int(d), float(best[d]), int(arg[d])) for d in top if np.isfinite(best[d])])
        return results

    def hit(self, doc: int, score: float, chunk: int, rank: int) -> SearchHit:
        """Materialise one result with its best chunk's text and offsets."""
        meta = self.doc_metadata[doc]
        return SearchHit(
            doc_id=self.doc_ids[doc],
            score=score,
            rank=rank,
            chunk_id=chunk,
            text=self.chunk_text[chunk].as_py(),
            char_start=int(self.chunk_char_start[chunk]),
            char_end=int(self.chunk_char_end[chunk]),
            title=self.doc_titles[doc],
            metadata=json.loads(meta) if meta else {},
        )

    def search(
        self,
        query: str,
        k: int = 10,
        *,
        candidates: int = DEFAULT_CANDIDATES,
        prf: PRFConfig | None = None,
        filter: Mapping[str, Any] | None = None,
        scope: str = DEFAULT_RERANK_SCOPE,
    ) -> list[SearchHit]:
        """Top ``k`` documents for a query text (FDE + ANN candidates, exact MaxSim rerank).

        Parameters
        ----------
        query
            The query text; an empty query raises ValueError.
        k
            Number of documents to return (at least 1).
        candidates
            Number of chunks the ANN returns before reranking; more is slower and closer to exact.
        prf
            ColBERT-PRF settings (None: no feedback), see :class:`tasks.prf.PRFConfig`.
        filter
            Metadata filter such as ``{"source": "x"}`` or ``{"year": [2020, 2021]}`` (a list means
            any of; every field must match; see :meth:`filter_mask`). Non-matching documents never
            appear, and ``k`` results come back whenever at least ``k`` documents match.
        scope
            ``documents`` (every chunk of a candidate document is scored) or ``chunks`` (only the
            chunks the ANN returned), see ``RERANK_SCOPES``.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {candidates}")
        if scope not in RERANK_SCOPES:
            raise ValueError(f"scope must be one of {RERANK_SCOPES}, got {scope!r}")
        if filter:
            filter_keys(filter)  # a malformed filter fails before the encoder runs
        ranked = self.rank(self.encode(query), k, candidates=max(candidates, k), prf=prf, filter=filter, scope=scope)
        return [self.hit(d, s, c, r) for r, (d, s, c) in enumerate(ranked, start=1)]


def _require_tokens(query: QueryTokens) -> None:
    """Refuse a query without token vectors (the encoder kept none): it would rank by nothing."""
    if len(query.vectors) == 0:
        raise ValueError(UNREADABLE_QUERY)
