"""The real bundled encoder: unit vectors, special tokens and punctuation handling, offline errors."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.encode import ModelNotFoundError, length_buckets, resolve_model_path


def test_query_tokens_are_unit_vectors_without_specials(encoder):
    ids, vecs, pooled = encoder.encode_query("Does aspirin reduce stroke risk?")
    assert pooled.shape == (encoder.dim,) and np.isclose(np.linalg.norm(pooled), 1, atol=1e-5)
    assert vecs.dtype == np.float32 and vecs.shape == (len(ids), encoder.dim)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    assert not set(ids.tolist()) & set(encoder.special_ids.tolist())
    assert encoder.tokenizer.convert_tokens_to_ids("?") in ids.tolist()  # queries keep punctuation


def test_query_of_only_punctuation_still_encodes(encoder):
    ids, vecs, _ = encoder.encode_query("?!...")
    assert len(ids) > 0 and np.all(np.isfinite(vecs))


def test_no_queries_encode_to_nothing(encoder):
    assert encoder.encode_queries([]) == []


def test_empty_query_is_rejected(encoder):
    with pytest.raises(ValueError, match="empty"):
        encoder.encode_query("   ")


def test_documents_drop_punctuation_but_never_end_up_empty(encoder):
    tok = encoder.tokenizer
    seqs = [tok("cells, proteins; and DNA.", add_special_tokens=False)["input_ids"], tok("...!!", add_special_tokens=False)["input_ids"]]
    out = {i: (ids, v) for i, ids, v, _ in encoder.encode_ids(seqs)}
    punct = set(encoder.punctuation_ids.tolist())
    assert not set(out[0][0].tolist()) & punct and len(out[0][0]) == 4
    assert len(out[1][0]) == len(seqs[1])  # all-punctuation chunk keeps its tokens


def test_kept_lengths_predict_what_encoding_keeps(encoder):
    """The flat store of encode_chunks is laid out from kept_lengths before encoding: they must agree."""
    import pyarrow as pa

    tok = encoder.tokenizer
    rng = np.random.default_rng(3)
    punct = encoder.punctuation_ids.tolist()
    specials = encoder.special_ids.tolist()
    words = tok("cells proteins and DNA of mice", add_special_tokens=False)["input_ids"]
    seqs = [tok("...!!", add_special_tokens=False)["input_ids"], [specials[0], punct[0]], [specials[-1]]]
    for _ in range(12):  # words, punctuation and special ids (a literal "[SEP]" in a text) mixed at random
        seqs.append(rng.choice(words + punct[:5] + specials, size=int(rng.integers(1, 20))).tolist())
    arrays = pa.chunked_array([pa.array(seqs[:5], pa.list_(pa.int32())), pa.array(seqs[5:], pa.list_(pa.int32()))])
    expected = np.zeros(len(seqs), np.int64)
    for i, ids, _, _ in encoder.encode_ids(seqs):
        expected[i] = len(ids)
    assert encoder.kept_lengths(arrays).tolist() == expected.tolist()
    assert encoder.kept_lengths(pa.array(seqs, pa.list_(pa.int32())).slice(4)).tolist() == expected[4:].tolist()
    assert 0 in expected.tolist()  # a chunk of special ids only keeps nothing


def test_float16_vectors_from_the_encoder_equal_numpys_cast_bit_for_bit(encoder):
    """The token store takes torch's float16 cast (on every core); it must round as numpy did before, subnormals included."""
    tok = encoder.tokenizer
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in ("the immune response of mice to a virus", "DNA repair", "cells")]
    wide = {i: (ids, v) for i, ids, v, _ in encoder.encode_ids(seqs)}
    for i, ids, half, _ in encoder.encode_ids(seqs, float16=True):
        assert half.dtype == np.float16 and np.array_equal(ids, wide[i][0])
        assert np.array_equal(half.view(np.uint16), wide[i][1].astype(np.float16).view(np.uint16))
    # the cast itself on values around float16's subnormal range and its rounding ties
    import torch

    tiny = np.array([6.1e-5, 6.0e-5, 3e-8, 2.98e-8, -1e-6, 1 + 2**-11, 1 + 3 * 2**-11, 65519.0], np.float32)
    assert np.array_equal(torch.from_numpy(tiny).to(torch.float16).numpy().view(np.uint16), tiny.astype(np.float16).view(np.uint16))


