"""Token-store codecs: int8 kernels, the tokens.parquet transcoder and reader, and an int8 index end to end."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import index_files as files
from storage import token_codec
from storage.manifest import IndexFormatError, resolve_index_dir
from tasks.rerank import maxsim_kernel


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# mean error on 384-dim random unit vectors, well under the (loose) worst-case bound
TYPICAL_ERROR = {"float16": 1e-3, "int8": 0.01, "int4": 0.2}


@pytest.mark.parametrize("codec", ["float16", "int8", "int4"])
@pytest.mark.parametrize("dim", [2, 15, 128, 384])
def test_round_trip_stays_within_the_error_bound(codec, dim):
    rng = np.random.default_rng(dim)
    x = np.concatenate([unit_rows(rng, 2000, dim), np.eye(dim, dtype=np.float32)[:3], -np.eye(dim, dtype=np.float32)[:1]])
    spec = token_codec.get_codec(codec)
    stored = token_codec.encode(x, codec)
    assert stored.dtype == np.dtype(spec.dtype) and stored.shape == (len(x), spec.width(dim)) and stored.nbytes == len(x) * spec.row_bytes(dim)
    decoded = token_codec.decode(stored, codec, np.float32, dim)
    error = np.linalg.norm(decoded - x, axis=1)
    assert np.all(error <= token_codec.error_bound(x, codec) + 1e-6)
    assert np.allclose(np.linalg.norm(decoded, axis=1), 1, atol=1e-3)  # unit vectors again, without a stored scale
    assert np.array_equal(token_codec.decode(stored, codec, np.float16, dim), decoded.astype(np.float16))
    if dim == 384:
        assert error.mean() < TYPICAL_ERROR[codec]


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_zero_rows_and_empty_stores(codec):
    assert not token_codec.decode(token_codec.encode(np.zeros((2, 8)), codec), codec, np.float32).any()
    assert token_codec.decode(token_codec.encode(np.zeros((0, 8)), codec), codec).shape == (0, 8)



@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("levels", [127, 7])
def test_quantize_is_the_rounded_per_row_scaling_bit_for_bit(dtype, levels):
    # the torch kernel must give exactly the codes of the plain numpy formula (indexes built before
    # it and after it hold the same bytes), on read-only input too (a Parquet buffer is read-only)
    rng = np.random.default_rng(levels)
    x = np.concatenate([rng.normal(size=(3000, 384)), np.zeros((2, 384)), np.full((1, 384), 0.5)]).astype(dtype)
    x.flags.writeable = False
    wide = x.astype(np.float32)
    scale = np.abs(wide).max(axis=1, keepdims=True)
    scale[scale == 0] = 1.0
    expected = np.rint(wide * (levels / scale)).astype(np.int8)
    assert np.array_equal(token_codec.quantize(x, levels), expected)
    assert token_codec.quantize(np.zeros((0, 384), dtype), levels).shape == (0, 384)
    # what numpy's formula took, torch.from_numpy does not: a reversed view, big-endian values
    assert np.array_equal(token_codec.quantize(x[::-1], levels), expected[::-1])
    assert np.array_equal(token_codec.quantize(x.astype(x.dtype.newbyteorder(">")), levels), expected)

@pytest.mark.parametrize("codec, min_top10", [("int8", 9), ("int4", 8)])
def test_maxsim_ranking_is_preserved_within_the_error_bound(codec, min_top10):
    rng = np.random.default_rng(7)
    dim, n_docs = 64, 200
    topics = unit_rows(rng, 20, dim)
    # documents of 5..40 tokens near a few topics, so MaxSim scores spread out as on real text
    lengths = rng.integers(5, 41, size=n_docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    docs = topics[rng.integers(0, 20, size=offsets[-1])] + 0.6 * rng.normal(size=(offsets[-1], dim)) / np.sqrt(dim)
    docs = (docs / np.linalg.norm(docs, axis=1, keepdims=True)).astype(np.float16)
    decoded = token_codec.decode(token_codec.encode(docs.astype(np.float32), codec), codec, np.float32)
    bound = token_codec.error_bound(docs.astype(np.float32), codec).max()
    for _ in range(10):
        query = topics[rng.integers(0, 20, size=8)] + 0.5 * rng.normal(size=(8, dim)) / np.sqrt(dim)
        query = (query / np.linalg.norm(query, axis=1, keepdims=True)).astype(np.float32)
        exact, compressed = maxsim_kernel(query, docs, offsets), maxsim_kernel(query, decoded, offsets)
        # each query token's best inner product moves by at most ||q|| * ||d' - d|| <= bound
        tolerance = len(query) * bound
        assert np.abs(exact - compressed).max() <= tolerance
        # every pair of documents further apart than twice that keeps its order
        gap = exact[:, None] - exact[None, :]
        assert np.all((compressed[:, None] - compressed[None, :])[gap > 2 * tolerance] > 0)
        top_exact, top_compressed = set(np.argsort(-exact)[:10]), set(np.argsort(-compressed)[:10])
        assert len(top_exact & top_compressed) >= min_top10


def test_unknown_codecs_are_rejected_with_the_choices():
    from flows.index import IndexConfig
    from lateflow.cli import build_parser, index_config_from_args

    with pytest.raises(ValueError, match=r"unknown token codec 'int3': choose one of float16, int8, int4"):
        IndexConfig(token_codec="int3")
    args = build_parser().parse_args(["index", "corpus.jsonl", "--index", "idx", "--token-codec", "float16"])
    assert index_config_from_args(args).token_codec == "float16"
    assert index_config_from_args(build_parser().parse_args(["index", "c", "--index", "i"])).token_codec == "int8"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["index", "corpus.jsonl", "--index", "idx", "--token-codec", "int3"])


def float16_token_file(path, rng: np.random.Generator, dim: int = 16, lengths=(3, 0, 5, 1, 7)) -> pa.Table:
    from tasks.encode import tokens_table

    vectors = [unit_rows(rng, n, dim).astype(np.float16) for n in lengths]
    ids = [rng.integers(1000, 2000, size=n).astype(np.int32) for n in lengths]
    pooled = unit_rows(rng, len(lengths), dim).astype(np.float16)
    table = tokens_table(pa.array(np.arange(len(lengths), dtype=np.int64)), ids, vectors, pooled, dim)
    pq.write_table(table, path, compression="none")
    return table


@pytest.mark.parametrize("codec, dim, batch_rows", [("int8", 16, 2), ("int8", 16, 512), ("int4", 15, 3), ("float16", 16, 512)])
def test_transcoded_token_file_reads_back_decoded(tmp_path, codec, dim, batch_rows):
    rng = np.random.default_rng(3)
    spec = token_codec.get_codec(codec)
    source, target = tmp_path / "f16.parquet", tmp_path / f"{codec}.parquet"
    table = float16_token_file(source, rng, dim, lengths=(3, 0, 5, 1, 7) * 20)
    files.transcode_token_file(source, target, codec, batch_rows=batch_rows)
    assert files.token_codec_of(source) == "float16" and files.token_codec_of(target) == codec
    written = pq.read_table(target)
    field = written.schema.field("embeddings")
    assert field.metadata[b"dtype"] == spec.dtype.encode() and field.metadata[b"dim"] == str(dim).encode()
    assert field.metadata.get(b"codec", b"float16") == codec.encode()
    for name in ("chunk_id", "token_ids", "pooled"):
        assert written.column(name).equals(table.column(name))
    # any Parquet reader gets a chunk's stored rows with plain numpy
    assert np.frombuffer(written.column("embeddings")[0].as_py(), dtype=spec.dtype).reshape(-1, spec.width(dim)).shape[0] == 3
    original, decoded = files.read_token_store(source), files.read_token_store(target)
    assert decoded.vectors.dtype == np.float16 and files.read_token_store(target, np.float32).vectors.dtype == np.float32
    assert np.array_equal(decoded.offsets, original.offsets) and np.array_equal(decoded.token_ids, original.token_ids)
    x = original.vectors.astype(np.float32)
    assert np.all(np.linalg.norm(decoded.vectors.astype(np.float32) - x, axis=1) <= token_codec.error_bound(x, codec) + 2e-3)
    token_ids, offsets = files.read_token_ids(target)
    assert np.array_equal(token_ids, original.token_ids) and np.array_equal(offsets, original.offsets)


@pytest.mark.parametrize("codec", ["float16", "int8", "int4"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int8])
def test_streamed_reading_equals_decoding_the_whole_store_at_any_batch_size(tmp_path, codec, dtype):
    """Vectors stream into the result a batch at a time: the batch size and the file's row groups change nothing."""
    rng = np.random.default_rng(6)
    source = tmp_path / "f16.parquet"
    table = float16_token_file(source, rng, 15 if codec == "int4" else 16, lengths=(3, 0, 5, 1, 7) * 40)
    target = tmp_path / f"{codec}.parquet"
    if codec == "float16":
        pq.write_table(table, target, compression="none", row_group_size=17)  # many row groups
    else:
        files.transcode_token_file(source, target, codec, batch_rows=29)
    dim = table.schema.field("embeddings").metadata[b"dim"]
    stored = np.frombuffer(b"".join(v.as_py() for v in pq.read_table(target).column("embeddings")), dtype=token_codec.get_codec(codec).dtype)
    whole = token_codec.decode(stored.reshape(-1, token_codec.get_codec(codec).width(int(dim))), codec, np.float32, int(dim))
    reads = [files.read_token_store(target, dtype, batch_bytes=b) for b in (1, 700, 1 << 26)]  # one chunk, a few, all
    for store in reads:
        assert store.vectors.dtype == np.dtype(dtype) and store.vectors.flags.c_contiguous
        # the result owns its memory: no Arrow buffer of the file stays alive behind it
        assert store.vectors.base is None and store.token_ids.base is None
        assert np.array_equal(store.offsets, reads[0].offsets) and np.array_equal(store.token_ids, reads[0].token_ids)
        if dtype == np.int8:
            assert np.array_equal(store.vectors, reads[0].vectors) and np.array_equal(store.row_scale, reads[0].row_scale)
            assert np.allclose(store.unit_vectors(np.arange(len(whole))), whole, atol=0.02)
        else:
            assert store.row_scale is None and np.array_equal(store.vectors, whole.astype(dtype))
    assert reads[0].n_chunks == table.num_rows and np.array_equal(np.diff(reads[0].offsets), [3, 0, 5, 1, 7] * 40)


