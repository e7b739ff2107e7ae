"""The real index flow on small real corpora, searched through the loaded index."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.index import FDEParams, IndexConfig, index_flow
from lateflow.engine import LateIndex
from tasks.prf import PRFConfig
from tasks.rerank import maxsim_candidates
from storage import index_files as files
from storage.manifest import IndexFormatError, read_manifest, resolve_index_dir
from tasks.chunk import ChunkConfig
from tests.conftest import write_jsonl

SMALL = IndexConfig(chunk=ChunkConfig(window=64, overlap=16), fde=FDEParams(repetitions=8, simhash_bits=3, projection_dim=16), shard_size=25)


@pytest.fixture(scope="module")
def scifact_index(tmp_path_factory, scifact_sample, prefect_harness):
    out = tmp_path_factory.mktemp("idx") / "scifact"
    manifest = index_flow(str(scifact_sample), str(out), SMALL)
    return out, manifest


def test_artifacts_are_plain_parquet_and_consistent(scifact_index):
    root, manifest = scifact_index
    out = resolve_index_dir(root)  # the current version's folder
    assert out.parent.name == "versions" and out.name == manifest["version"]
    chunks = pq.read_table(out / files.CHUNKS_FILE)
    tokens = pq.read_table(out / files.TOKENS_FILE)
    fde = pq.read_table(out / files.FDE_FILE)
    assert chunks.num_rows == tokens.num_rows == fde.num_rows == manifest["counts"]["chunks"]
    assert chunks.column("chunk_id").to_pylist() == list(range(chunks.num_rows))
    field = tokens.schema.field("embeddings")
    # the default store: int8 codes, one byte per value
    assert field.type == "large_binary" and field.metadata[b"dtype"] == b"|i1" and field.metadata[b"codec"] == b"int8"
    assert field.metadata[b"dim"] == b"384" and manifest["token_store"]["share_of_float32"] == 0.25
    # plain pyarrow + numpy read a chunk's matrix: one vector per kept token, unit length once divided by its norm
    first = np.frombuffer(tokens.column("embeddings")[0].as_py(), dtype="|i1").reshape(-1, 384)
    assert len(first) == len(tokens.column("token_ids")[0]) and np.abs(first).max(axis=1).tolist() == [127] * len(first)
    assert manifest["counts"]["docs"] == 60 and manifest["counts"]["chunks"] > 60  # 64-token windows split abstracts
    assert manifest["fde"]["repetitions"] == 8 and manifest["counts"]["fde_dim"] == 8 * 8 * 16
    assert {"torch", "pyarrow", "faiss-cpu"} <= set(manifest["versions"])
    store = files.read_token_store(out / files.TOKENS_FILE)
    assert np.allclose(np.linalg.norm(store.vectors[:50].astype(np.float32), axis=1), 1, atol=2e-3)
    # vectors are never dictionary-encoded (hashing every matrix and float cost 4-8x in writes and
    # reads); ids still are, in the index and in the segment cache
    for path in [out / files.TOKENS_FILE, out / files.FDE_FILE, *sorted((root / files.CACHE_DIR).glob("tokens-*.parquet"))]:
        row_group = pq.ParquetFile(path).metadata.row_group(0)
        encodings = {row_group.column(i).path_in_schema: row_group.column(i).encodings for i in range(row_group.num_columns)}
        assert all("DICTIONARY" not in e for name, es in encodings.items() for e in es if not name.startswith(("chunk_id", "token_ids"))), (path, encodings)
        assert any("DICTIONARY" in e for e in encodings["chunk_id"])
    # where the build's time went, per stage
    assert {"chunk", "encode", "assemble", "assemble_gather", "assemble_ann"} <= set(manifest["stage_seconds"])
    assert sum(manifest["stage_seconds"][s] for s in ("chunk", "encode", "assemble")) <= manifest["build_seconds"]


def test_search_finds_a_document_by_its_own_title(scifact_index, scifact_sample):
    out, _ = scifact_index
    index = LateIndex.open(out)
    docs = [json.loads(l) for l in scifact_sample.read_text().splitlines()]
    found = 0
    for doc in docs[:10]:
        hits = index.search(doc["title"], k=3)
        assert hits[0].score >= hits[-1].score
        found += hits[0].doc_id == doc["_id"]
        assert hits[0].text and hits[0].char_end > hits[0].char_start
    assert found >= 9


def test_rerank_with_all_candidates_equals_exhaustive_maxsim(scifact_index):
    out, _ = scifact_index
    index = LateIndex.open(out)
    q = index.encode("vitamin D deficiency and bone fractures")
    ranked = index.rank(q, k=10, candidates=10_000)
    exact = index.rank_exhaustive([q], k=10)[0]
    assert [d for d, _, _ in ranked] == [d for d, _, _ in exact]
    assert np.allclose([s for _, s, _ in ranked], [s for _, s, _ in exact], atol=1e-4)


def test_rerank_prefilter_returns_the_exact_rerank(scifact_index, scifact_sample):
    """The int8 prefilter (default) and the one-step exact rerank agree on real queries, both scopes."""
    out, _ = scifact_index
    fast, slow = LateIndex.open(out), LateIndex.open(out, rerank_prefilter=False)
    assert fast.tokens.vectors.dtype == np.int8  # the prefilter applies to the default store
    titles = [json.loads(line)["title"] for line in scifact_sample.read_text().splitlines()[:8]]
    for title in titles:
        q = fast.encode(title)
        for scope in ("chunks", "documents"):
            got, want = fast.rank(q, k=5, candidates=60, scope=scope), slow.rank(q, k=5, candidates=60, scope=scope)
            assert [(d, c) for d, _, c in got] == [(d, c) for d, _, c in want]
            assert np.allclose([s for _, s, _ in got], [s for _, s, _ in want], atol=1e-5)


def test_chunk_scope_scores_each_document_by_its_best_retrieved_chunk(scifact_index):
    out, _ = scifact_index
    index = LateIndex.open(out)
    q = index.encode("vitamin D deficiency and bone fractures")
    # every chunk retrieved: the two scopes agree with brute force
    every = index.rank(q, k=10, candidates=10_000, scope="chunks")
    assert [d for d, _, _ in every] == [d for d, _, _ in index.rank_exhaustive([q], k=10)[0]]
    # a few retrieved chunks: each document's score is the exact MaxSim of its best *retrieved* chunk
    _, rows = index._search_chunks(q, 15, 10)
    ranked = index.rank(q, k=10, candidates=15, scope="chunks")
    exact = {int(c): s for c, s in zip(rows, maxsim_candidates(q.vectors, index.tokens.vectors, index.tokens.offsets, rows, None, index.tokens.row_scale))}
    multi_chunk = 0
    for doc, score, chunk in ranked:
        mine = [c for c in rows if index.chunk_doc[c] == doc]
        assert chunk in mine and np.isclose(score, max(exact[int(c)] for c in mine), atol=1e-5)
        multi_chunk += np.diff(index.doc_chunk_offsets)[doc] > len(mine)
    assert multi_chunk > 0  # the test would not tell the scopes apart otherwise
    # scoring every chunk can only raise a document's score
    full, _ = index.score_documents(q, np.array([d for d, _, _ in ranked]))
    assert all(f >= s - 1e-6 for f, (_, s, _) in zip(full, ranked))
    with pytest.raises(ValueError, match="scope must be one of"):
        index.search("vitamin D", scope="passages")


def test_chunk_scope_with_prf_in_both_modes(scifact_index):
    out, _ = scifact_index
    index = LateIndex.open(out)
    q = index.encode("vitamin D deficiency and bone fractures")
    for mode in ("rerank", "retrieve"):
        ranked = index.rank(q, k=10, candidates=30, scope="chunks", prf=PRFConfig(mode=mode))
        scores = [s for _, s, _ in ranked]
        assert len(ranked) == 10 and scores == sorted(scores, reverse=True)


def test_rerun_reuses_cached_shards_and_does_no_model_work(scifact_index, scifact_sample, monkeypatch):
    out, manifest = scifact_index
    import tasks.encode as encode

    def forbidden(*a, **k):
        raise AssertionError("model work on a cached re-run")

    monkeypatch.setattr(encode.Encoder, "forward_batch", forbidden)
    again = index_flow(str(scifact_sample), str(out), SMALL)
    assert again["index_id"] == manifest["index_id"]


def test_open_reports_missing_and_truncated_files(scifact_index, tmp_path):
    out, _ = scifact_index
    shutil.copytree(out, tmp_path / "copy")
    broken = resolve_index_dir(tmp_path / "copy")
    original = (broken / files.FDE_FILE).read_bytes()
    (broken / files.FDE_FILE).write_bytes(original[:100])
    with pytest.raises(IndexFormatError, match=r"fde\.parquet: 100 bytes, the manifest says"):
        LateIndex.open(broken)
    (broken / files.FDE_FILE).write_bytes(original)
    (broken / files.ANN_FILE).unlink()
    with pytest.raises(IndexFormatError, match=r"ann\.faiss: missing"):
        read_manifest(broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(IndexFormatError, match="manifest.json: missing"):
        LateIndex.open(tmp_path / "copy")
    shutil.rmtree(broken)
    with pytest.raises(IndexFormatError, match="the current version named by .* is missing"):
        LateIndex.open(tmp_path / "copy")


@pytest.mark.parametrize("section, key", [("encoding", None), ("model", "path"), ("fde", "dim"), ("ann", None), (None, "index_id")])
def test_a_manifest_missing_a_section_names_it(scifact_index, tmp_path, section, key):
    out, _ = scifact_index
    shutil.copytree(out, tmp_path / "copy")
    path = resolve_index_dir(tmp_path / "copy") / "manifest.json"
    manifest = json.loads(path.read_text())
    del (manifest[section] if section and key else manifest)[key or section]
    path.write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match=rf"manifest\.json: .*'{key or section}'"):
        LateIndex.open(tmp_path / "copy")


def test_incompatible_format_version(scifact_index, tmp_path):
    out, _ = scifact_index
    copy = tmp_path / "old"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 999
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="format version 999 is not supported"):
        LateIndex.open(copy)


def test_bad_inputs_through_the_flow(tmp_path, prefect_harness):
    corpus = write_jsonl(
        tmp_path / "corpus.jsonl",
        [
            {"_id": "ok", "title": "Quokkas", "text": "Quokkas live on Rottnest Island."},
            {"_id": "empty", "title": "", "text": "  "},
            {"_id": "long", "title": "", "text": "pangolin " * 6500},
            {"_id": "punct", "title": "", "text": "?!?! ..."},
        ],
    )
    manifest = index_flow(str(corpus), str(tmp_path / "idx"), SMALL)
    assert manifest["counts"]["docs"] == 3 and manifest["counts"]["rejected"] == 1
    rejected = pq.read_table(resolve_index_dir(tmp_path / "idx") / files.REJECTED_FILE).to_pylist()
    assert rejected[0]["doc_id"] == "empty" and rejected[0]["line"] == 2
    index = LateIndex.open(tmp_path / "idx")
    assert index.search("Rottnest quokka", k=1)[0].doc_id == "ok"
    assert len(index.search("?!", k=3)) == 3  # a query of only punctuation still gets answers
    with pytest.raises(ValueError, match="empty"):
        index.search("   ")
    long_chunks = pq.read_table(index.path / files.CHUNKS_FILE).to_pandas().query("doc_id == 'long'")
    assert len(long_chunks) >= 100


def test_malformed_corpus_fails_before_writing_anything(tmp_path, prefect_harness):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "a", "text": "x"}, "{oops"])
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: malformed JSON"):
        index_flow(str(corpus), str(tmp_path / "idx"), SMALL)
    assert not (tmp_path / "idx" / "manifest.json").exists()


def test_reads_the_format_1_token_store(tmp_path):
    """Indexes written before format 3 kept embeddings as nested float16 lists: they still load."""
    import pyarrow as pa

    rng = np.random.default_rng(0)
    matrices = [rng.normal(size=(n, 4)).astype(np.float16) for n in (3, 1, 2)]
    offsets = pa.array(np.r_[0, np.cumsum([len(m) for m in matrices])].astype(np.int32))
    flat = np.concatenate(matrices)
    table = pa.table(
        {
            "chunk_id": pa.array([0, 1, 2], pa.int64()),
            "token_ids": pa.ListArray.from_arrays(offsets, pa.array(np.arange(6, dtype=np.int32))),
            "embeddings": pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), 4)),
        }
    )
    pq.write_table(table, tmp_path / "tokens.parquet")
    store = files.read_token_store(tmp_path / "tokens.parquet")
    assert np.array_equal(store.vectors, flat) and store.offsets.tolist() == [0, 3, 4, 6]
    assert store.token_ids.tolist() == list(range(6))


def test_prf_rerank_shortcut_equals_rescoring_with_the_expanded_query(scifact_index, scifact_sample):
    """rank() adds the expansion tokens' MaxSim to the first-pass scores instead of re-scoring."""
    from tasks.prf import PRFConfig

    index = LateIndex.open(scifact_index[0])
    config = PRFConfig(fb_docs=3, k=12, fb_embs=6, beta=1.0)
    for line in scifact_sample.read_text().splitlines()[:5]:
        query = index.encode(json.loads(line)["title"])
        fast = index.rank(query, 10, candidates=40, prf=config, scope="documents")  # score_documents below scores whole documents
        docs = index.candidate_documents(query, 40, min_docs=10)
        first, _ = index.score_documents(query, docs)
        expanded = index.expand(query, docs[np.argsort(-first, kind="stable")[: config.fb_docs]], config)
        assert len(expanded.vectors) > len(query.vectors)
        scores, _ = index.score_documents(expanded, docs)
        order = np.argsort(-scores, kind="stable")[:10]
        assert [d for d, _, _ in fast] == [int(docs[i]) for i in order]
        assert np.allclose([s for _, s, _ in fast], scores[order], atol=1e-4)


