"""Incremental builds, index versions, the run lock and filesystem URLs, on LIMIT-small documents.

Every build here is the real index flow with the real model; "equal to a full rebuild" is checked by
building the changed corpus from scratch in another folder and comparing artifacts and searches.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.index import FDEParams, IndexConfig, index_flow
from lateflow.engine import LateIndex
from storage import index_files as files
from storage.lock import IndexLock, IndexLockedError
from storage.manifest import IndexFormatError, read_manifest, resolve_index_dir
from tasks.chunk import ChunkConfig
from tests.conftest import write_jsonl

QUERIES = ["Who likes Quokkas?", "Who likes Joshua Trees?", "Who likes Slide Rules and Bassoons?", "Who likes apples?"]


# small, fast settings: 64-token windows cut a LIMIT-small document into ~3 chunks, 1,024-dim FDEs
SMALL = IndexConfig(chunk=ChunkConfig(window=64, overlap=16), fde=FDEParams(repetitions=8, simhash_bits=3, projection_dim=16), shard_size=5)
# the same settings as `lateflow index` options
SMALL_ARGS = ["--window", "64", "--overlap", "16", "--fde-reps", "8", "--fde-bits", "3", "--fde-proj", "16"]


def config(shard_size: int = 5) -> IndexConfig:
    from dataclasses import replace

    return replace(SMALL, shard_size=shard_size)


@pytest.fixture(scope="module")
def limit_docs(limit_small) -> list[dict]:
    return [json.loads(line) for line in (limit_small / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]


def changed_corpus(docs: list[dict]) -> list[dict]:
    """From documents 0..14: delete 1..3, change 7, insert 40 after 8, move 12 to the front."""
    kept = [d for i, d in enumerate(docs[:15]) if not 1 <= i <= 3 and i != 12]
    out = [docs[12]]
    for d in kept:
        if d["_id"] == docs[7]["_id"]:
            d = {**d, "text": d["text"] + " They also like Kayaking."}
        out.append(d)
        if d["_id"] == docs[8]["_id"]:
            out.append(docs[40])
    return out


def cache_segments(index_dir: Path) -> list[int]:
    """Sizes (documents) of the segments in the index's cache."""
    return sorted(pq.ParquetFile(p).metadata.num_rows for p in (index_dir / files.CACHE_DIR).glob("docs-*.parquet"))


