"""Segments: the reusable unit of the index flow's shard cache, and incremental assembly from them.

A *segment* is a set of documents that went through chunk -> encode -> FDE together. Its files live in
the cache folder (``INDEX/.cache`` unless ``--cache`` names another place), named by content:

* ``docs-<D>.parquet``   the segment's documents, ``D = stable_key(doc ids, content hashes)``;
* ``chunks-<C>.parquet`` ``C`` hashes ``D``, the chunk settings, the model fingerprint, the pipeline version;
* ``tokens-<T>.parquet`` ``T`` hashes ``C`` and the encoder settings;
* ``fde-<F>.parquet``    ``F`` hashes ``T`` and the FDE settings.

The ``docs-*`` files are the catalog: they say which ``(doc_id, content_hash)`` a segment holds. A new
run takes each corpus document from a segment that holds exactly that id and content (new or
changed documents are in none), cuts only the remaining documents into new segments of
``shard_size``, runs the missing stages, and assembles the index by taking each document's rows from
its segment in corpus order. Deleted documents are simply not taken. Inserting one document
therefore encodes one small segment, not every shard after it, and the assembled index is the one a
full rebuild would produce (the same documents, chunks and order; vectors equal up to the float
noise of different encoder batches).

After a build, segments that hold no live document are deleted, and a segment whose live documents
are fewer than half of its documents is *compacted* (rewritten with its live rows only), so the cache
stays within about twice the size of the live index however the corpus churns.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from storage import fs
from storage.atomic import atomic_path, parquet_writer
from storage.hashing import stable_key
from storage.manifest import IndexFormatError

DOC_PREFIX, CHUNK_PREFIX, TOKEN_PREFIX, FDE_PREFIX = "docs-", "chunks-", "tokens-", "fde-"
STAGES = ("chunks", "tokens", "fde")


@dataclass(frozen=True)
class SegmentSettings:
    """Everything besides the documents that determines a segment's stage files."""

    pipeline_version: int
    chunk: dict[str, Any]
    model_fingerprint: str
    encoder: dict[str, Any]
    fde: dict[str, Any]

    def key(self) -> str:
        """One hash of all settings (part of the index's build key)."""
        return stable_key(self.pipeline_version, self.chunk, self.model_fingerprint, self.encoder, self.fde)


def docs_key(doc_ids: list[str], content_hashes: list[str]) -> str:
    """Key of a segment's documents (order matters: it is the segment's row order).

    Examples
    --------
    >>> docs_key(["a", "b"], ["h1", "h2"]) == docs_key(["a", "b"], ["h1", "h2"]) != docs_key(["b", "a"], ["h2", "h1"])
    True
    """
    return stable_key(doc_ids, content_hashes)


@dataclass
class Segment:
    """One segment: its documents and the paths (or URLs) of its stage files for given settings."""

    key: str
    doc_ids: list[str]
    content_hashes: list[str]
    docs: str
    chunks: str
    tokens: str
    fde: str
    new: bool = False
    # filled by the flow: was each stage file already there when the run planned its work?
    present: dict[str, bool] = field(default_factory=dict)

    def paths(self) -> dict[str, str]:
        return {"docs": self.docs, "chunks": self.chunks, "tokens": self.tokens, "fde": self.fde}

    def complete(self) -> bool:
        return all(self.present.get(stage, False) for stage in STAGES)


def make_segment(cache: str, doc_ids: list[str], content_hashes: list[str], settings: SegmentSettings, *, new: bool = False) -> Segment:
    """The segment of these documents with its stage file paths under ``settings`` (nothing is written)."""
    key = docs_key(doc_ids, content_hashes)
    chunk_key = stable_key(settings.pipeline_version, key, settings.chunk, settings.model_fingerprint)
    token_key = stable_key(chunk_key, settings.encoder)
    fde_key = stable_key(token_key, settings.fde)
    return Segment(
        key=key,
        doc_ids=doc_ids,
        content_hashes=content_hashes,
        docs=fs.join(cache, f"{DOC_PREFIX}{key}.parquet"),
        chunks=fs.join(cache, f"{CHUNK_PREFIX}{chunk_key}.parquet"),
        tokens=fs.join(cache, f"{TOKEN_PREFIX}{token_key}.parquet"),
        fde=fs.join(cache, f"{FDE_PREFIX}{fde_key}.parquet"),
        new=new,
    )


