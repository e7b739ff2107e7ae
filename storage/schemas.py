"""Arrow schemas of every Parquet artifact in an index folder.

The schemas are plain Arrow types so that any Parquet reader (pyarrow, pandas, DuckDB, Spark) can
open the artifacts without lateflow.
"""
from __future__ import annotations

import pyarrow as pa

DOCS = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("text", pa.string()),
        # corpus fields other than _id/title/text, as a JSON object string (kept for filters and display)
        pa.field("metadata", pa.string()),
        pa.field("content_hash", pa.string(), nullable=False),
    ]
)

REJECTED = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("line", pa.int64()),
        pa.field("reason", pa.string(), nullable=False),
    ]
)

CHUNKS = pa.schema(
    [
        pa.field("chunk_id", pa.int64(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("ordinal", pa.int32(), nullable=False),
        # character offsets into the document's full text (title + "\n" + text, see tasks.chunk)
        pa.field("char_start", pa.int32(), nullable=False),
        pa.field("char_end", pa.int32(), nullable=False),
        # token offsets into the document's token sequence (model tokenizer, no special tokens)
        pa.field("token_start", pa.int32(), nullable=False),
        pa.field("token_end", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
    ]
)


def tokens_schema(dim: int, codec: str = "float16") -> pa.Schema:
    """Token-embedding store: per chunk, the kept token ids, their unit vectors, and the pooled vector.

    ``codec`` (see :mod:`storage.token_codec`) is the number format of the vectors: float16 (what
    the encoder writes, and every segment cache file) or a compressed one for the assembled index.

    Examples
    --------
    >>> field = tokens_schema(384, "int8").field("embeddings")
    >>> field.metadata[b"dtype"], field.metadata[b"codec"], b"codec" in tokens_schema(384).field("embeddings").metadata
    (b'|i1', b'int8', False)
    """
    from storage.token_codec import get_codec

    spec = get_codec(codec)
    meta = {"dtype": spec.dtype, "dim": str(dim), "layout": "row-major (n_tokens, dim)"}
    if spec.name != "float16":
        # float16 files keep the metadata they always had (no "codec" key means float16)
        meta.update(codec=spec.name, scheme=spec.description)
    return pa.schema(
        [
            pa.field("chunk_id", pa.int64(), nullable=False),
            pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
            # the chunk's (n_tokens, dim) matrix (float16 unless "codec" says otherwise), little-endian,
            # row-major, as raw bytes: Parquet decodes a nested list<fixed_size_list<float16>> value by
            # value (30 s for scifact's 1.8M tokens), a binary column in one piece (1 s);
            # np.frombuffer(..., metadata "dtype").reshape(-1, dim)
            pa.field("embeddings", pa.large_binary(), nullable=False, metadata=meta),
            # unit mean-pooled vector of the chunk (all real tokens): the single-vector baseline
            pa.field("pooled", pa.list_(pa.float16(), dim), nullable=False),
        ]
    )


def fde_schema(dim: int) -> pa.Schema:
    """One MUVERA FDE (float32) per chunk."""
    return pa.schema(
        [
            pa.field("chunk_id", pa.int64(), nullable=False),
            pa.field("fde", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )
