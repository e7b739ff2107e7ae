"""Names of the artifacts in an index folder and readers that turn them into flat numpy arrays."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
import pyarrow as pa

from storage import token_codec
from storage.atomic import atomic_path, parquet_writer
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
    """Every chunk's kept token vectors as one flat matrix with CSR offsets.

    ``vectors[offsets[i]:offsets[i+1]]`` and ``token_ids[...]`` belong to chunk ``i``. With
    ``row_scale``, ``vectors`` holds int8 codes and row ``r``'s unit vector is
    ``vectors[r] * row_scale[r]`` (:func:`storage.token_codec.int8_rows`).
    """

    vectors: np.ndarray  # (total_tokens, dim) float16 (or the dtype asked of read_token_store), decoded
    token_ids: np.ndarray  # (total_tokens,) int32
    offsets: np.ndarray  # (n_chunks + 1,) int64
    row_scale: np.ndarray | None = None  # (total_tokens,) float32 when vectors are int8 codes

    @property
    def n_chunks(self) -> int:
        return len(self.offsets) - 1

    def unit_vectors(self, rows: np.ndarray) -> np.ndarray:
        """float32 unit vectors of the given rows, whatever the in-memory form."""
        picked = np.asarray(self.vectors[rows], dtype=np.float32)
        return picked * self.row_scale[rows, None] if self.row_scale is not None else picked


def _read(path: Path | str, columns: list[str] | None = None, *, verify: bool = False) -> pa.Table:
    from storage import fs  # shard files of a distributed run may sit behind a URL

    try:
        return fs.read_parquet(path, columns=columns, verify_checksums=verify)
    except (pa.ArrowInvalid, OSError) as exc:
        raise IndexFormatError(f"{path}: unreadable Parquet ({exc})") from exc


def read_token_store(path: str | os.PathLike, dtype: type = np.float16, *, batch_bytes: int | None = None, verify: bool = False) -> TokenStore:
    """Load ``tokens.parquet`` into a :class:`TokenStore` (checks that chunk ids are 0..n-1 in order).

    The vectors come back as ``dtype`` whatever the file's token codec (:mod:`storage.token_codec`);
    an int8 file is decoded straight into ``dtype``. ``dtype=np.int8`` keeps int8 codes plus
    ``row_scale`` (:func:`storage.token_codec.int8_rows`).

    The vectors are streamed a batch at a time (:func:`storage.fs.iter_parquet_batches`, batches of
    about ``batch_bytes``, default 64 MB) into one array of their in-memory form, so no copy of
    the whole store exists beside it. Reading the whole table first held the file's bytes and a
    combined copy beside the result, and kept the Arrow buffers alive behind it. Opening the 100k
    scaling corpus (2.3 GiB held as int8) peaked at 12.3 GiB that way and at 4.0 GiB now; the
    default scifact index at 2.8 and 1.6 GiB (``evaluation/benchmarks/open_memory.py``, BENCHMARKS 5.4).

    ``verify`` checks every page's CRC as it is read (a cache file written with them); a mismatch
    raises an :class:`IndexFormatError` whose ``__cause__`` is pyarrow's error
    (:func:`storage.segments.read_checked` handles it).
    """
    table = _read(path, ["chunk_id", "token_ids"], verify=verify)
    chunk_ids = table.column("chunk_id").to_numpy()
    if not np.array_equal(chunk_ids, np.arange(len(chunk_ids))):
        raise IndexFormatError(f"{path}: chunk_id must run 0..n-1 in row order")
    ids_col = table.column("token_ids").combine_chunks()
    offsets = ids_col.offsets.to_numpy().astype(np.int64)
    # a copy (4 bytes per token): a view would keep the Arrow column alive behind the store
    token_ids = np.array(ids_col.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]], dtype=np.int32)
    offsets = offsets - offsets[0]
    del table, ids_col
    field = _field(path, _read_schema(path), "embeddings")
    if pa.types.is_large_binary(field.type) or pa.types.is_binary(field.type):
        vectors, row_scale = _stream_binary_matrix(path, field, offsets, dtype, batch_bytes, verify=verify)
    else:  # format version 1: list<fixed_size_list<float16, dim>> (small indexes of early versions)
        emb_col = _read(path, ["embeddings"], verify=verify).column("embeddings").combine_chunks()
        if not np.array_equal(emb_col.offsets.to_numpy().astype(np.int64) - emb_col.offsets[0].as_py(), offsets):
            raise IndexFormatError(f"{path}: token_ids and embeddings disagree on token counts")
        dim = emb_col.type.value_type.list_size
        # a sliced list array may start its values past 0: honour the first offset
        first = emb_col.offsets[0].as_py()
        vectors = emb_col.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)[first : first + offsets[-1]]
        vectors, row_scale = token_codec.int8_rows(vectors, "float16") if np.dtype(dtype) == np.int8 else (vectors.astype(dtype), None)
    pa.default_memory_pool().release_unused()  # the batches' pages go back to the system, not to a later reader
    return TokenStore(vectors=np.ascontiguousarray(vectors), token_ids=token_ids, offsets=offsets, row_scale=row_scale)


def _field(path: str | os.PathLike, schema: pa.Schema, name: str) -> pa.Field:
    """A column of a file's schema, or an IndexFormatError naming the file."""
    if schema.get_field_index(name) < 0:
        raise IndexFormatError(f"{path}: no {name!r} column (columns: {', '.join(schema.names)})")
    return schema.field(name)


