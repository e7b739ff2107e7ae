"""Token-store codecs: how ``tokens.parquet`` holds every chunk's unit token vectors.

The token store is the biggest artifact of an index (scifact: 1.8M tokens x 384 dims, 1.3 GB as
float16), so its number format is an index option (``IndexConfig.token_codec``,
``lateflow index --token-codec``):

* ``float16``: 2 bytes per value, half of float32; what the encoder stage writes (the segment cache
  keeps it, so the codec of an index can change without encoding anything again).
* ``int8`` (default): 1 byte per value, a quarter of float32. Per-vector symmetric scalar quantisation: each
  vector is scaled so that its largest absolute component becomes 127, then rounded.
* ``int4``: half a byte per value (two codes per byte), an eighth of float32; the same with 7.

The scale is *not* stored: every token vector is L2-normalised, so decoding divides the codes by
their norm and gets a unit vector back (the error bound is :func:`error_bound`). Measured with
``evaluation/benchmarks/memory.py`` (nDCG@10 against float16, maxsim-exact and fde-rerank): int8
changed nothing measurable on scifact and cranfield (its top-10 agreed with float16's 99.8-100%);
int4 moved nDCG@10 by -0.2% to +0.4%, within noise (top-10 agreement ~97%). Per-dimension scales
did no better at either width and would need stored parameters; PCA needed 256 int8 coordinates
(a sixth of float32) to stay within 1%.

In memory, :func:`int8_rows` keeps any store as int8 codes plus one float32 scale per row (a
quarter of float32 plus 4 bytes per token): the MaxSim kernels of :mod:`tasks.rerank` multiply the
codes and scale the similarities, which is what ``LateIndex.open(token_memory="int8")`` serves.

Codecs apply to the assembled index only: the segment cache keeps float16, so changing the codec
re-encodes nothing. Readers decode at load time (:func:`decode`); MaxSim then runs on the decoded
vectors as before.

Examples
--------
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(5, 384)).astype(np.float32)
>>> x /= np.linalg.norm(x, axis=1, keepdims=True)
>>> codes = encode(x, "int8")
>>> codes.dtype, codes.shape, codes.nbytes * 4 == x.nbytes
(dtype('int8'), (5, 384), True)
>>> bool(np.all(np.linalg.norm(decode(codes, "int8") - x, axis=1) <= error_bound(x, "int8")))
True
>>> packed = encode(x, "int4")
>>> packed.shape, bool(np.all(np.linalg.norm(decode(packed, "int4", dim=384) - x, axis=1) <= error_bound(x, "int4")))
((5, 192), True)
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

DEFAULT_TOKEN_CODEC = "int8"
SEGMENT_TOKEN_CODEC = "float16"  # what the encoder stage writes and the segment cache keeps
_DECODE_BLOCK_ROWS = 1 << 16  # bounds the float32 temporary of a decode (~100 MB at 384 dims)
_NIBBLE_OFFSET = 8  # int4 codes -7..7 are stored as 1..15; 0 (code -8) never occurs, 8 is a zero pad


@dataclass(frozen=True)
class TokenCodec:
    """A stored number format of token vectors.

    ``levels`` is the largest code of a per-vector quantiser (None: a float format);
    ``values_per_item`` is how many codes share one stored item (2 for int4: two per byte).
    """

    name: str
    dtype: str  # numpy dtype string of one stored item, as recorded in the Parquet field metadata
    description: str
    levels: int | None = None
    values_per_item: int = 1

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def width(self, dim: int) -> int:
        """Stored items per vector of ``dim`` values."""
        return -(-dim // self.values_per_item)

    def row_bytes(self, dim: int) -> int:
        """Bytes one token vector of ``dim`` values takes.

        Examples
        --------
        >>> [CODECS[name].row_bytes(384) for name in ("float16", "int8", "int4")], CODECS["int4"].row_bytes(5)
        ([768, 384, 192], 3)
        """
        return self.itemsize * self.width(dim)


CODECS: dict[str, TokenCodec] = {
    "float16": TokenCodec("float16", "<f2", "IEEE half precision, as encoded"),
    "int8": TokenCodec(
        "int8", "|i1", "per-vector symmetric int8: round(x * 127 / max|x|); scale not stored, rows renormalised to unit length on decode", 127
    ),
    "int4": TokenCodec(
        "int4", "|u1",
        "per-vector symmetric int4: round(x * 7 / max|x|) + 8, two per byte, first value in the high nibble; "
        "scale not stored, rows renormalised to unit length on decode", 7, 2,
    ),
}
TOKEN_CODECS = tuple(CODECS)


def get_codec(name: str) -> TokenCodec:
    """The codec called ``name``; a clear ValueError for any other name.

    Examples
    --------
    >>> get_codec("int8").dtype
    '|i1'
    >>> get_codec("int3")
    Traceback (most recent call last):
    ...
    ValueError: unknown token codec 'int3': choose one of float16, int8, int4
    """
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown token codec {name!r}: choose one of {', '.join(TOKEN_CODECS)}") from None


def manifest_entry(codec: str, dim: int) -> dict[str, object]:
    """What an index manifest records about its token store's number format (``manifest["token_store"]``).

    Examples
    --------
    >>> manifest_entry("int8", 384)
    {'codec': 'int8', 'dtype': '|i1', 'bytes_per_vector': 384, 'share_of_float32': 0.25}
    """
    spec = get_codec(codec)
    return {"codec": spec.name, "dtype": spec.dtype, "bytes_per_vector": spec.row_bytes(dim), "share_of_float32": spec.row_bytes(dim) / (4 * dim)}


def quantize(vectors: np.ndarray, levels: int) -> np.ndarray:
    """Per-vector symmetric codes of (n, dim) vectors: each row's largest |value| maps to ``levels``.

    A zero row stays zero.

    Examples
    --------
    >>> quantize(np.array([[0.6, -0.8], [0.0, 0.0]], dtype=np.float32), 127).tolist()
    [[95, -127], [0, 0]]
    """
    import torch

    vectors = np.asarray(vectors)
    if vectors.size == 0:
        return np.zeros(vectors.shape, dtype=np.int8)
    if not vectors.dtype.isnative or any(stride < 0 for stride in vectors.strides):
        # torch.from_numpy takes neither (a big-endian file's values, a reversed view): one copy
        vectors = np.ascontiguousarray(vectors, dtype=vectors.dtype.newbyteorder("="))
    # torch widens float16 and scales on every core, 2-4x faster than numpy here (whose float16
    # conversion is scalar), and bit for bit the same: exact widening, one IEEE float32 product per
    # value with the factor numpy computes, round half to even as np.rint
    if vectors.flags.writeable:
        x = torch.from_numpy(vectors)
    else:  # e.g. a buffer of an Arrow table; .to() below copies before any write
        with warnings.catch_warnings():  # only on this path: the filter is process-wide while it lasts
            warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable"
            x = torch.from_numpy(vectors)
    x = x.to(torch.float32, copy=True)  # a private copy: scaled and rounded in place below
    scale = x.abs().amax(dim=1, keepdim=True).numpy()
    scale[scale == 0] = 1.0  # a zero row: any scale gives zero codes
    x.mul_(torch.from_numpy(levels / scale))
    return torch.round_(x).to(torch.int8).numpy()


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Codes in -7..7 as bytes, two per byte (first value in the high nibble); an odd row gets a zero pad.

    Examples
    --------
    >>> pack_int4(np.array([[7, -7, 1]], dtype=np.int8)).tolist(), unpack_int4(np.array([[241, 152]], np.uint8), 3).tolist()
    ([[241, 152]], [[7.0, -7.0, 1.0]])
    """
    stored = (np.asarray(codes, dtype=np.int16) + _NIBBLE_OFFSET).astype(np.uint8)
    if stored.shape[1] % 2:
        stored = np.concatenate([stored, np.full((len(stored), 1), _NIBBLE_OFFSET, np.uint8)], axis=1)
    return (stored[:, 0::2] << 4) | stored[:, 1::2]