def assert_same_index(a: Path, b: Path) -> None:
    """Same documents, chunks and order; token vectors and FDEs equal; searches return the same ids and scores."""
    x, y = LateIndex.open(a), LateIndex.open(b)
    assert x.doc_ids == y.doc_ids
    for name in (files.DOCS_FILE, files.CHUNKS_FILE):
        assert pq.read_table(x.path / name).equals(pq.read_table(y.path / name)), name
    np.testing.assert_array_equal(x.tokens.offsets, y.tokens.offsets)
    np.testing.assert_array_equal(x.tokens.token_ids, y.tokens.token_ids)
    # different encoder batches may round a float16 differently; nothing more
    np.testing.assert_allclose(x.tokens.vectors.astype(np.float32), y.tokens.vectors.astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(files.read_fde(x.path / files.FDE_FILE), files.read_fde(y.path / files.FDE_FILE), atol=2e-2)
    for query in QUERIES:
        hx, hy = x.search(query, k=10), y.search(query, k=10)
        assert [h.doc_id for h in hx] == [h.doc_id for h in hy], query
        np.testing.assert_allclose([h.score for h in hx], [h.score for h in hy], atol=1e-3)
        assert [h.text for h in hx] == [h.text for h in hy]


def test_incremental_build_encodes_only_changes_and_equals_a_full_rebuild(tmp_path, limit_docs, prefect_harness):
    first = write_jsonl(tmp_path / "v1.jsonl", limit_docs[:15])
    second = write_jsonl(tmp_path / "v2.jsonl", changed_corpus(limit_docs))
    index = tmp_path / "index"
    m1 = index_flow(str(first), str(index), config())
    assert m1["incremental"]["segments_encoded"] == 3 and cache_segments(index) == [5, 5, 5]
    v1 = resolve_index_dir(index)
    tokens_before = {p.name: p.stat().st_mtime_ns for p in (index / files.CACHE_DIR).glob("tokens-*.parquet")}

    m2 = index_flow(str(second), str(index), config())
    inc = m2["incremental"]
    assert (inc["docs_new"], inc["docs_changed"], inc["docs_removed"], inc["docs_unchanged"]) == (1, 1, 3, 11)
    # the one new and the one changed document form the only segment that went through the encoder
    assert inc["docs_encoded"] == 2 and inc["segments_encoded"] == 1 and inc["segments_reused"] == 3
    for name, mtime in tokens_before.items():
        path = index / files.CACHE_DIR / name
        assert not path.exists() or path.stat().st_mtime_ns == mtime  # reused files are never rewritten
    # the first segment kept 2 of 5 documents: compacted; the new segment holds 2
    assert cache_segments(index) == [2, 2, 5, 5]
    assert m2["counts"]["docs"] == 15 - 3 + 1

    index_flow(str(second), str(tmp_path / "full"), config())
    assert_same_index(index, tmp_path / "full")

    # the previous version is still there and readable; the current one is the new version
    assert resolve_index_dir(index).name == m2["version"] != v1.name
    old = LateIndex.open(v1)
    assert len(old) == 15 and old.doc_ids[:2] == [limit_docs[0]["_id"], limit_docs[1]["_id"]]

    # unchanged corpus: nothing is rebuilt, the same version is returned
    again = index_flow(str(second), str(index), config())
    assert again["version"] == m2["version"] and again["index_id"] == m2["index_id"]


def test_versions_switch_atomically_and_old_ones_are_pruned(tmp_path, limit_docs, prefect_harness):
    index = tmp_path / "index"
    corpora = [write_jsonl(tmp_path / f"c{n}.jsonl", limit_docs[: 10 + 2 * n]) for n in range(3)]
    index_flow(str(corpora[0]), str(index), config())
    versions = [read_manifest(index)["version"]]

    # a reader polling the index while new versions are built always sees a complete one
    seen, errors, stop = set(), [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                manifest = read_manifest(index)
                folder = resolve_index_dir(index)
                assert all((folder / name).is_file() for name in manifest["files"])
                seen.add(manifest["version"])
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(exc))
            time.sleep(0.005)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for corpus in corpora[1:]:
            versions.append(index_flow(str(corpus), str(index), config())["version"])
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:3]
    assert versions[-1] in seen and len(set(versions)) == 3

    top = json.loads((index / "manifest.json").read_text())
    assert top["current"] == f"versions/{versions[2]}" and top["previous_versions"] == [versions[1]]
    assert all((index / name).is_file() for name in top["files"])  # pointer names files relative to INDEX
    assert sorted(p.name for p in (index / "versions").iterdir()) == sorted(versions[1:])  # keep 2

    # a build killed during assembly leaves a version folder without a manifest: never current,
    # removed by the next build
    leftover = index / "versions" / "20000101T000000Z-deadbeef"
    shutil.copytree(index / "versions" / versions[2], leftover)
    (leftover / "manifest.json").unlink()
    assert resolve_index_dir(index).name == versions[2]
    # going back to an earlier corpus: its version was pruned, so it is rebuilt from cached segments
    back = index_flow(str(corpora[0]), str(index), config())
    assert back["incremental"]["segments_encoded"] == 0
    assert not leftover.exists()
    assert sorted(p.name for p in (index / "versions").iterdir()) == sorted([versions[2], back["version"]])