def stage_file_usable(path: str) -> bool:
    """Whether a segment's stage file exists and its Parquet footer reads; a damaged one is deleted.

    The cache is disposable: a truncated or overwritten shard (a full disk, a bad copy) would
    otherwise stop every later build with pyarrow's error, while recomputing the stage is all it
    takes. Damage inside a file whose footer reads is caught where the file is read
    (:func:`read_stage_file`).
    """
    if not fs.exists(path):
        return False
    try:
        fs.read_parquet_metadata(path)
        return True
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            # the system failed, not the file (too many open files, a network error on object
            # storage): deleting a sound shard would throw away finished work
            raise
        logging.getLogger("lateflow.index").warning("%s: damaged cache file, deleted and recomputed (%s)", path, exc)
        fs.delete(path)
        return False


def read_stage_file(path: str, columns: list[str] | None = None, *, memory_map: bool = False, verify: bool = False) -> pa.Table:
    """Read a segment's stage file; damage gets an :class:`IndexFormatError` that names the file and the fix.

    ``verify`` checks the pages' CRCs (stage files are written with them, :func:`storage.shards.run_cached`):
    for a file that sat in the cache since an earlier run, where a flipped byte would otherwise be
    gathered into the index and blessed by its manifest's sha256. A file written by this run is
    not re-checked. A file that fails twice is deleted (:func:`read_checked`).
    """
    if not verify:
        try:
            return fs.read_parquet(path, columns=columns, memory_map=memory_map)
        except (pa.ArrowInvalid, OSError) as exc:
            raise damaged_cache_file(path, exc) from exc
    return read_checked(path, lambda: fs.read_parquet(path, columns=columns, memory_map=memory_map, verify_checksums=True))


def read_checked(path: str, read: Callable[[], Any]) -> Any:
    """``read()`` of a cache file at ``path`` that checks its page CRCs, with damage handled.

    A CRC failure is read once more before anything is decided: a transient bad read (a network
    filesystem, a bit flipped in the reader's memory) passes the second time, and the sound file is
    kept. A second failure proves the bytes on disk are damaged (:func:`damaged_cache_file` deletes
    the file and says so). Any other read error (``read``'s own :class:`IndexFormatError` included)
    keeps the file and gets the cache's message: the file, the cause, and how to recompute it.
    """
    for attempt in (1, 2):
        try:
            return read()
        except (pa.ArrowInvalid, OSError, IndexFormatError) as exc:
            cause = exc.__cause__ if isinstance(exc, IndexFormatError) and exc.__cause__ is not None else exc
            if not failed_checksum(cause):
                raise damaged_cache_file(path, cause) from exc
            if attempt == 2:
                raise damaged_cache_file(path, cause) from exc
            logging.getLogger("lateflow.index").warning("%s: page checksums failed (%s); reading it once more", path, cause)
            # the error's traceback holds the first attempt's arrays: drop it before reading again
            del cause
    raise AssertionError("unreachable")


def failed_checksum(exc: BaseException) -> bool:
    """Whether ``exc`` is pyarrow's report of a data page whose CRC does not match its bytes."""
    return isinstance(exc, OSError) and "crc checksum verification failed" in str(exc).lower()


def damaged_cache_file(path: str, exc: BaseException) -> IndexFormatError:
    """The error for a cache file that could not be read; one that failed its checksums is deleted first.

    A checksum failure (read twice, :func:`read_checked`) proves the bytes are damaged, so the file
    can only be recomputed: deleting it makes the next run do that. Any other error may be the
    system's (a network filesystem, too many open files), so the file stays and the user is told
    what to do. So is a damaged file that cannot be deleted (a read-only cache).
    """
    if not failed_checksum(exc):
        return IndexFormatError(f"{path}: damaged or missing cache file ({exc}); delete it and run again: the next run recomputes it")
    try:
        fs.delete(path)
    except Exception as failure:  # noqa: BLE001 - any filesystem's refusal; the message must not claim a deletion
        logging.getLogger("lateflow.index").warning("%s: damaged cache file (%s), could not delete it (%s)", path, exc, failure)
        return IndexFormatError(
            f"{path}: damaged cache file, its page checksums do not match ({exc}); it could not be deleted ({failure}): "
            "delete it by hand, then run the same command again, the next run recomputes it"
        )
    logging.getLogger("lateflow.index").warning("%s: damaged cache file (%s), deleted", path, exc)
    return IndexFormatError(f"{path}: damaged cache file, its page checksums do not match ({exc}); it was deleted: run the same command again, the next run recomputes it")


USERS_DIR = ".lateflow-users"


