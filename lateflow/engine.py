"""The loaded index: one in-process object that answers queries without the Prefect engine.

It holds the encoder, the FDE parameters, the FAISS index over chunk FDEs and the token store.
A query is encoded, turned into a query FDE, the ANN returns the top ``candidates`` chunks, their
documents become the candidate set, every chunk of those documents is re-scored by exact MaxSim,
and a document's score is the best of its chunks. The CLI, the batch flows and the HTTP service all
go through :class:`LateIndex`.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq

from storage import index_files as files
from storage.manifest import IndexFormatError, read_manifest
from tasks.ann import ANNConfig, configure_search, search_ann, to_device
from tasks.encode import EncoderConfig, load_encoder, resolve_model_path
from tasks.fde import FDEConfig, encode_query
from tasks.idf import idf_lookup
from tasks.prf import PRFConfig, expand_query, expansion_embeddings
from tasks.rerank import gather_rows, group_max, maxsim_candidates, maxsim_exhaustive

DEFAULT_CANDIDATES = 200


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

    def __init__(self, path: Path, manifest: dict[str, Any], device: str | None = None, ann: ANNConfig | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.device = device
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
        self.tokens = files.read_token_store(path / files.TOKENS_FILE)
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

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, device: str | None = None, verify: bool = False, ann: ANNConfig | None = None) -> "LateIndex":
        """Open an index folder built by ``lateflow index``.

        Parameters
        ----------
        path
            The index folder.
        device
            Encoder device (None: cuda when present, else cpu).
        verify
            Also check every artifact's sha256 against the manifest (reads every byte).
        ann
            Override search-time ANN knobs (``hnsw_ef_search``, ``ivf_nprobe``).
        """
        path = Path(path)
        manifest = read_manifest(path, verify_hashes=verify)
        return cls(path, manifest, device=device, ann=ann)

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
                        precision=enc["precision"],
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

    def _search_chunks(self, query: QueryTokens, n: int, min_docs: int) -> tuple[np.ndarray, np.ndarray]:
        """ANN top chunks (scores, rows) for the query FDE, widened until they cover ``min_docs`` documents.

        Long documents own many chunks, so the top ``n`` chunks may name fewer than ``min_docs``
        documents; the ANN is then asked for 4x more until enough documents or every chunk is seen.
        """
        fde = self.query_fde(query)[None, :]
        while True:
            scores, rows = search_ann(self.ann, fde, n)
            valid = rows[0] >= 0
            scores, rows = scores[0][valid], rows[0][valid]
            if n >= self.ann.ntotal or len(np.unique(self.chunk_doc[rows])) >= min_docs:
                return scores, rows
            n *= 4

    def candidate_documents(self, query: QueryTokens, candidates: int, min_docs: int = 1) -> np.ndarray:
        """Documents of the ANN's top ``candidates`` chunks (at least ``min_docs`` of them), first-seen order."""
        _, rows = self._search_chunks(query, candidates, min_docs)
        docs = self.chunk_doc[rows]
        _, first = np.unique(docs, return_index=True)
        return docs[np.sort(first)]

    def score_documents(self, query: QueryTokens, doc_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact (weighted) MaxSim of every chunk of the given documents; (best score, best chunk) per doc."""
        if len(doc_indices) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        chunk_ids, group_offsets = gather_rows(self.doc_chunk_offsets, doc_indices)
        scores = maxsim_candidates(query.vectors, self.tokens.vectors, self.tokens.offsets, chunk_ids, query.weights)
        best, arg = group_max(scores, group_offsets)
        return best, chunk_ids[arg]

    def rank(
        self, query: QueryTokens, k: int = 10, *, candidates: int = DEFAULT_CANDIDATES, prf: PRFConfig | None = None
    ) -> list[tuple[int, float, int]]:
        """FDE + ANN candidates, exact MaxSim rerank, optional ColBERT-PRF.

        Returns ``(doc index, score, best chunk id)``, best first. With ``prf`` in ``rerank`` mode the
        first-pass candidates are re-scored with the expanded query; in ``retrieve`` mode the expanded
        query goes through FDE + ANN again and its candidates are re-scored with it.
        """
        docs = self.candidate_documents(query, candidates, min_docs=k)
        scores, best_chunks = self.score_documents(query, docs)
        if prf is not None:
            order = np.argsort(-scores, kind="stable")
            expanded = self.expand(query, docs[order[: prf.fb_docs]], prf)
            if prf.mode == "retrieve":
                docs = self.candidate_documents(expanded, candidates, min_docs=k)
            scores, best_chunks = self.score_documents(expanded, docs)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(int(docs[i]), float(scores[i]), int(best_chunks[i])) for i in order]

    def expand(self, query: QueryTokens, feedback_docs: np.ndarray, prf: PRFConfig) -> QueryTokens:
        """ColBERT-PRF: append IDF-weighted centroids of the feedback documents' tokens to the query."""
        if len(feedback_docs) == 0:
            return query
        chunk_ids, _ = gather_rows(self.doc_chunk_offsets, feedback_docs)
        rows, _ = gather_rows(self.tokens.offsets, chunk_ids)
        expansion = expansion_embeddings(self.tokens.vectors[rows], self.tokens.token_ids[rows], self.idf, prf)
        vectors, weights = expand_query(query.vectors, expansion)
        # FDEs are linear in the query tokens, so weighting a token = scaling its vector in the query FDE
        return QueryTokens(vectors=vectors, token_ids=np.concatenate([query.token_ids, expansion.token_ids]), pooled=query.pooled, weights=weights)

    def rank_fde_only(self, query: QueryTokens, k: int = 10) -> list[tuple[int, float, int]]:
        """FDE + ANN only, no rerank: a document's score is its best chunk's FDE inner product."""
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

    def rank_exhaustive(self, queries: Sequence[QueryTokens], k: int = 100) -> list[list[tuple[int, float, int]]]:
        """Brute-force MaxSim over every chunk of every document: the quality ceiling (no ANN)."""
        chunk_scores = maxsim_exhaustive([q.vectors for q in queries], self.tokens.vectors, self.tokens.offsets)
        results = []
        for row in chunk_scores:
            best, arg = group_max(row, self.doc_chunk_offsets)
            top = np.argsort(-best, kind="stable")[:k]
            results.append([(int(d), float(best[d]), int(arg[d])) for d in top])
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

    def search(self, query: str, k: int = 10, *, candidates: int = DEFAULT_CANDIDATES, prf: PRFConfig | None = None) -> list[SearchHit]:
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
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {candidates}")
        ranked = self.rank(self.encode(query), k, candidates=max(candidates, k), prf=prf)
        return [self.hit(d, s, c, r) for r, (d, s, c) in enumerate(ranked, start=1)]