def test_a_version_written_but_not_switched_to_is_adopted_without_work(tmp_path, limit_docs, prefect_harness):
    # the state a run killed between writing its manifest and switching leaves behind
    corpus_a = write_jsonl(tmp_path / "a.jsonl", limit_docs[:6])
    corpus_b = write_jsonl(tmp_path / "b.jsonl", limit_docs[:8])
    index, other = tmp_path / "index", tmp_path / "other"
    index_flow(str(corpus_a), str(index), config())
    built = index_flow(str(corpus_b), str(other), config())
    shutil.copytree(resolve_index_dir(other), index / "versions" / built["version"])
    adopted = index_flow(str(corpus_b), str(index), config())
    assert adopted["version"] == built["version"] and adopted["index_id"] == built["index_id"]
    assert resolve_index_dir(index).name == built["version"]


def test_an_index_written_before_versions_still_opens_and_migrates(tmp_path, limit_docs, prefect_harness):
    corpus = write_jsonl(tmp_path / "c.jsonl", limit_docs[:6])
    index_flow(str(corpus), str(tmp_path / "new"), config())
    legacy = tmp_path / "legacy"
    shutil.copytree(resolve_index_dir(tmp_path / "new"), legacy)  # artifacts + format 1 manifest at top level
    assert resolve_index_dir(legacy) == legacy
    assert LateIndex.open(legacy).search(QUERIES[0], k=1)

    grown = write_jsonl(tmp_path / "c2.jsonl", limit_docs[:7])
    index_flow(str(grown), str(legacy), config())
    assert resolve_index_dir(legacy).parent == legacy / "versions"
    assert (legacy / files.TOKENS_FILE).exists()  # the old layout's files stay readable for one more build
    index_flow(str(corpus), str(legacy), config())
    assert not (legacy / files.TOKENS_FILE).exists()
    assert len(LateIndex.open(legacy)) == 6


def test_a_second_run_on_a_locked_index_fails_at_once(tmp_path, limit_docs, prefect_harness):
    import os

    corpus = write_jsonl(tmp_path / "c.jsonl", limit_docs[:5])
    with IndexLock(tmp_path / "index"):
        started = time.perf_counter()
        with pytest.raises(IndexLockedError, match=rf"index folder .*index is locked by pid {os.getpid()} since .* \(another lateflow index run\)"):
            index_flow(str(corpus), str(tmp_path / "index"), config())
        # failing at once means not waiting for the holder (here the test itself); the bound is generous
        # so a loaded CI machine's slow flow start-up is not taken for waiting
        assert time.perf_counter() - started < 120
    index_flow(str(corpus), str(tmp_path / "index"), config())  # released: the run goes through


def test_file_urls_and_an_fsspec_cache_and_corpus(tmp_path, limit_docs, prefect_harness):
    corpus = write_jsonl(tmp_path / "c.jsonl", limit_docs[:8])
    # file:// URLs for the corpus and the index folder
    index_flow(f"file://{corpus}", f"file://{tmp_path / 'url'}", config(shard_size=4))
    assert LateIndex.open(tmp_path / "url").path.parent == tmp_path / "url" / "versions"
    # a corpus and a shard cache on a non-POSIX filesystem (fsspec's in-memory one): no renames, no local paths
    memory = fsspec.filesystem("memory")
    root = f"lateflow-test-{tmp_path.name}"
    memory.pipe(f"/{root}/corpus.jsonl", corpus.read_bytes())
    try:
        manifest = index_flow(f"memory://{root}", str(tmp_path / "remote"), config(shard_size=4), cache=f"memory://{root}/cache")
        assert manifest["corpus"]["path"] == f"memory://{root}"
        assert len(memory.glob(f"/{root}/cache/tokens-*.parquet")) == 2
        assert not (tmp_path / "remote" / files.CACHE_DIR).exists()
        assert_same_index(tmp_path / "url", tmp_path / "remote")
        again = index_flow(f"memory://{root}", str(tmp_path / "remote"), config(shard_size=4), cache=f"memory://{root}/cache")
        assert again["index_id"] == manifest["index_id"]
    finally:
        memory.rm(f"/{root}", recursive=True)
    with pytest.raises(ValueError, match="must be a local path or file:// URL"):
        index_flow(str(corpus), "memory://somewhere/index", config())


