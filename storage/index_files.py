"""Names of the artifacts in an index folder and readers that turn them into flat numpy arrays."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from storage.atomic import atomic_path
from storage.manifest import IndexFormatError

DOCS_FILE = "docs.parquet"
CHUNKS_FILE = "chunks.parquet"
TOKENS_FILE = "tokens.parquet"
FDE_FILE = "fde.parquet"
ANN_FILE = "ann.faiss"
REJECTED_FILE = "rejected.parquet"
IDF_FILE = "idf.parquet"
CACHE_DIR = ".cache"


@dataclass
class TokenStore:
    """Every chunk's kept token vectors as one flat float16 matrix with CSR offsets.

    ``vectors[offsets[i]:offsets[i+1]]`` and ``token_ids[...]`` belong to chunk ``i``.
    """

    vectors: np.ndarray  # (total_tokens, dim) float16 as stored (LateIndex may widen it to float32)
    token_ids: np.ndarray  # (total_tokens,) int32
    offsets: np.ndarray  # (n_chunks + 1,) int64

    @property
    def n_chunks(self) -> int:
        return len(self.offsets) - 1


def _read(path: Path | str, columns: list[str] | None = None) -> pa.Table:
    from storage import fs  # shard files of a distributed run may sit behind a URL

    try:
        return fs.read_parquet(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise IndexFormatError(f"{path}: unreadable Parquet ({exc})") from exc


def read_token_store(path: str | os.PathLike) -> TokenStore:
    """Load ``tokens.parquet`` into a :class:`TokenStore` (checks that chunk ids are 0..n-1 in order)."""
    table = _read(path, ["chunk_id", "token_ids", "embeddings"])
    chunk_ids = table.column("chunk_id").to_numpy()
    if not np.array_equal(chunk_ids, np.arange(len(chunk_ids))):
        raise IndexFormatError(f"{path}: chunk_id must run 0..n-1 in row order")
    ids_col = table.column("token_ids").combine_chunks()
    emb_col = table.column("embeddings").combine_chunks()
    offsets = ids_col.offsets.to_numpy().astype(np.int64)
    if pa.types.is_large_binary(emb_col.type) or pa.types.is_binary(emb_col.type):
        vectors = _binary_matrices(path, table.schema.field("embeddings"), emb_col, offsets)
    else:  # format version 1: list<fixed_size_list<float16, dim>>
        if not np.array_equal(emb_col.offsets.to_numpy().astype(np.int64), offsets):
            raise IndexFormatError(f"{path}: token_ids and embeddings disagree on token counts")
        dim = emb_col.type.value_type.list_size
        # a sliced list array may start its values past 0: honour the first offset
        vectors = emb_col.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)[offsets[0] : offsets[-1]]
    token_ids = ids_col.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return TokenStore(vectors=np.ascontiguousarray(vectors), token_ids=np.ascontiguousarray(token_ids), offsets=offsets - offsets[0])


def _binary_matrices(path: str | os.PathLike, field: pa.Field, column: pa.Array, token_offsets: np.ndarray) -> np.ndarray:
    """The flat (tokens, dim) float16 matrix behind a binary ``embeddings`` column, without a copy."""
    meta = {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}
    if meta.get("dtype") != "<f2" or not meta.get("dim", "").isdigit():
        raise IndexFormatError(f"{path}: embeddings column lacks its dtype/dim metadata")
    dim = int(meta["dim"])
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    byte_offsets = np.frombuffer(column.buffers()[1], dtype=offset_type)[column.offset : column.offset + len(column) + 1].astype(np.int64)
    if not np.array_equal(byte_offsets - byte_offsets[0], (token_offsets - token_offsets[0]) * 2 * dim):
        raise IndexFormatError(f"{path}: token_ids and embeddings disagree on token counts")
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[byte_offsets[0] : byte_offsets[-1]]
    return data.view("<f2").reshape(-1, dim)


def read_pooled(path: str | os.PathLike) -> np.ndarray:
    """The mean-pooled single vector of every chunk from ``tokens.parquet``, float32 (n_chunks, dim)."""
    col = _read(Path(path), ["pooled"]).column("pooled").combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size).astype(np.float32)


def read_fde(path: str | os.PathLike) -> np.ndarray:
    """Load ``fde.parquet`` as a float32 (n_chunks, fde_dim) matrix."""
    col = _read(path, ["fde"]).column("fde").combine_chunks()
    dim = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def fde_table(vectors: np.ndarray, first_chunk_id: int = 0) -> pa.Table:
    """Wrap a float32 (n, dim) FDE matrix as an ``fde.parquet`` table."""
    from storage.schemas import fde_schema

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    values = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    ids = pa.array(np.arange(first_chunk_id, first_chunk_id + n, dtype=np.int64))
    return pa.Table.from_arrays([ids, values], schema=fde_schema(dim))


def write_faiss(index: faiss.Index, path: str | os.PathLike) -> None:
    """Save a FAISS index atomically (always its CPU form)."""
    if hasattr(faiss, "index_gpu_to_cpu") and not isinstance(index, (faiss.IndexFlat, faiss.IndexHNSW, faiss.IndexIVF)):
        try:
            index = faiss.index_gpu_to_cpu(index)
        except Exception:  # a CPU index that is neither of the classes above: save as is
            pass
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_faiss(path: str | os.PathLike) -> faiss.Index:
    """Load a FAISS index, naming the file if it is unreadable."""
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise IndexFormatError(f"{path}: unreadable FAISS index ({str(exc).splitlines()[0]})") from exc