def register_cache_user(cache: str, index_dir: str, files: set[str], *, building: bool) -> None:
    """Record in the cache which of its files the index at ``index_dir`` uses, and whether it is building.

    Index folders may share a cache (``--cache``; segments are keyed by their settings, so indexes
    that differ only in later stages reuse each other's chunks and tokens). A build prunes what no
    registered index uses (:func:`prune_cache`): pruning by its own needs alone deleted the other
    indexes' segments, so their next update re-encoded everything and a build running at the time
    failed on a vanished file. A build marks itself ``building`` before it reads the catalog (no
    other index prunes anything meanwhile: what it is about to reuse is not registered yet), then
    registers its plan, and after pruning what it kept, no longer building.
    """
    entry = {"index": index_dir, "files": sorted(_name(path) for path in files), "building": building, "at": time.time()}
    fs.makedirs(f"{cache}/{USERS_DIR}")
    _write_text(f"{cache}/{USERS_DIR}/{hashlib.sha256(index_dir.encode()).hexdigest()[:16]}.json", json.dumps(entry))


# a build marked as running for longer than this was killed: it no longer holds other prunes back
BUILDING_EXPIRES_SECONDS = 24 * 3600


@dataclass
class OtherUsers:
    """What the other index folders registered in a shared cache."""

    files: set[str] = field(default_factory=set)
    count: int = 0
    building: bool = False