def test_reading_a_missing_index_names_the_problem(tmp_path):
    with pytest.raises(IndexFormatError, match="no such index folder"):
        read_manifest(tmp_path / "nothing")
    (tmp_path / "corpus.jsonl").write_text("{}\n")
    with pytest.raises(IndexFormatError, match="a file, not an index folder"):
        read_manifest(tmp_path / "corpus.jsonl")


def test_a_failed_assembly_leaves_no_version_behind(tmp_path, limit_docs, prefect_harness, monkeypatch):
    """A full disk while assembling: the error names the file, the current version stays, no debris."""
    index = tmp_path / "index"
    index_flow(str(write_jsonl(tmp_path / "a.jsonl", limit_docs[:8])), str(index), config())
    before = sorted(p.name for p in (index / "versions").iterdir())

    def disk_full(index_obj, path):
        from storage.atomic import atomic_path

        with atomic_path(path):
            raise OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(files, "write_faiss", disk_full)
    bigger = write_jsonl(tmp_path / "b.jsonl", limit_docs[:10])
    with pytest.raises(OSError, match=r"ann\.faiss: .*No space left"):
        index_flow(str(bigger), str(index), config())
    assert sorted(p.name for p in (index / "versions").iterdir()) == before
    LateIndex.open(index)  # the current version still serves
    # a version folder a killed run left without a manifest goes at the next run
    (index / "versions" / "20000101T000000Z-deadbeef").mkdir()
    monkeypatch.undo()
    index_flow(str(bigger), str(index), config())
    assert "20000101T000000Z-deadbeef" not in [p.name for p in (index / "versions").iterdir()]


def test_a_damaged_cache_shard_is_recomputed(tmp_path, limit_docs, prefect_harness):
    index = tmp_path / "index"
    index_flow(str(write_jsonl(tmp_path / "a.jsonl", limit_docs[:10])), str(index), config())
    shards = sorted((index / ".cache").glob("tokens-*.parquet"))
    assert len(shards) == 2
    damaged = shards[0]
    with open(damaged, "r+b") as handle:
        handle.truncate(5000)  # a full disk or a bad copy: the footer is gone
    manifest = index_flow(str(write_jsonl(tmp_path / "b.jsonl", limit_docs[:11])), str(index), config())
    assert manifest["incremental"]["segments_encoded"] == 2  # the damaged segment and the new document's
    pq.read_metadata(damaged)  # rewritten whole
    fresh = index_flow(str(tmp_path / "b.jsonl"), str(tmp_path / "fresh"), config())
    assert manifest["counts"] == fresh["counts"]
    assert [h.doc_id for h in LateIndex.open(index).search(QUERIES[0], k=5)] == [h.doc_id for h in LateIndex.open(tmp_path / "fresh").search(QUERIES[0], k=5)]


def _flip_a_byte_inside(path: Path, column: str) -> None:
    """Damage ``column``'s data in place: same size, footer intact (bit rot, a bad sector)."""
    meta = pq.read_metadata(path).row_group(0)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column)
    # a dictionary-encoded column keeps most of its bytes in the dictionary page, which comes first
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    middle = start + chunk.total_compressed_size // 2
    with open(path, "r+b") as handle:
        handle.seek(middle)
        byte = handle.read(1)
        handle.seek(middle)
        handle.write(bytes([byte[0] ^ 0x10]))


