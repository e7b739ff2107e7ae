"""Baselines a user would pick instead of lateflow: BM25 (bm25s) and a single-vector dense index.

* ``bm25``: the ``bm25s`` library (Lucene BM25 variant, k1=1.2, b=0.75 as in Elasticsearch/BEIR),
  English stop words, over the same full text lateflow indexes (title + body).
* ``dense``: one mean-pooled vector per chunk from the same encoder (sentence-transformers mean
  pooling, computed during encoding and stored in ``tokens.parquet``), searched exactly with a FAISS
  inner-product index; a document's score is its best chunk's.
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq

from storage import index_files as files
from storage.corpus import full_text


class BM25Baseline:
    """BM25 over an index's documents, answering one query at a time."""

    def __init__(self, index_dir, k1: float = 1.2, b: float = 0.75) -> None:
        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG
        self._bm25s = bm25s
        docs = pq.read_table(index_dir / files.DOCS_FILE, columns=["doc_id", "title", "text"])
        self.doc_ids = docs.column("doc_id").to_pylist()
        texts = [full_text(t or "", x or "") for t, x in zip(docs.column("title").to_pylist(), docs.column("text").to_pylist())]
        self.retriever = bm25s.BM25(method="lucene", k1=k1, b=b)
        self.retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        """Top ``k`` (doc id, score); a query with no indexed term returns nothing."""
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not any(len(ids) for ids in tokens.ids):
            return []
        k = min(k, len(self.doc_ids))
        results, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [(self.doc_ids[int(i)], float(s)) for i, s in zip(results[0], scores[0]) if s > 0]


class DenseBaseline:
    """Single-vector (mean-pooled) search over the chunks of a lateflow index."""

    def __init__(self, index) -> None:
        import faiss

        pooled = files.read_pooled(index.path / files.TOKENS_FILE)
        self.index = index
        self.faiss = faiss.IndexFlatIP(pooled.shape[1])
        self.faiss.add(pooled)

    def search_vector(self, pooled: np.ndarray, k: int) -> list[tuple[int, float, int]]:
        """Top ``k`` documents as (doc index, score, best chunk) for a pooled query vector."""
        n = min(self.faiss.ntotal, max(4 * k, k + 32))
        scores, rows = self.faiss.search(np.ascontiguousarray(pooled[None, :], dtype=np.float32), n)
        return self.index.documents_of_chunks(scores[0], rows[0], k)

    def search(self, query: str, k: int) -> list[tuple[int, float, int]]:
        return self.search_vector(self.index.encode(query).pooled, k)