def _read_schema(path: str | os.PathLike) -> pa.Schema:
    from storage import fs

    try:
        return fs.read_parquet_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise IndexFormatError(f"{path}: unreadable Parquet ({exc})") from exc


def _stream_binary_matrix(
    path: str | os.PathLike, field: pa.Field, offsets: np.ndarray, dtype: type, batch_bytes: int | None = None, *, verify: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """A binary ``embeddings`` column decoded batch by batch into one preallocated (tokens, dim) array.

    ``dtype=np.int8``: int8 codes and their ``row_scale``; any other dtype: decoded vectors and None.
    """
    from storage import fs

    spec, dim = _embeddings_codec(path, field)
    as_int8 = np.dtype(dtype) == np.int8
    n_tokens, n_chunks = int(offsets[-1]), len(offsets) - 1
    vectors = np.empty((n_tokens, dim), dtype=np.int8 if as_int8 else dtype)
    row_scale = np.empty(n_tokens, dtype=np.float32) if as_int8 else None
    chunk = 0
    try:
        for batch in fs.iter_parquet_batches(path, ["embeddings"], batch_bytes=batch_bytes or fs.STREAM_BATCH_BYTES, verify_checksums=verify):
            column = batch.column(0)
            if chunk + len(column) > n_chunks:
                raise IndexFormatError(f"{path}: more embeddings rows than token_ids rows ({n_chunks})")
            lo, hi = int(offsets[chunk]), int(offsets[chunk + len(column)])
            stored = _stored_rows(path, column, offsets[chunk : chunk + len(column) + 1], spec, dim)
            if as_int8:
                vectors[lo:hi], row_scale[lo:hi] = token_codec.int8_rows(stored, spec.name, dim)
            else:
                vectors[lo:hi] = token_codec.decode(stored, spec.name, dtype, dim)
            chunk += len(column)
    except (pa.ArrowInvalid, OSError) as exc:
        raise IndexFormatError(f"{path}: unreadable Parquet ({exc})") from exc
    if chunk != n_chunks:
        raise IndexFormatError(f"{path}: {chunk} embeddings rows for {n_chunks} token_ids rows")
    return vectors, row_scale


def _embeddings_codec(path: str | os.PathLike, field: pa.Field) -> tuple[token_codec.TokenCodec, int]:
    """The token codec and dimension recorded on a binary ``embeddings`` field (no ``codec`` key: float16)."""
    meta = {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}
    try:
        spec = token_codec.get_codec(meta.get("codec", "float16"))
    except ValueError as exc:
        raise IndexFormatError(f"{path}: {exc} (written by a newer lateflow?)") from None
    if meta.get("dtype") != spec.dtype or not meta.get("dim", "").isdigit():
        raise IndexFormatError(f"{path}: embeddings column lacks its dtype/dim metadata")
    return spec, int(meta["dim"])


def _stored_rows(path: str | os.PathLike, column: pa.Array, token_offsets: np.ndarray, spec: token_codec.TokenCodec, dim: int) -> np.ndarray:
    """A view of a binary ``embeddings`` column's bytes as (tokens, stored width) items of the codec's dtype."""
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    byte_offsets = np.frombuffer(column.buffers()[1], dtype=offset_type)[column.offset : column.offset + len(column) + 1].astype(np.int64)
    if not np.array_equal(byte_offsets - byte_offsets[0], (token_offsets - token_offsets[0]) * spec.row_bytes(dim)):
        raise IndexFormatError(f"{path}: token_ids and embeddings disagree on token counts")
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[byte_offsets[0] : byte_offsets[-1]]
    return data.view(spec.dtype).reshape(-1, spec.width(dim))


def read_token_ids(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Only the token ids of ``tokens.parquet`` and their CSR offsets (the vectors are not read)."""
    ids_col = _read(path, ["token_ids"]).column("token_ids").combine_chunks()
    offsets = ids_col.offsets.to_numpy().astype(np.int64)
    token_ids = ids_col.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return np.ascontiguousarray(token_ids), offsets - offsets[0]


def token_codec_of(path: str | os.PathLike) -> str:
    """The codec of a ``tokens.parquet`` file's vectors (``float16`` for files written before codecs)."""
    import pyarrow.parquet as pq

    field = pq.read_schema(path).field("embeddings")
    if not (pa.types.is_large_binary(field.type) or pa.types.is_binary(field.type)):
        return "float16"  # format version 1: nested float16 lists
    return _embeddings_codec(path, field)[0].name


def transcode_token_file(source: str | os.PathLike, target: str | os.PathLike, codec: str, *, batch_rows: int = 512) -> None:
    """Write ``target``: the float16 ``tokens.parquet`` at ``source`` with its vectors in ``codec``.

    Streams ``batch_rows`` chunks at a time, so memory stays bounded by one batch whatever the
    index size; every other column is copied as is. ``target`` is written atomically.
    """
    import pyarrow.parquet as pq

    source_file = pq.ParquetFile(source)
    transcode = TokenTranscoder(source, source_file.schema_arrow, codec, batch_rows=batch_rows)
    with atomic_path(target) as tmp, parquet_writer(tmp, transcode.schema, compression="none") as writer:
        for batch in source_file.iter_batches(batch_size=batch_rows):
            writer.write_table(transcode(pa.Table.from_batches([batch])))


class TokenTranscoder:
    """``transcode(table)``: a float16 token-store table (schema ``source_schema``) with its vectors in ``codec``.

    ``transcode.schema`` is the output schema. Tables are converted ``batch_rows`` chunks at a time
    (the float32 temporaries of quantisation stay small); ``source`` only names the file in errors.
    Used on a staged file (:func:`transcode_token_file`) or on each table as the index is gathered.
    """

    def __init__(self, source: str | os.PathLike, source_schema: pa.Schema, codec: str, *, batch_rows: int = 512) -> None:
        from storage.schemas import tokens_schema

        self.source, self.batch_rows = source, batch_rows
        self.spec = token_codec.get_codec(codec)
        self.source_spec, self.dim = _embeddings_codec(source, source_schema.field("embeddings"))
        if self.source_spec.name != "float16":
            raise ValueError(f"{source}: can only transcode a float16 token store, this one is {self.source_spec.name}")
        self.schema = tokens_schema(self.dim, self.spec.name)

    def __call__(self, table: pa.Table) -> pa.Table:
        parts = []
        for batch in table.to_batches(max_chunksize=self.batch_rows):
            ids = batch.column("token_ids")
            token_offsets = ids.offsets.to_numpy().astype(np.int64)
            stored = _stored_rows(self.source, batch.column("embeddings"), token_offsets, self.source_spec, self.dim)
            codes = np.ascontiguousarray(token_codec.encode(stored, self.spec.name))
            byte_offsets = (token_offsets - token_offsets[0]) * self.spec.row_bytes(self.dim)
            embeddings = pa.LargeBinaryArray.from_buffers(pa.large_binary(), batch.num_rows, [None, pa.py_buffer(byte_offsets), pa.py_buffer(codes)])
            parts.append(pa.Table.from_arrays([batch.column(name) if name != "embeddings" else embeddings for name in self.schema.names], schema=self.schema))
        return pa.concat_tables(parts) if parts else self.schema.empty_table()


def read_pooled(path: str | os.PathLike) -> np.ndarray:
    """The mean-pooled single vector of every chunk from ``tokens.parquet``, float32 (n_chunks, dim)."""
    col = _read(Path(path), ["pooled"]).column("pooled").combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size).astype(np.float32)


def fde_shape(path: str | os.PathLike) -> tuple[int, int]:
    """``(n_chunks, fde_dim)`` of ``fde.parquet`` from its footer, without reading the vectors."""
    from storage import fs

    try:
        meta = fs.read_parquet_metadata(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise IndexFormatError(f"{path}: unreadable Parquet ({exc})") from exc
    field = _field(path, meta.schema.to_arrow_schema(), "fde")
    if not pa.types.is_fixed_size_list(field.type):
        raise IndexFormatError(f"{path}: column 'fde' is {field.type}, expected fixed_size_list<float>")
    return meta.num_rows, field.type.list_size


def iter_fde(path: str | os.PathLike, *, batch_bytes: int | None = None) -> Iterator[np.ndarray]:
    """The rows of ``fde.parquet`` in order, as float32 (rows, fde_dim) blocks of about ``batch_bytes``.

    So that the ANN index is built from the file a block at a time: the whole matrix is 4.3 GB at
    100k chunks of 10,240 dims, ~40 GB at a million.
    """
    from storage import fs

    _, dim = fde_shape(path)
    row = 0
    options = {} if batch_bytes is None else {"batch_bytes": batch_bytes}
    try:
        for batch in fs.iter_parquet_batches(path, ["fde"], **options):
            column = batch.column(0)
            if column.null_count:
                raise IndexFormatError(f"{path}: column 'fde' has a null row among rows {row}..{row + batch.num_rows - 1}")
            yield column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(batch.num_rows, dim)
            row += batch.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise IndexFormatError(f"{path}: unreadable Parquet ({exc})") from exc


def read_fde(path: str | os.PathLike) -> np.ndarray:
    """Load ``fde.parquet`` as a float32 (n_chunks, fde_dim) matrix, streamed into it a batch at a time.

    (4.3 GB at 100k chunks of 10,240 dims: reading the table whole held it twice over.)
    """
    fde = np.empty(fde_shape(path), dtype=np.float32)
    row = 0
    for block in iter_fde(path):
        fde[row : row + len(block)] = block
        row += len(block)
    return fde


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
