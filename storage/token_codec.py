"""Token-store codecs: how ``tokens.parquet`` holds every chunk's unit token vectors.

The token store is the biggest artifact of an index (scifact: 1.8M tokens x 384 dims), so its
number format is an index option (``IndexConfig.token_codec``, ``lateflow index --token-codec``):

* ``float16`` (default): 2 bytes per value, half of float32; what the encoder stage writes.
* ``int8``: 1 byte per value, a quarter of float32. Per-vector symmetric scalar quantisation: each
  vector is scaled so that its largest absolute component becomes 127 and rounded. The scale is
  *not* stored: every token vector is L2-normalised, so decoding divides the codes by their norm
  and gets the unit vector back (direction error at most ``2 * sqrt(dim) * max|x| / 254``, see
  :func:`int8_error_bound`). On scifact and cranfield it changed nDCG@10 by less than 0.1%
  (``evaluation/benchmarks/memory.py``); per-dimension scales did no better and need parameters.

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
>>> bool(np.all(np.linalg.norm(decode(codes, "int8") - x, axis=1) <= int8_error_bound(x)))
True
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_TOKEN_CODEC = "float16"
_INT8_LEVELS = 127  # symmetric: -127..127, so a code and its negation are both representable
_DECODE_BLOCK_ROWS = 1 << 16  # bounds the float32 temporary of a decode (~100 MB at 384 dims)


@dataclass(frozen=True)
class TokenCodec:
    """A stored number format: its name and the numpy dtype string of one stored value."""

    name: str
    dtype: str  # little-endian numpy dtype string, as recorded in the Parquet field metadata
    description: str

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def row_bytes(self, dim: int) -> int:
        """Bytes one token vector of ``dim`` values takes.

        Examples
        --------
        >>> CODECS["float16"].row_bytes(384), CODECS["int8"].row_bytes(384)
        (768, 384)
        """
        return self.itemsize * dim


CODECS: dict[str, TokenCodec] = {
    "float16": TokenCodec("float16", "<f2", "IEEE half precision, as encoded"),
    "int8": TokenCodec(
        "int8", "|i1", "per-vector symmetric int8: x * 127 / max|x| rounded; scale not stored, rows are renormalised to unit length on decode"
    ),
}
TOKEN_CODECS = tuple(CODECS)


def get_codec(name: str) -> TokenCodec:
    """The codec called ``name``; a clear ValueError for any other name.

    Examples
    --------
    >>> get_codec("int8").dtype
    '|i1'
    >>> get_codec("int4")
    Traceback (most recent call last):
    ...
    ValueError: unknown token codec 'int4': choose one of float16, int8
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
    return {"codec": spec.name, "dtype": spec.dtype, "bytes_per_vector": spec.row_bytes(dim), "share_of_float32": spec.itemsize / 4}


def quantize_int8(vectors: np.ndarray) -> np.ndarray:
    """Per-vector symmetric int8 codes of (n, dim) vectors: each row's largest |value| maps to 127.

    A zero row stays zero.

    Examples
    --------
    >>> quantize_int8(np.array([[0.6, -0.8], [0.0, 0.0]], dtype=np.float32)).tolist()
    [[95, -127], [0, 0]]
    """
    x = np.asarray(vectors, dtype=np.float32)
    scale = np.abs(x).max(axis=1, keepdims=True) if x.size else np.ones((len(x), 1), np.float32)
    scale[scale == 0] = 1.0  # a zero row: any scale gives zero codes
    return np.rint(x * (_INT8_LEVELS / scale)).astype(np.int8)


def dequantize_int8(codes: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Unit vectors back from :func:`quantize_int8` codes (rows divided by their norm), in blocks.

    Examples
    --------
    >>> dequantize_int8(np.array([[95, -127]], dtype=np.int8), np.float64).round(3).tolist()
    [[0.599, -0.801]]
    """
    codes = np.asarray(codes, dtype=np.int8)
    out = np.empty(codes.shape, dtype=dtype)
    for lo in range(0, len(codes), _DECODE_BLOCK_ROWS):
        block = codes[lo : lo + _DECODE_BLOCK_ROWS].astype(np.float32)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        np.divide(block, norms, out=block, where=norms > 0)
        out[lo : lo + _DECODE_BLOCK_ROWS] = block
    return out


def int8_error_bound(vectors: np.ndarray) -> np.ndarray:
    """Per row, an upper bound on ``||decode(encode(x)) - x||`` for unit vectors ``x`` under ``int8``.

    Rounding moves each component by at most ``max|x| / 254``, so the dequantised row is within
    ``e = sqrt(dim) * max|x| / 254`` of ``x``; its norm is then within ``e`` of 1, and renormalising
    adds at most another ``e``.

    Examples
    --------
    >>> float(int8_error_bound(np.array([[1.0, 0.0, 0.0, 0.0]]))[0]) == 2 * 2 / 254
    True
    """
    x = np.asarray(vectors, dtype=np.float32)
    return 2 * np.sqrt(x.shape[1]) * np.abs(x).max(axis=1) / (2 * _INT8_LEVELS)


def encode(vectors: np.ndarray, codec: str) -> np.ndarray:
    """Stored form of (n, dim) unit vectors under ``codec`` (an array of the codec's dtype).

    Examples
    --------
    >>> encode(np.array([[0.6, 0.8]]), "float16").dtype
    dtype('float16')
    """
    spec = get_codec(codec)
    if spec.name == "int8":
        return quantize_int8(vectors)
    return np.asarray(vectors, dtype=spec.dtype)


def decode(stored: np.ndarray, codec: str, dtype: type = np.float16) -> np.ndarray:
    """(n, dim) vectors of ``dtype`` from their stored form; float16 read as float16 is not copied.

    Examples
    --------
    >>> x = np.array([[0.6, 0.8]], dtype=np.float16)
    >>> decode(x, "float16") is x, decode(x, "float16", np.float32).dtype
    (True, dtype('float32'))
    """
    spec = get_codec(codec)
    if spec.name == "int8":
        return dequantize_int8(stored, dtype)
    return stored if stored.dtype == np.dtype(dtype) else stored.astype(dtype)