def test_a_version_1_token_store_still_reads(tmp_path):
    """Indexes of format version 1 stored vectors as nested float16 lists; they open as before."""
    rng = np.random.default_rng(7)
    lengths, dim = (2, 0, 4), 8
    vectors = [unit_rows(rng, n, dim).astype(np.float16) for n in lengths]
    nested = pa.array([v.tolist() for v in vectors], type=pa.list_(pa.list_(pa.float16(), dim)))
    ids = pa.array([list(range(n)) for n in lengths], type=pa.list_(pa.int32()))
    pq.write_table(pa.table({"chunk_id": pa.array([0, 1, 2], pa.int64()), "token_ids": ids, "embeddings": nested}), tmp_path / "v1.parquet")
    flat = np.concatenate(vectors)
    store = files.read_token_store(tmp_path / "v1.parquet", np.float32)
    assert np.array_equal(store.offsets, [0, 2, 2, 6]) and np.array_equal(store.vectors, flat.astype(np.float32))
    codes = files.read_token_store(tmp_path / "v1.parquet", np.int8)
    assert np.allclose(codes.unit_vectors(np.arange(6)), flat.astype(np.float32), atol=0.02)


def test_a_truncated_token_store_names_the_file(tmp_path):
    rng = np.random.default_rng(8)
    float16_token_file(tmp_path / "tokens.parquet", rng, lengths=(3, 0, 5, 1, 7) * 50)
    data = (tmp_path / "tokens.parquet").read_bytes()
    (tmp_path / "tokens.parquet").write_bytes(data[: len(data) // 2] + data[-2000:])  # a hole in the middle
    with pytest.raises(IndexFormatError, match=r"tokens\.parquet"):
        files.read_token_store(tmp_path / "tokens.parquet")


def test_transcoding_tables_in_flight_equals_transcoding_the_file(tmp_path):
    """The index flow transcodes each gathered table (no staged float16 copy): same bytes as the file path."""
    rng = np.random.default_rng(5)
    table = float16_token_file(tmp_path / "f16.parquet", rng, 16, lengths=(3, 0, 5, 1, 7) * 30)
    files.transcode_token_file(tmp_path / "f16.parquet", tmp_path / "file.parquet", "int8", batch_rows=7)
    transcode = files.TokenTranscoder(tmp_path / "f16.parquet", table.schema, "int8", batch_rows=7)
    in_flight = pa.concat_tables([transcode(table.slice(0, 41)), transcode(table.slice(41))])
    assert in_flight.schema.equals(transcode.schema, check_metadata=True)
    assert in_flight.equals(pq.read_table(tmp_path / "file.parquet"))
    assert transcode(table.slice(0, 0)).num_rows == 0


def test_a_store_in_an_unknown_codec_names_the_file(tmp_path):
    rng = np.random.default_rng(4)
    table = float16_token_file(tmp_path / "f16.parquet", rng)
    field = table.schema.field("embeddings")
    schema = table.schema.set(table.schema.get_field_index("embeddings"), field.with_metadata({**field.metadata, b"codec": b"int3"}))
    pq.write_table(pa.Table.from_arrays(table.columns, schema=schema), tmp_path / "foreign.parquet")
    with pytest.raises(IndexFormatError, match=r"foreign\.parquet: unknown token codec 'int3'"):
        files.read_token_store(tmp_path / "foreign.parquet")
    files.transcode_token_file(tmp_path / "f16.parquet", tmp_path / "int8.parquet", "int8")
    with pytest.raises(ValueError, match="can only transcode a float16 token store"):
        files.transcode_token_file(tmp_path / "int8.parquet", tmp_path / "again.parquet", "int8")


QUERIES = ["Who likes Quokkas?", "Who likes Joshua Trees?", "Who likes Slide Rules and Bassoons?", "Who likes apples?"]


@pytest.fixture(scope="module")
def codec_indexes(tmp_path_factory, limit_small, prefect_harness):
    """LIMIT-small indexed as float16, int8 and int4, all three sharing one segment cache folder."""
    from flows.index import index_flow
    from tests.conftest import small_index_config

    root = tmp_path_factory.mktemp("codec-indexes")
    cache = str(root / "cache")
    manifests = {
        codec: index_flow(str(limit_small), str(root / codec), replace(small_index_config(), token_codec=codec), cache=cache)
        for codec in ("float16", "int8", "int4")
    }
    return root, manifests


# MaxSim sums one best inner product per query token; a codec moves each by about its mean error or less
SCORE_TOLERANCE_PER_QUERY_TOKEN = {"int8": 0.01, "int4": 0.05}


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_an_index_records_its_codec_opens_and_searches_like_float16(codec_indexes, codec):
    from lateflow.engine import LateIndex

    root, manifests = codec_indexes
    manifest, float16_manifest = manifests[codec], manifests["float16"]
    assert manifest["token_store"] == token_codec.manifest_entry(codec, 384)
    assert float16_manifest["token_store"]["codec"] == "float16"
    # the segments were encoded once, by the float16 build: the other builds only transcoded them
    assert manifest["incremental"]["segments_encoded"] == 0 and manifest["build_key"] != float16_manifest["build_key"]
    assert files.token_codec_of(resolve_index_dir(root / codec) / files.TOKENS_FILE) == codec
    sizes = {name: manifests[name]["files"][files.TOKENS_FILE]["bytes"] for name in (codec, "float16")}
    assert sizes[codec] < 0.7 * sizes["float16"]  # the vectors shrink; token ids and pooled vectors stay
    index, reference = LateIndex.open(root / codec), LateIndex.open(root / "float16", token_memory="float32")
    # a compressed store stays compressed in memory by default: int8 codes and one scale per token
    assert index.tokens.vectors.dtype == np.int8 and index.tokens.row_scale.dtype == np.float32
    assert LateIndex.open(root / codec, token_memory="float16").tokens.vectors.dtype == np.float16
    for query in QUERIES:
        got, want = index.search(query, k=5), reference.search(query, k=5)
        assert got[0].doc_id == want[0].doc_id
        assert abs(got[0].score - want[0].score) <= SCORE_TOLERANCE_PER_QUERY_TOKEN[codec] * len(index.encode(query).vectors)
        assert len({h.doc_id for h in got} & {h.doc_id for h in want}) >= 4


@pytest.mark.parametrize("codec", ["float16", "int8", "int4"])
def test_int8_in_memory_answers_like_the_decoded_store(codec_indexes, codec):
    """token_memory="int8" scores with codes x row scale: the same ranking as the float32 store of that file,
    within the int8 error for float16/int4 files and to float rounding for an int8 file (the same numbers)."""
    from lateflow.engine import LateIndex
    from tasks.prf import PRFConfig

    root, _ = codec_indexes
    compact, decoded = LateIndex.open(root / codec, token_memory="int8"), LateIndex.open(root / codec, token_memory="float32")
    assert compact.tokens.vectors.dtype == np.int8 and decoded.tokens.row_scale is None
    rows = np.arange(0, len(decoded.tokens.vectors), 7)
    error = np.linalg.norm(compact.tokens.unit_vectors(rows) - decoded.tokens.vectors[rows], axis=1)
    assert error.max() <= (1e-5 if codec == "int8" else 2 * float(token_codec.error_bound(decoded.tokens.vectors[rows], "int8").max()))
    queries = [compact.encode(q) for q in QUERIES]
    exact_compact, exact_decoded = compact.rank_exhaustive(queries, 5), decoded.rank_exhaustive(queries, 5)
    for query, got, want in zip(queries, exact_compact, exact_decoded):
        assert got[0][0] == want[0][0]
        assert abs(got[0][1] - want[0][1]) <= (1e-4 if codec == "int8" else SCORE_TOLERANCE_PER_QUERY_TOKEN["int8"]) * len(query.vectors)
    for query in QUERIES:  # the default search and a PRF search (which reads feedback tokens back) agree too
        tolerance = SCORE_TOLERANCE_PER_QUERY_TOKEN["int8"] * len(compact.encode(query).vectors)
        for prf in (None, PRFConfig()):
            got, want = compact.search(query, k=5, prf=prf), decoded.search(query, k=5, prf=prf)
            # LIMIT has near ties (two people who like Quokkas: 3.505 vs 3.502): their order may swap,
            # but the top hit must be a best hit of the reference, within the codec's error
            reference = {h.doc_id: h.score for h in want}
            assert reference.get(got[0].doc_id, -np.inf) >= want[0].score - 2 * tolerance
            assert len(set(reference) & {h.doc_id for h in got}) >= 4


# last: it switches the int8 folder back to float16
def test_switching_the_codec_back_makes_a_new_version_and_encodes_nothing(codec_indexes, limit_small):
    from flows.index import index_flow
    from tests.conftest import small_index_config

    root, manifests = codec_indexes
    assert small_index_config().token_codec == "int8"  # the default
    again = index_flow(str(limit_small), str(root / "int8"), replace(small_index_config(), token_codec="float16"), cache=str(root / "cache"))
    assert again["token_store"]["codec"] == "float16" and again["build_key"] == manifests["float16"]["build_key"]
    assert again["incremental"]["segments_encoded"] == 0
    assert files.token_codec_of(resolve_index_dir(root / "int8") / files.TOKENS_FILE) == "float16"



def test_token_memory_auto_keeps_compressed_stores_compressed_and_never_overfills_ram():
    from lateflow.engine import _token_memory_dtype

    assert _token_memory_dtype("auto", 1_000, "int8") == np.int8
    assert _token_memory_dtype("auto", 1_000, "int4") == np.int8
    assert _token_memory_dtype("auto", 1_000, "float16") == np.float32  # small: widened once, fastest brute force
    assert _token_memory_dtype("auto", 1 << 62, "float16") == np.int8  # larger than a quarter of any RAM
    assert _token_memory_dtype("float16", 1_000, "int8") == np.float16
    with pytest.raises(ValueError, match="token_memory must be one of"):
        _token_memory_dtype("bfloat16", 1_000)


@pytest.mark.parametrize("k", [1, 10, 45])
def test_brute_force_with_the_prefilter_equals_brute_force_without(codec_indexes, limit_small, k):
    """rank_exhaustive on an int8 store prunes by default: the same top k (documents, order, scores, best chunks)."""
    from evaluation.datasets import load_dataset
    from lateflow.engine import LateIndex

    root, _ = codec_indexes
    # int8 in memory whatever the file holds (an earlier test may have switched this folder's codec)
    index = LateIndex.open(root / "int8", token_memory="int8")
    assert index.tokens.row_scale is not None and len(index) > k
    texts = list(load_dataset(limit_small).queries.values())[:30]
    queries = [index.encode(t) for t in texts]
    pruned, plain = index.rank_exhaustive(queries, k), index.rank_exhaustive(queries, k, prefilter=False)
    for got, want in zip(pruned, plain):
        assert [(d, c) for d, _, c in got] == [(d, c) for d, _, c in want]
        assert np.allclose([s for _, s, _ in got], [s for _, s, _ in want], atol=1e-5)
    # the index's setting is the default; off, it scores everything as before
    off = LateIndex.open(root / "int8", token_memory="int8", rerank_prefilter=False)
    assert off.rank_exhaustive(queries[:3], k) == off.rank_exhaustive(queries[:3], k, prefilter=False)


def test_a_token_store_or_fde_file_without_its_column_or_with_a_null_row_names_the_file(tmp_path):
    rng = np.random.default_rng(9)
    table = float16_token_file(tmp_path / "tokens.parquet", rng, lengths=(3, 0, 5))
    pq.write_table(table.drop_columns(["embeddings"]), tmp_path / "no-embeddings.parquet")
    with pytest.raises(IndexFormatError, match=r"no-embeddings\.parquet: no 'embeddings' column"):
        files.read_token_store(tmp_path / "no-embeddings.parquet")
    fde = files.fde_table(rng.normal(size=(20, 8)).astype(np.float32))
    pq.write_table(fde, tmp_path / "fde.parquet", row_group_size=3)
    assert np.array_equal(files.read_fde(tmp_path / "fde.parquet"), fde.column("fde").combine_chunks().flatten().to_numpy().reshape(20, 8))
    blocks = list(files.iter_fde(tmp_path / "fde.parquet", batch_bytes=5 * 8 * 4))  # at most 5 rows a block
    assert len(blocks) >= 4 and max(len(b) for b in blocks) <= 5 and files.fde_shape(tmp_path / "fde.parquet") == (20, 8)
    assert np.array_equal(np.concatenate(blocks), files.read_fde(tmp_path / "fde.parquet"))
    mask = np.zeros(20, bool)
    mask[4] = True
    nulled = pa.FixedSizeListArray.from_arrays(fde.column("fde").combine_chunks().values, 8, mask=pa.array(mask))
    pq.write_table(pa.table({"chunk_id": fde.column("chunk_id"), "fde": nulled}), tmp_path / "fde-null.parquet")
    with pytest.raises(IndexFormatError, match=r"fde-null\.parquet: column 'fde' has a null row"):
        files.read_fde(tmp_path / "fde-null.parquet")
    with pytest.raises(IndexFormatError, match=r"missing\.parquet: unreadable Parquet"):
        files.read_fde(tmp_path / "missing.parquet")
    pq.write_table(table, tmp_path / "not-fde.parquet")
    with pytest.raises(IndexFormatError, match=r"not-fde\.parquet: no 'fde' column"):
        files.read_fde(tmp_path / "not-fde.parquet")