def unpack_int4(packed: np.ndarray, dim: int) -> np.ndarray:
    """float32 codes (-7..7) of the first ``dim`` values of :func:`pack_int4` rows."""
    out = np.empty((len(packed), 2 * packed.shape[1]), dtype=np.float32)
    out[:, 0::2] = packed >> 4
    out[:, 1::2] = packed & 15
    out -= _NIBBLE_OFFSET
    return out[:, :dim]


def _unit_rows(block: np.ndarray) -> np.ndarray:
    """Divide each float32 row by its norm, in place (zero rows stay zero)."""
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return np.divide(block, norms, out=block, where=norms > 0)


def error_bound(vectors: np.ndarray, codec: str) -> np.ndarray:
    """Per row, an upper bound on ``||decode(encode(x)) - x||`` for unit vectors ``x``.

    Rounding moves each component by at most ``max|x| / (2 * levels)``, so the dequantised row is
    within ``e = sqrt(dim) * max|x| / (2 * levels)`` of ``x``; its norm is then within ``e`` of 1,
    and renormalising adds at most another ``e``. float16 keeps 11 significant bits.

    Examples
    --------
    >>> x = np.array([[1.0, 0.0, 0.0, 0.0]])
    >>> float(error_bound(x, "int8")[0]) == 2 * 2 / 254, float(error_bound(x, "int4")[0]) == 2 * 2 / 14
    (True, True)
    """
    spec = get_codec(codec)
    x = np.asarray(vectors, dtype=np.float32)
    largest = np.abs(x).max(axis=1) if x.size else np.zeros(len(x), np.float32)
    if spec.levels is None:
        return np.sqrt(x.shape[1]) * largest * 2.0**-11
    return 2 * np.sqrt(x.shape[1]) * largest / (2 * spec.levels)


