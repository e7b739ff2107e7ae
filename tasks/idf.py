"""Document frequencies of token ids over the whole index (ColBERT-PRF ranks expansion tokens by IDF).

Computed once at index time and stored as ``idf.parquet`` (``token_id``, ``df``; the document count
is in the table's metadata), so PRF at query time is a lookup.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def document_frequencies(token_ids: np.ndarray, offsets: np.ndarray, chunk_doc_ids: pa.ChunkedArray | pa.Array) -> pa.Table:
    """Count, for each token id, the documents (not chunks) that contain it.

    Examples
    --------
    >>> t = document_frequencies(np.array([5, 5, 7, 5]), np.array([0, 2, 3, 4]), pa.array(["a", "a", "b"]))
    >>> sorted(zip(t.column("token_id").to_pylist(), t.column("df").to_pylist())), t.schema.metadata[b"documents"]
    ([(5, 2), (7, 1)], b'2')
    """
    doc_codes = pa.chunked_array([chunk_doc_ids]) if isinstance(chunk_doc_ids, pa.Array) else chunk_doc_ids
    codes = doc_codes.combine_chunks().dictionary_encode().indices.to_numpy(zero_copy_only=False).astype(np.int64)
    n_docs = int(codes.max()) + 1 if len(codes) else 0
    token_doc = np.repeat(codes, np.diff(offsets))
    # unique (document, token) pairs, then count documents per token
    pairs = np.unique(token_doc * (int(token_ids.max(initial=0)) + 1) + token_ids.astype(np.int64))
    vocab = int(token_ids.max(initial=0)) + 1
    tokens = pairs % vocab
    unique_tokens, counts = np.unique(tokens, return_counts=True)
    table = pa.table({"token_id": pa.array(unique_tokens.astype(np.int32)), "df": pa.array(counts.astype(np.int64))})
    return table.replace_schema_metadata({"documents": str(n_docs)})


def idf_lookup(table: pa.Table, vocab_size: int) -> np.ndarray:
    """A dense float32 IDF array indexed by token id: ``ln((1 + N) / (df + 1))`` (unseen ids: df = 0).

    Examples
    --------
    >>> t = pa.table({"token_id": pa.array([1], pa.int32()), "df": [3]}).replace_schema_metadata({"documents": "3"})
    >>> [round(float(x), 3) for x in idf_lookup(t, 3)]
    [1.386, 0.0, 1.386]
    """
    n_docs = int(table.schema.metadata[b"documents"])
    df = np.zeros(vocab_size, dtype=np.float64)
    df[table.column("token_id").to_numpy()] = table.column("df").to_numpy()
    return np.log((1.0 + n_docs) / (df + 1.0)).astype(np.float32)