def _other_users(cache: str, index_dir: str) -> OtherUsers:
    found = OtherUsers()
    for path in fs.list_files(f"{cache}/{USERS_DIR}", suffix=".json"):
        try:
            entry = json.loads(_read_text(path))
            other = str(entry["index"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # half-written by a killed run: that index re-registers at its next build
        if other == index_dir:
            continue
        # only a local cache can tell that another index folder is gone: on object storage shared
        # by several hosts, a folder missing here may live on another machine
        if fs.is_local(cache) and not Path(other).is_dir():
            fs.delete(path)
            continue
        found.count += 1
        found.files.update(entry.get("files", []))
        if entry.get("building") and time.time() - float(entry.get("at", 0)) < BUILDING_EXPIRES_SECONDS:
            found.building = True
    return found


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1]


def _read_text(path: str) -> str:
    if fs.is_local(path):
        return fs.local_path(path).read_text(encoding="utf-8")
    filesystem, inner = fs.resolve(path)
    with filesystem.open_input_stream(inner) as stream:
        return stream.read().decode("utf-8")


def _write_text(path: str, text: str) -> None:
    if fs.is_local(path):
        from storage.atomic import write_bytes

        write_bytes(text.encode("utf-8"), fs.local_path(path))
        return
    filesystem, inner = fs.resolve(path)
    with filesystem.open_output_stream(inner) as stream:
        stream.write(text.encode("utf-8"))


def read_catalog(cache: str, settings: SegmentSettings) -> list[Segment]:
    """Every segment in the cache (from its ``docs-*`` file), with which stage files exist."""
    segments = []
    for path in fs.list_files(cache, DOC_PREFIX, ".parquet"):
        try:
            table = fs.read_parquet(path, columns=["doc_id", "content_hash"])
        except (pa.ArrowInvalid, OSError):
            continue  # not ours or damaged: never reused, removed by the next prune
        segment = make_segment(cache, table.column("doc_id").to_pylist(), table.column("content_hash").to_pylist(), settings)
        if segment.docs != path:
            continue  # a file whose name does not match its content is never trusted
        segment.present = {stage: stage_file_usable(getattr(segment, stage)) for stage in STAGES}
        segments.append(segment)
    return segments


@dataclass
class Plan:
    """Which segment every corpus document comes from.

    ``segments`` are the segments the index uses (reused ones first, then new ones);
    ``assignment[i]`` is the index in ``segments`` of corpus document ``i``.
    """

    segments: list[Segment]
    assignment: np.ndarray
    new_docs: pa.Table  # documents that no segment held (cut into the new segments)

    @property
    def reused_docs(self) -> int:
        return int(len(self.assignment) - self.new_docs.num_rows)


def plan_segments(docs: pa.Table, catalog: list[Segment], cache: str, settings: SegmentSettings, shard_size: int) -> Plan:
    """Assign each document to a segment that holds it, and cut the others into new segments.

    Among segments holding a document, the one with the most finished stages wins (then the key,
    for determinism). New documents are cut into segments of ``shard_size`` in corpus order, so a
    resumed run cuts the same segments as the run it resumes.

    Examples
    --------
    >>> import pyarrow as pa
    >>> s = SegmentSettings(1, {}, "m", {}, {})
    >>> old = make_segment("/c", ["a", "b"], ["1", "2"], s)
    >>> old.present = {"chunks": True, "tokens": True, "fde": True}
    >>> docs = pa.table({"doc_id": ["a", "x", "b", "y", "z"], "content_hash": ["1", "9", "3", "8", "7"]})
    >>> plan = plan_segments(docs, [old], "/c", s, shard_size=2)
    >>> [seg.doc_ids for seg in plan.segments], plan.assignment.tolist()
    ([['a', 'b'], ['x', 'b'], ['y', 'z']], [0, 1, 1, 2, 2])
    """
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    ranked = sorted(catalog, key=lambda seg: (-sum(seg.present.get(st, False) for st in STAGES), seg.key))
    holder: dict[tuple[str, str], int] = {}
    for index, segment in enumerate(ranked):
        for pair in zip(segment.doc_ids, segment.content_hashes):
            holder.setdefault(pair, index)
    ids = docs.column("doc_id").to_pylist()
    hashes = docs.column("content_hash").to_pylist()
    chosen = [holder.get(pair) for pair in zip(ids, hashes)]
    used = sorted({c for c in chosen if c is not None})
    segments = [ranked[c] for c in used]
    position = {c: i for i, c in enumerate(used)}
    assignment = np.full(len(ids), -1, dtype=np.int64)
    new_rows = []
    for row, c in enumerate(chosen):
        if c is None:
            new_rows.append(row)
        else:
            assignment[row] = position[c]
    new_docs = docs.take(pa.array(new_rows, type=pa.int64()))
    for start in range(0, len(new_rows), shard_size):
        rows = new_rows[start : start + shard_size]
        segment = make_segment(cache, [ids[r] for r in rows], [hashes[r] for r in rows], settings, new=True)
        assignment[rows] = len(segments)
        segments.append(segment)
    return Plan(segments=segments, assignment=assignment, new_docs=new_docs)


def doc_row_ranges(chunk_doc_ids: list[str]) -> dict[str, tuple[int, int]]:
    """Rows ``[start, end)`` of each document in a segment's chunk table (a document's chunks are contiguous).

    Examples
    --------
    >>> doc_row_ranges(["a", "a", "b", "c", "c"])
    {'a': (0, 2), 'b': (2, 3), 'c': (3, 5)}
    """
    ranges: dict[str, tuple[int, int]] = {}
    start = 0
    for row in range(1, len(chunk_doc_ids) + 1):
        if row == len(chunk_doc_ids) or chunk_doc_ids[row] != chunk_doc_ids[start]:
            ranges[chunk_doc_ids[start]] = (start, row)
            start = row
    return ranges


def _runs(assignment: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """``(segment, first doc row, end doc row)`` for each run of consecutive documents from one segment."""
    start = 0
    for row in range(1, len(assignment) + 1):
        if row == len(assignment) or assignment[row] != assignment[start]:
            yield int(assignment[start]), start, row
            start = row


def row_selection(plan: Plan, doc_ids: list[str]) -> Iterator[tuple[Segment, np.ndarray]]:
    """For each run of documents, the segment and the chunk rows to take from it, in corpus order.

    Chunks that kept no token vector are left out: the encoder drops special and unknown tokens, so
    a chunk of only those (emoji, say, or a literal ``[SEP]``) has nothing to score, and a document
    made only of such chunks is not indexed (the flow lists it in ``rejected.parquet``).
    """
    ranges: dict[int, tuple[dict[str, tuple[int, int]], np.ndarray]] = {}
    for seg_index, first, end in _runs(plan.assignment):
        segment = plan.segments[seg_index]
        if seg_index not in ranges:
            chunk_ids = read_stage_file(segment.chunks, columns=["doc_id"]).column("doc_id").to_pylist()
            ranges[seg_index] = doc_row_ranges(chunk_ids), vector_counts(segment.tokens)
        spans, counts = ranges[seg_index]
        rows = [np.arange(*span, dtype=np.int64) for span in (spans.get(doc) for doc in doc_ids[first:end]) if span is not None]
        if rows:
            rows = np.concatenate(rows)
            rows = rows[counts[rows] > 0]
            if len(rows):
                yield segment, rows


def vector_counts(tokens_path: str) -> np.ndarray:
    """Token vectors of each chunk of a segment's token file (read from its token id lists only)."""
    import pyarrow.compute as pc

    ids = read_stage_file(tokens_path, columns=["token_ids"]).column("token_ids")
    return pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)


def gather(
    plan: Plan, doc_ids: list[str], stage: str, out: Path, *, compression: str, transform: Callable[[pa.Table], pa.Table] | None = None
) -> int:
    """Write the rows of ``stage`` (``chunks``, ``tokens`` or ``fde``) for the planned documents to ``out``.

    Rows come in corpus order and ``chunk_id`` is renumbered 0..n-1. Only the last segment read is
    kept in memory (a token file can be hundreds of MB); a corpus whose order interleaves segments
    re-reads them, which costs time, never correctness. ``transform`` rewrites each table on its
    way out (the token codec), so no staging copy is written. Returns the number of rows written.
    """
    next_id, writer, cached = 0, None, (None, None)
    with atomic_path(out) as tmp:
        try:
            for segment, rows in row_selection(plan, doc_ids):
                path = getattr(segment, stage)
                if cached[0] != path:
                    # a file present before this run's stages is checked against its page CRCs
                    cached = (path, read_stage_file(path, memory_map=True, verify=segment.present.get(stage, False)))  # dropped before the build ends
                table = cached[1].take(pa.array(rows))
                ids = pa.array(np.arange(next_id, next_id + table.num_rows, dtype=np.int64))
                table = table.set_column(table.schema.get_field_index("chunk_id"), table.schema.field("chunk_id"), ids)
                if transform is not None:
                    table = transform(table)
                if writer is None:
                    writer = parquet_writer(tmp, table.schema, compression=compression)
                writer.write_table(table)
                next_id += table.num_rows
        finally:
            if writer is not None:
                writer.close()
    return next_id


def compact(segment: Segment, live: set[str], cache: str, settings: SegmentSettings, write: Callable[[pa.Table, str], Any] | None = None) -> Segment:
    """Rewrite ``segment`` with only its ``live`` documents (every stage file); return the new segment.

    The new files are content-addressed like any segment, so a crash half-way leaves either the old
    segment or both (the next build uses one and prunes the other).
    """
    write = write or (lambda table, path: fs.write_parquet(table, path, page_checksums=True))
    keep = [i for i, doc in enumerate(segment.doc_ids) if doc in live]
    ids = [segment.doc_ids[i] for i in keep]
    hashes = [segment.content_hashes[i] for i in keep]
    out = make_segment(cache, ids, hashes, settings)
    chunk_docs = read_stage_file(segment.chunks, ["doc_id"], verify=True).column("doc_id").to_pylist()
    ranges = doc_row_ranges(chunk_docs)
    spans = [ranges[d] for d in ids if d in ranges]
    rows = pa.array(np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in spans]) if spans else np.zeros(0, np.int64))
    for stage in STAGES:
        table = read_stage_file(getattr(segment, stage), verify=True).take(rows)
        renumbered = pa.array(np.arange(table.num_rows, dtype=np.int64))
        table = table.set_column(table.schema.get_field_index("chunk_id"), table.schema.field("chunk_id"), renumbered)
        write(table, getattr(out, stage))
    docs = read_stage_file(segment.docs, verify=True)  # rewritten with fresh CRCs: damage must not be blessed
    write(docs.take(pa.array(keep, type=pa.int64())), out.docs)  # docs last: it makes the segment visible
    out.present = {stage: True for stage in STAGES}
    return out