def test_prf_with_fewer_candidate_documents_than_fb_docs(scifact_index):
    from tasks.prf import PRFConfig

    index = LateIndex.open(scifact_index[0])
    query = index.encode("vitamin D deficiency and bone density")
    docs = index.candidate_documents(query, 1, min_docs=2)
    assert len(docs) < 10  # the first pass has fewer documents than fb_docs
    for mode in ("rerank", "retrieve"):
        ranked = index.rank(query, 2, candidates=1, prf=PRFConfig(fb_docs=10, k=12, fb_embs=4, mode=mode))
        assert 1 <= len(ranked) <= 2 and all(np.isfinite(s) for _, s, _ in ranked)


def test_batch_search_flow_writes_the_same_ranking_as_the_api(scifact_index, scifact_sample, tmp_path):
    from flows.search import search_flow

    lines = [json.loads(line) for line in scifact_sample.read_text().splitlines()[:4]]
    # a blank query, one the tokenizer reads as nothing, and one of only unknown tokens: none stops the batch
    unreadable = [{"_id": "blank", "text": "   "}, {"_id": "nul", "text": "\u0000"}, {"_id": "emoji", "text": "\U0001f600"}]
    queries = write_jsonl(tmp_path / "q.jsonl", [{"_id": f"q{i}", "text": d["title"]} for i, d in enumerate(lines)] + unreadable)
    result = search_flow(str(scifact_index[0]), str(queries), str(tmp_path / "run.parquet"), k=3)
    assert result["queries"] == 7 and sorted(result["unreadable"]) == ["blank", "emoji", "nul"] and result["rows"] == 12
    run = pq.read_table(tmp_path / "run.parquet").to_pylist()
    index = LateIndex.open(scifact_index[0])
    for i, d in enumerate(lines):
        expected = [h.doc_id for h in index.search(d["title"], k=3)]
        assert [r["doc_id"] for r in run if r["query_id"] == f"q{i}"] == expected