def encode(vectors: np.ndarray, codec: str) -> np.ndarray:
    """Stored form of (n, dim) unit vectors under ``codec``: an (n, width) array of the codec's dtype.

    Examples
    --------
    >>> encode(np.array([[0.6, 0.8]]), "float16").dtype, encode(np.array([[0.6, 0.8]]), "int4").tolist()
    (dtype('float16'), [[223]])
    """
    spec = get_codec(codec)
    if spec.levels is None:
        return np.asarray(vectors, dtype=spec.dtype)
    codes = quantize(vectors, spec.levels)
    return pack_int4(codes) if spec.values_per_item == 2 else codes


def decode(stored: np.ndarray, codec: str, dtype: type = np.float16, dim: int | None = None) -> np.ndarray:
    """(n, dim) vectors of ``dtype`` from their stored form; float16 read as float16 is not copied.

    ``dim`` is needed only for int4 rows of an odd dimension (default: two values per byte).

    Examples
    --------
    >>> x = np.array([[0.6, 0.8]], dtype=np.float16)
    >>> decode(x, "float16") is x, decode(x, "float16", np.float32).dtype
    (True, dtype('float32'))
    >>> decode(np.array([[95, -127]], dtype=np.int8), "int8", np.float64).round(3).tolist()
    [[0.599, -0.801]]
    """
    spec = get_codec(codec)
    if spec.levels is None:
        return stored if stored.dtype == np.dtype(dtype) else stored.astype(dtype)
    dim = dim if dim is not None else stored.shape[1] * spec.values_per_item
    out = np.empty((len(stored), dim), dtype=dtype)
    for lo in range(0, len(stored), _DECODE_BLOCK_ROWS):
        block = stored[lo : lo + _DECODE_BLOCK_ROWS]
        codes = unpack_int4(block, dim) if spec.values_per_item == 2 else block.astype(np.float32)
        out[lo : lo + _DECODE_BLOCK_ROWS] = _unit_rows(codes)
    return out


def int8_rows(stored: np.ndarray, codec: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """In-memory int8 form of a stored token matrix: ``(codes, row_scale)`` with ``codes * row_scale`` the unit vectors.

    An int8 store is kept as it is (``row_scale = 1 / ||codes||``, exactly what :func:`decode`
    divides by); any other codec is decoded block by block and quantised per vector. Zero rows get
    scale 0.

    Examples
    --------
    >>> x = np.array([[0.6, 0.8], [0.0, 0.0]], dtype=np.float16)
    >>> codes, scale = int8_rows(x, "float16")
    >>> codes.tolist(), bool(np.allclose(codes * scale[:, None], decode(encode(x, "int8"), "int8", np.float32)))
    ([[95, 127], [0, 0]], True)
    """
    spec = get_codec(codec)
    if spec.name == "int8":
        codes = np.ascontiguousarray(stored, dtype=np.int8)
    else:
        codes = np.empty((len(stored), dim if dim is not None else stored.shape[1] * spec.values_per_item), dtype=np.int8)
        for lo in range(0, len(stored), _DECODE_BLOCK_ROWS):
            block = decode(stored[lo : lo + _DECODE_BLOCK_ROWS], codec, np.float32, codes.shape[1])
            codes[lo : lo + _DECODE_BLOCK_ROWS] = quantize(block, CODECS["int8"].levels)
    scale = np.empty(len(codes), dtype=np.float32)
    for lo in range(0, len(codes), _DECODE_BLOCK_ROWS):
        norms = np.linalg.norm(codes[lo : lo + _DECODE_BLOCK_ROWS].astype(np.float32), axis=1)
        scale[lo : lo + _DECODE_BLOCK_ROWS] = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return codes, scale