def prune_cache(cache: str, keep: set[str], index_dir: str | None = None) -> int:
    """Delete cache files (and leftover temporaries) that neither ``keep`` nor another index registered; return how many went.

    With ``index_dir``, the files other index folders registered (:func:`register_cache_user`)
    are kept too; nothing is deleted while another one is building, and a temporary only once it
    is a day old while another index uses the cache (its build may be writing it).
    """
    others = _other_users(cache, index_dir) if index_dir is not None else OtherUsers()
    if others.building:
        return 0
    keep_names = {_name(path) for path in keep} | others.files
    removed = 0
    for path in fs.list_files(cache):
        name = _name(path)
        is_ours = name.endswith(".parquet") and name.startswith((DOC_PREFIX, CHUNK_PREFIX, TOKEN_PREFIX, FDE_PREFIX))
        leftover = name.endswith(".tmp") and (others.count == 0 or _older_than(path, BUILDING_EXPIRES_SECONDS))
        if (is_ours or leftover) and name not in keep_names:
            fs.delete(path)
            removed += 1
    return removed


def _older_than(path: str, seconds: float) -> bool:
    """Whether a local file was last written more than ``seconds`` ago (False where that is unknown)."""
    if not fs.is_local(path):
        return False
    try:
        return time.time() - fs.local_path(path).stat().st_mtime > seconds
    except OSError:
        return False