def test_batched_encoding_matches_single(encoder):
    tok = encoder.tokenizer
    texts = ["short", "a much longer sentence about the immune response of mice", "medium length text"]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    batched = {i: v for i, _, v, _ in encoder.encode_ids(seqs)}
    for i, s in enumerate(seqs):
        (_, _, single, _), = encoder.encode_ids([s])
        assert np.allclose(batched[i], single, atol=1e-4)


@pytest.mark.parametrize("precision, atol", [("fp32", 1e-5), ("bf16", 0.02)])
def test_traced_single_sequence_model_equals_the_eager_model_at_every_length(model_path, precision, atol):
    import torch

    from tasks.encode import Encoder, EncoderConfig

    encoder = Encoder(EncoderConfig(model_path=model_path, precision=precision))
    assert isinstance(encoder._single_sequence_model(), torch.jit.ScriptModule)  # the fast path is really taken
    rng = np.random.default_rng(0)
    for length in (1, 7, 64, 510):  # traced on 2 tokens: the graph must hold for any length
        seq = rng.integers(1000, 20000, length).tolist()
        single, _, _ = encoder.forward_batch([seq], traced=True)
        batch, _, _ = encoder.forward_batch([seq, seq[: max(1, length // 2)]])  # eager (a batch of two, padded)
        assert np.abs(single[0] - batch[0]).max() <= atol
    ids, vectors, _ = encoder.encode_query("Does aspirin reduce stroke risk?")
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "int8"])  # bf16: traced and eager round differently; int8: per-batch activation scales
def test_a_query_gets_the_same_vectors_alone_or_in_a_batch(model_path, precision):
    from tasks.encode import Encoder, EncoderConfig

    encoder = Encoder(EncoderConfig(model_path=model_path, precision=precision))
    texts = ["Does aspirin reduce stroke risk?", "p53", "a much longer question about the immune response of mice to a vaccine"]
    for text, (ids, vectors, pooled) in zip(texts, encoder.encode_queries(texts)):
        alone = encoder.encode_query(text)
        assert np.array_equal(ids, alone[0]) and np.array_equal(vectors, alone[1]) and np.array_equal(pooled, alone[2])


def test_query_encoder_stays_eager_when_asked_or_when_tracing_fails(model_path, monkeypatch, caplog):
    import torch

    from tasks.encode import Encoder, EncoderConfig

    monkeypatch.setenv("LATEFLOW_EAGER_ENCODER", "1")
    encoder = Encoder(EncoderConfig(model_path=model_path))
    assert encoder._single_sequence_model() is encoder.model
    monkeypatch.delenv("LATEFLOW_EAGER_ENCODER")

    def refuse(*args, **kwargs):
        raise RuntimeError("this checkpoint cannot be traced")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    encoder = Encoder(EncoderConfig(model_path=model_path))
    expected = encoder.forward_batch([[2000, 3000], [2000, 3000]])[0][0]
    assert np.allclose(encoder.forward_batch([[2000, 3000]], traced=True)[0][0], expected, atol=1e-5)
    assert encoder._single_sequence_model() is encoder.model and "not traced" in caplog.text


def test_documents_never_go_through_the_query_trace(encoder, model_path):
    """An index's vectors must not depend on whether a trace exists: a one-chunk length bucket is eager too."""
    from tasks.encode import Encoder, EncoderConfig

    def no_trace(*args, **kwargs):
        raise AssertionError("a document went through the query trace")

    saved = encoder._single
    encoder._single = no_trace
    try:
        # a shard of one chunk, and a batch whose last length bucket holds one chunk
        assert len(list(encoder.encode_ids([[2000 + i for i in range(30)]]))) == 1
        seqs = [[2000 + i for i in range(30)]] * 64 + [[3000, 3001]]
        assert len(list(encoder.encode_ids(seqs))) == 65
        with pytest.raises(AssertionError, match="query trace"):
            encoder.encode_query("a query does use it")
    finally:
        encoder._single = saved


def test_a_trace_that_disagrees_with_the_eager_model_is_refused(model_path, monkeypatch, caplog):
    import torch

    from tasks.encode import Encoder, EncoderConfig

    encoder = Encoder(EncoderConfig(model_path=model_path))
    real = encoder._single_sequence_model()
    assert isinstance(real, torch.jit.ScriptModule) and encoder._trace_disagreement(real) is None
    wrong = lambda ids, mask: torch.randn(ids.shape[0], ids.shape[1], encoder.dim)  # noqa: E731
    assert "cosine" in encoder._trace_disagreement(wrong)
    assert "shape" in encoder._trace_disagreement(lambda ids, mask: torch.zeros(1, 3, encoder.dim))
    monkeypatch.setattr(Encoder, "_trace_disagreement", lambda self, traced: "token cosine 0.1 < 0.999 at 7 tokens")
    fresh = Encoder(EncoderConfig(model_path=model_path))
    assert fresh._single_sequence_model() is fresh.model and "disagrees with the eager model" in caplog.text


def test_too_long_sequence_is_rejected(encoder):
    with pytest.raises(ValueError, match="at most 510"):
        list(encoder.encode_ids([[1000] * 600]))


def test_length_buckets_respect_budget():
    lengths = list(np.random.default_rng(0).integers(1, 300, size=200))
    batches = length_buckets(lengths, batch_tokens=1024, max_batch_size=16)
    assert sorted(np.concatenate(batches).tolist()) == list(range(200))
    for b in batches:
        assert len(b) <= 16 and (len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 1024)


def test_hub_name_fails_fast_and_clearly():
    with pytest.raises(ModelNotFoundError, match="not a local folder.*HF_HUB_OFFLINE"):
        resolve_model_path("someone/not-a-cached-model")


def test_fdes_computed_while_encoding_equal_the_fde_stage(model_path, scifact_sample, tmp_path):
    """The fused path (FDEs on a worker thread while encoding) gives the FDE stage's output bit for bit."""
    from storage.atomic import write_parquet
    from storage.corpus import read_corpus
    from storage.index_files import read_token_store
    from tasks.chunk import ChunkConfig, chunk_documents
    from tasks.encode import EncoderConfig, encode_chunks, encode_chunks_with_fdes, load_encoder
    from tasks.fde import FDEConfig, encode_documents

    # a small token budget per batch, so the FDE thread gets many batches out of order
    encoder = load_encoder(EncoderConfig(model_path=model_path, batch_tokens=512))
    docs = read_corpus(scifact_sample).docs.slice(0, 12)
    chunks = chunk_documents(docs, encoder.tokenizer, ChunkConfig(window=64, overlap=16))
    config = FDEConfig(dim=encoder.dim, repetitions=4, simhash_bits=3, projection_dim=8)
    table, fdes = encode_chunks_with_fdes(chunks, encoder, config)
    assert table.equals(encode_chunks(chunks, encoder))
    write_parquet(table, tmp_path / "tokens.parquet", compression="none")
    store = read_token_store(tmp_path / "tokens.parquet")
    assert fdes.shape == (chunks.num_rows, config.output_dim) and chunks.num_rows > 20
    np.testing.assert_array_equal(fdes, encode_documents(store.vectors, store.offsets, config))


def test_auto_precision_follows_the_device(monkeypatch):
    from tasks import encode

    assert encode.resolve_precision("fp32", "cpu") == "fp32" and encode.resolve_precision("int8", "cpu") == "int8"
    with pytest.raises(ValueError, match="precision must be one of"):
        encode.resolve_precision("fp16", "cpu")
    monkeypatch.setattr(encode, "fast_bf16", lambda device: device == "cuda")
    assert encode.resolve_precision("auto", "cuda") == "bf16" and encode.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.undo()
    # the real probe answers without raising, whatever this CPU is
    assert encode.fast_bf16("cpu") in (True, False) and encode.fast_bf16("mps") is False


def test_a_store_layout_that_disagrees_with_the_encoder_stops_naming_the_chunk(encoder, scifact_sample, monkeypatch):
    """kept_lengths lays the flat store out before encoding: a disagreement must never misalign rows silently."""
    from storage.corpus import read_corpus
    from tasks.chunk import ChunkConfig, chunk_documents
    from tasks.encode import encode_chunks

    docs = read_corpus(scifact_sample).docs.slice(0, 2)
    chunks = chunk_documents(docs, encoder.tokenizer, ChunkConfig(window=64, overlap=16))
    counted = encoder.kept_lengths(chunks.column("input_ids"))
    counted[-1] += 1
    monkeypatch.setattr(encoder, "kept_lengths", lambda sequences: counted)
    last = chunks.slice(chunks.num_rows - 1)
    with pytest.raises(RuntimeError, match=rf"chunk_id {last['chunk_id'][0].as_py()} of document '{last['doc_id'][0].as_py()}'.*kept_lengths counted"):
        encode_chunks(chunks, encoder)