def test_a_cache_shard_damaged_inside_is_caught_by_its_page_checksums(tmp_path, limit_docs, prefect_harness):
    """A flipped byte in a cached token matrix must not be gathered into the index and blessed by its manifest."""
    index = tmp_path / "index"
    index_flow(str(write_jsonl(tmp_path / "a.jsonl", limit_docs[:10])), str(index), config())
    damaged = sorted((index / ".cache").glob("tokens-*.parquet"))[0]
    _flip_a_byte_inside(damaged, "embeddings")
    pq.read_table(damaged)  # unchecked, the damage reads as data
    grown = write_jsonl(tmp_path / "b.jsonl", limit_docs[:11])
    with pytest.raises(IndexFormatError, match=r"tokens-.*page checksums do not match.*it was deleted: run the same command again"):
        index_flow(str(grown), str(index), config())
    assert not damaged.exists()
    LateIndex.open(index)  # the current version still serves
    manifest = index_flow(str(grown), str(index), config())
    assert manifest["incremental"]["segments_encoded"] == 1  # the damaged one (the failed run encoded the new document's)
    fresh = index_flow(str(grown), str(tmp_path / "fresh"), config())
    assert [h.doc_id for h in LateIndex.open(index).search(QUERIES[0], k=5)] == [h.doc_id for h in LateIndex.open(tmp_path / "fresh").search(QUERIES[0], k=5)]
    # a resumed run that computes FDEs from cached tokens checks them too
    fde = sorted((index / ".cache").glob("fde-*.parquet"))
    tokens = sorted((index / ".cache").glob("tokens-*.parquet"))
    for path in fde:
        path.unlink()
    _flip_a_byte_inside(tokens[0], "embeddings")
    third = write_jsonl(tmp_path / "c.jsonl", limit_docs[:12])
    with pytest.raises(IndexFormatError, match="page checksums do not match"):
        index_flow(str(third), str(index), config())
    assert not tokens[0].exists()
    # and no FDE of the damaged tokens stayed cached: the next run's FDEs are a fresh build's, bit for bit
    index_flow(str(third), str(index), config())
    index_flow(str(third), str(tmp_path / "fresh3"), config())
    fdes = [files.read_fde(LateIndex.open(path).path / files.FDE_FILE) for path in (index, tmp_path / "fresh3")]
    np.testing.assert_array_equal(*fdes)


def test_the_chunk_and_encode_stages_check_the_cached_files_they_read(tmp_path, limit_docs, prefect_harness):
    """Damaged docs text or chunk ids must not be chunked or encoded into files with fresh, valid checksums."""
    from dataclasses import replace

    corpus = write_jsonl(tmp_path / "a.jsonl", limit_docs[:5])
    index, cache = tmp_path / "index", tmp_path / "index" / ".cache"
    index_flow(str(corpus), str(index), config())
    # another window re-chunks the cached documents: the chunk stage reads the segment's docs file
    docs_file = next(cache.glob("docs-*.parquet"))
    _flip_a_byte_inside(docs_file, "text")
    assert pq.read_table(docs_file).column("text").to_pylist() != [d["text"] for d in limit_docs[:5]]  # unchecked, damage reads as text
    wider = replace(config(), chunk=ChunkConfig(window=48, overlap=16))
    with pytest.raises(IndexFormatError, match=r"docs-.*page checksums do not match.*it was deleted"):
        index_flow(str(corpus), str(index), wider)
    assert not docs_file.exists() and len(list(cache.glob("chunks-*.parquet"))) == 1  # no chunks of the damaged text
    index_flow(str(corpus), str(index), wider)
    index_flow(str(corpus), str(tmp_path / "fresh"), wider)
    assert_same_index(index, tmp_path / "fresh")
    # another encoder setting re-encodes the cached chunks: the encode stage reads the chunks file
    tokens_before = set(cache.glob("tokens-*.parquet"))
    for path in cache.glob("chunks-*.parquet"):
        _flip_a_byte_inside(path, "input_ids.list.element")
    other_encoder = replace(wider, drop_punctuation=not wider.drop_punctuation)
    with pytest.raises(IndexFormatError, match=r"chunks-.*page checksums do not match.*it was deleted"):
        index_flow(str(corpus), str(index), other_encoder)
    assert set(cache.glob("tokens-*.parquet")) <= tokens_before  # no tokens of the damaged ids were cached
    index_flow(str(corpus), str(index), other_encoder)
    index_flow(str(corpus), str(tmp_path / "fresh2"), other_encoder)
    assert_same_index(index, tmp_path / "fresh2")