def test_prf_retrieve_reuses_first_pass_scores_exactly(scifact_index, scifact_sample):
    """retrieve mode equals re-scoring the second pass's candidates with the expanded query."""
    from tasks.prf import PRFConfig

    index = LateIndex.open(scifact_index[0])
    config = PRFConfig(fb_docs=3, k=12, fb_embs=6, beta=1.0, mode="retrieve")
    for line in scifact_sample.read_text().splitlines()[5:10]:
        query = index.encode(json.loads(line)["title"])
        fast = index.rank(query, 10, candidates=20, prf=config, scope="documents")
        docs = index.candidate_documents(query, 20, min_docs=10)
        first, _ = index.score_documents(query, docs)
        expanded = index.expand(query, docs[np.argsort(-first, kind="stable")[: config.fb_docs]], config)
        second = index.candidate_documents(expanded, 20, min_docs=10)
        scores, _ = index.score_documents(expanded, second)
        order = np.argsort(-scores, kind="stable")[:10]
        assert np.allclose([s for _, s, _ in fast], scores[order], atol=1e-4)
        assert [d for d, _, _ in fast] == [int(second[i]) for i in order]


def test_auto_precision_keeps_an_existing_index_precision(scifact_sample, tmp_path, prefect_harness, monkeypatch):
    """An index built at fp32 stays fp32 under the default auto, with no model work; a new one resolves auto."""
    from dataclasses import replace

    import tasks.encode as encode
    from tasks.encode import PRECISIONS

    out = tmp_path / "idx"
    first = index_flow(str(scifact_sample), str(out), replace(SMALL, precision="fp32"))
    assert first["encoding"]["precision"] == "fp32"

    def no_encoding(*args, **kwargs):
        raise AssertionError("an unchanged index was encoded again")

    monkeypatch.setattr(encode.Encoder, "forward_batch", no_encoding)
    again = index_flow(str(scifact_sample), str(out), replace(SMALL, precision="auto"))
    assert again["encoding"]["precision"] == "fp32" and again["build_key"] == first["build_key"]
    monkeypatch.undo()
    fresh = index_flow(str(scifact_sample), str(tmp_path / "fresh"), replace(SMALL, precision="auto"))
    assert fresh["encoding"]["precision"] in PRECISIONS
    assert LateIndex.open(tmp_path / "fresh").query_precision == fresh["encoding"]["precision"]
    with pytest.raises(ValueError, match="precision must be one of"):
        replace(SMALL, precision="fp16")


def test_search_verify_catches_same_size_damage(scifact_index, tmp_path, capsys):
    from lateflow.cli import main as cli_main

    out, _ = scifact_index
    shutil.copytree(out, tmp_path / "copy")
    tokens = resolve_index_dir(tmp_path / "copy") / files.TOKENS_FILE
    data = bytearray(tokens.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])  # same size: only the hash tells
    tokens.write_bytes(bytes(data))
    assert cli_main(["search", "--index", str(tmp_path / "copy"), "statins", "-k", "1", "--verify"]) == 2
    assert "content hash differs" in capsys.readouterr().err