def test_a_damaged_file_found_while_compacting_the_cache_does_not_fail_a_live_build(tmp_path, limit_docs, prefect_harness, caplog):
    index, cache = tmp_path / "index", tmp_path / "index" / ".cache"
    index_flow(str(write_jsonl(tmp_path / "a.jsonl", limit_docs[:10])), str(index), config())
    for path in cache.glob("docs-*.parquet"):
        _flip_a_byte_inside(path, "text")
    # 2 of the first segment's 5 documents stay: that segment is compacted after the switch
    shrunk = write_jsonl(tmp_path / "b.jsonl", limit_docs[:2] + limit_docs[5:10])
    manifest = index_flow(str(shrunk), str(index), config())
    assert manifest["outcome"] == "built"
    assert len(LateIndex.open(index).doc_ids) == 7
    assert "damaged cache file" in caplog.text
    assert len(list(cache.glob("docs-*.parquet"))) == 1  # the damaged file of the compacted segment was deleted, the other kept


def test_a_checksum_failure_is_read_twice_and_a_file_that_cannot_be_deleted_is_not_called_deleted(tmp_path, monkeypatch):
    from storage import segments

    path = tmp_path / "tokens-x.parquet"
    path.write_bytes(b"cached")
    crc = OSError("Could not read page: CRC checksum verification failed")
    reads = iter([crc, "the table"])

    def flaky():
        value = next(reads)
        if isinstance(value, Exception):
            raise value
        return value

    assert segments.read_checked(str(path), flaky) == "the table" and path.exists()  # a transient bad read: kept

    def refuse(target):
        raise PermissionError(13, "read-only cache", str(target))

    def always():
        raise crc

    monkeypatch.setattr(segments.fs, "delete", refuse)
    with pytest.raises(IndexFormatError, match="could not be deleted.*read-only cache.*delete it by hand") as caught:
        segments.read_checked(str(path), always)
    assert "it was deleted" not in str(caught.value) and path.exists()
    # another error of the reader (its own IndexFormatError too): the file stays, the message says how to recompute it
    with pytest.raises(IndexFormatError, match="unreadable.*delete it and run again"):
        segments.read_checked(str(path), lambda: (_ for _ in ()).throw(IndexFormatError("x: unreadable")))
    assert path.exists()


def test_indexes_sharing_a_cache_keep_each_others_segments(tmp_path, limit_docs, prefect_harness):
    from dataclasses import replace

    cache = str(tmp_path / "shared-cache")
    tokens = lambda: {p.name for p in Path(cache).glob("tokens-*.parquet")}  # noqa: E731
    first, second = write_jsonl(tmp_path / "a.jsonl", limit_docs[:10]), write_jsonl(tmp_path / "b.jsonl", limit_docs[20:30])
    index_flow(str(first), str(tmp_path / "A"), config(), cache=cache)
    of_a = tokens()
    other = replace(config(), fde=FDEParams(repetitions=4, simhash_bits=2, projection_dim=8))  # other segment keys
    index_flow(str(second), str(tmp_path / "B"), other, cache=cache)
    of_b = tokens() - of_a
    assert len(of_a) == len(of_b) == 2
    # B's build must not have pruned A's segments: adding one document to A encodes that one only
    grown = index_flow(str(write_jsonl(tmp_path / "a2.jsonl", limit_docs[:11])), str(tmp_path / "A"), config(), cache=cache)
    assert grown["incremental"]["docs_encoded"] == 1
    again = index_flow(str(second), str(tmp_path / "B2"), other, cache=cache)  # nor A's build B's
    assert again["incremental"]["docs_encoded"] == 0
    # once the index folders that used them are gone, their files go at the next build of A
    shutil.rmtree(tmp_path / "B")
    shutil.rmtree(tmp_path / "B2")
    index_flow(str(write_jsonl(tmp_path / "a3.jsonl", limit_docs[:12])), str(tmp_path / "A"), config(), cache=cache)
    assert not tokens() & of_b and of_a <= tokens() and len(tokens()) == 4


def test_the_flow_says_whether_it_built_adopted_or_found_nothing_to_do(tmp_path, limit_docs, prefect_harness):
    a, b = write_jsonl(tmp_path / "a.jsonl", limit_docs[:6]), write_jsonl(tmp_path / "b.jsonl", limit_docs[:7])
    index = str(tmp_path / "index")
    first = index_flow(str(a), index, config())
    assert first["outcome"] == "built" and "outcome" not in read_manifest(index)
    assert index_flow(str(a), index, config())["outcome"] == "up_to_date"
    assert index_flow(str(b), index, config())["outcome"] == "built"
    back = index_flow(str(a), index, config())  # the corpus went back: the kept previous version is switched to
    assert back["outcome"] == "adopted" and back["version"] == first["version"]


def test_a_metadata_only_change_is_counted_and_encodes_nothing(tmp_path, limit_docs, prefect_harness):
    docs = [{**d, "source": "a"} for d in limit_docs[:6]]
    index = str(tmp_path / "index")
    index_flow(str(write_jsonl(tmp_path / "a.jsonl", docs)), index, config())
    docs[2] = {**docs[2], "source": "b"}
    manifest = index_flow(str(write_jsonl(tmp_path / "b.jsonl", docs)), index, config())
    inc = manifest["incremental"]
    assert inc["docs_metadata_changed"] == 1 and inc["docs_unchanged"] == 6 and inc["docs_encoded"] == 0
    assert [h.doc_id for h in LateIndex.open(index).search(QUERIES[0], k=6, filter={"source": "b"})] == [docs[2]["_id"]]


def test_prune_waits_for_a_building_index_and_keeps_registered_files(tmp_path):
    import os

    from storage import segments as seg

    cache = tmp_path / "cache"
    cache.mkdir()
    names = ["docs-a.parquet", "tokens-a.parquet", "tokens-b.parquet", "fde-c.parquet", ".tokens-x.parquet.1234.tmp"]
    for name in names:
        (cache / name).write_bytes(b"x")
    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir(), b.mkdir()
    seg.register_cache_user(str(cache), str(b), set(), building=True)  # B is reading the catalog
    assert seg.prune_cache(str(cache), {str(cache / "docs-a.parquet")}, str(a)) == 0
    seg.register_cache_user(str(cache), str(b), {str(cache / "tokens-b.parquet")}, building=False)
    assert seg.prune_cache(str(cache), {str(cache / "docs-a.parquet")}, str(a)) == 2  # tokens-a, fde-c
    assert sorted(p.name for p in cache.iterdir() if p.is_file()) == sorted(["docs-a.parquet", "tokens-b.parquet", ".tokens-x.parquet.1234.tmp"])
    # a temporary another index's build may be writing stays, until it is a day old
    old = time.time() - 2 * seg.BUILDING_EXPIRES_SECONDS
    os.utime(cache / ".tokens-x.parquet.1234.tmp", (old, old))
    assert seg.prune_cache(str(cache), {str(cache / "docs-a.parquet")}, str(a)) == 1
    # a building mark a killed run left expires too
    seg.register_cache_user(str(cache), str(b), set(), building=True)
    entry = next((cache / seg.USERS_DIR).glob("*.json"))
    data = json.loads(entry.read_text())
    entry.write_text(json.dumps({**data, "at": old}))
    assert seg.prune_cache(str(cache), {str(cache / "docs-a.parquet")}, str(a)) == 1  # tokens-b, no longer registered


def test_a_remote_cache_keeps_registrations_of_folders_it_cannot_see(tmp_path):
    """On object storage shared by hosts, another host's index folder is not on this disk."""
    from storage import segments as seg

    cache = f"memory://{tmp_path.name}-cache"
    seg.register_cache_user(cache, "/elsewhere/on/another/host/index", {f"{cache}/tokens-b.parquet"}, building=False)
    fsspec.filesystem("memory").pipe(f"/{tmp_path.name}-cache/tokens-b.parquet", b"x")
    assert seg.prune_cache(cache, set(), str(tmp_path / "A")) == 0
    fsspec.filesystem("memory").rm(f"/{tmp_path.name}-cache", recursive=True)
