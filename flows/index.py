"""The ``index`` flow: corpus -> chunk -> encode -> FDE -> ANN -> manifest, incremental and resumable.

Documents are grouped into *segments* (see :mod:`storage.segments`); each stage runs as one Prefect
task per segment and writes a content-addressed file in the shard cache (``INDEX/.cache`` by
default). A run reuses every document whose id and content some segment already holds, so it
encodes only new or changed documents, and a run killed at any point resumes from its finished
files. The index is assembled from the segments into a new version folder
``INDEX/versions/<version>/``; its manifest is written last, and only then does ``INDEX/manifest.json``
switch to it (:mod:`storage.manifest`), so readers never see a half-written index. A run that
changes nothing returns the current manifest without model work. One run at a time per index folder
(:mod:`storage.lock`).

The per-segment tasks run one after another on the default task runner, and in parallel when the
flow runs on another task runner (``index_flow.with_options(task_runner=DaskTaskRunner(...))``, see
:mod:`flows.runners`).
"""
# No `from __future__ import annotations` here: a served deployment (`lateflow deploy`) runs the flow in
# a subprocess that receives the flow function pickled by value, and Prefect validates the run's
# parameters against its annotations; string annotations such as "IndexConfig" cannot be resolved there.
import contextlib
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from storage import fs
from storage import index_files as files
from storage import segments as seg
from storage.atomic import write_parquet
from storage.corpus import Corpus, read_corpus
from storage.hashing import sha256_tree, stable_key
from storage.lock import IndexLock
from storage.manifest import IndexFormatError, library_versions, read_manifest, resolve_index_dir, write_manifest, write_pointer
from storage.schemas import REJECTED
from storage.token_codec import DEFAULT_TOKEN_CODEC, SEGMENT_TOKEN_CODEC
from storage.token_codec import get_codec as get_token_codec
from storage.token_codec import manifest_entry as token_store_entry
from storage.versions import (
    complete_versions,
    current_version,
    new_version_dir,
    pointer,
    prune_versions,
    remove_legacy_artifacts,
    remove_incomplete_versions,
    remove_temporaries,
)
from tasks.ann import ANNConfig, build_ann_from_blocks
from tasks.chunk import ChunkConfig, chunk_task
from tasks.encode import MIN_BATCH_TOKENS, PRECISION_CHOICES, PRECISIONS, EncoderConfig, encode_task, load_encoder, resolve_model_path, resolve_precision, select_device
from tasks.fde import FDEConfig
from tasks.fde import warm_up as warm_up_fde
from tasks.fde import fde_task
from tasks.idf import document_frequencies

# bump when a stage's output format or semantics change, so old cache shards are not reused
PIPELINE_VERSION = 2


@dataclass(frozen=True)
class FDEParams:
    """FDE settings without the token dimension (which comes from the model)."""

    repetitions: int = 20
    simhash_bits: int = 4
    projection_dim: int | None = 32
    final_dim: int | None = None
    seed: int = 42
    # MUVERA fills a document's empty partitions with the projection of the token nearest to them.
    # Off by default: on scifact train, cranfield and LIMIT-small alike, unfilled FDEs put more of the
    # exact MaxSim top-10 among the ANN candidates (scifact train, 100 candidates: 0.900 vs 0.887;
    # cranfield, 50: 0.911 vs 0.880), and filling never won (BENCHMARKS.md sections 3 and 5.1)
    fill_empty_partitions: bool = False

    def config(self, dim: int) -> FDEConfig:
        return FDEConfig(dim=dim, **asdict(self))


@dataclass(frozen=True)
class IndexConfig:
    """Everything that determines an index (recorded in the manifest)."""

    model: str | None = None
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    # "auto": bf16 autocast where the device computes bfloat16 natively (1.6x faster at the same
    # nDCG@10 on scifact), else fp32; an existing index keeps its own precision (see _encoding_precision)
    precision: str = "auto"
    drop_punctuation: bool = True
    batch_tokens: int = 8192
    fde: FDEParams = field(default_factory=FDEParams)
    ann: ANNConfig = field(default_factory=ANNConfig)
    shard_size: int = 2000
    device: str | None = None
    on_error: str = "raise"
    # number format of the assembled index's token vectors (storage.token_codec): int8 is a quarter of
    # float32 at no measurable nDCG@10 change (scifact train and test, cranfield); the segment cache
    # stays float16, so changing it re-encodes nothing
    token_codec: str = DEFAULT_TOKEN_CODEC

    def __post_init__(self) -> None:
        # every setting is checked here, before any work: a bad one found inside the flow came with
        # Prefect's run-failure tracebacks in front of the message
        get_token_codec(self.token_codec)
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {self.precision!r}")
        if isinstance(self.shard_size, bool) or not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ValueError(f"shard_size (--shard-size) must be a positive number of documents, got {self.shard_size!r}")
        if isinstance(self.batch_tokens, bool) or not isinstance(self.batch_tokens, int) or self.batch_tokens < MIN_BATCH_TOKENS:
            raise ValueError(f"batch_tokens (--batch-tokens) must be at least {MIN_BATCH_TOKENS}, got {self.batch_tokens!r}")
        self.fde.config(dim=1)  # FDEConfig names the bad field (repetitions, simhash_bits, ...); dim comes from the model
        if self.device is not None:
            # the name only: with --runner dask the workers encode, and may have the GPU this process lacks
            select_device(self.device, require_available=False)

    def token_codec_key(self) -> list[dict[str, str]]:
        """The codec's part of the build key: empty for float16, so indexes built before codecs keep their key.

        Examples
        --------
        >>> IndexConfig(token_codec="float16").token_codec_key(), IndexConfig().token_codec_key()
        ([], [{'token_codec': 'int8'}])
        """
        return [] if self.token_codec == SEGMENT_TOKEN_CODEC else [{"token_codec": self.token_codec}]


def _model_dim(model_path: str) -> tuple[int, int]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    return int(config.hidden_size), int(getattr(config, "max_position_embeddings", 512))


_fingerprints: dict[str, str] = {}


def model_fingerprint(model_path: str) -> str:
    """Hash of the checkpoint's files (computed once per process)."""
    if model_path not in _fingerprints:
        _fingerprints[model_path] = sha256_tree(model_path)[:24]
    return _fingerprints[model_path]


@task(name="load-corpus", cache_policy=NO_CACHE)
def load_corpus_task(corpus: str, on_error: str) -> Corpus:
    """Prefect task: read and validate the corpus (see :mod:`storage.corpus` for the policy)."""
    return read_corpus(corpus, on_error=on_error)  # type: ignore[arg-type]


def table_digest(table: pa.Table, columns: list[str]) -> str:
    """Hash of the values of ``columns`` (row order matters), streamed in batches.

    Examples
    --------
    >>> t = pa.table({"a": ["x", "y"], "b": [1, 2]})
    >>> table_digest(t, ["a", "b"]) == table_digest(t.select(["b", "a"]), ["a", "b"]) != table_digest(t.slice(1), ["a", "b"])
    True
    """
    digest = hashlib.sha256()
    for batch in table.select(columns).to_batches(max_chunksize=4096):
        digest.update(json.dumps([batch.column(i).to_pylist() for i in range(batch.num_columns)], default=str).encode("utf-8"))
    return digest.hexdigest()[:24]


def _index_dir(index_dir: str) -> Path:
    """The index folder as a local path; other URLs fail with what to do instead."""
    if not fs.is_local(index_dir):
        raise ValueError(
            f"{index_dir}: the index folder must be a local path or file:// URL (or a shared POSIX mount such as NFS): "
            "lateflow switches versions with an atomic rename and locks runs with flock. "
            "Put the shard cache that workers share on object storage with --cache URL instead."
        )
    return fs.local_path(index_dir).resolve()


def _cache_location(out: Path, cache: str | None) -> str:
    if cache is None:
        return str(out / files.CACHE_DIR)
    return str(fs.local_path(cache).resolve()) if fs.is_local(cache) else cache.rstrip("/")


def _stage_tasks_parallel() -> bool:
    """True when the flow runs on a task runner other than the default thread pool (e.g. Dask).

    The default runner keeps the stages sequential in the flow's thread, as they always were: on one
    machine a single encoder already uses every core, and torch's thread settings are per process.
    """
    from prefect.context import FlowRunContext
    from prefect.task_runners import ThreadPoolTaskRunner

    context = FlowRunContext.get()
    return context is not None and not isinstance(context.task_runner, ThreadPoolTaskRunner)


def _run_ahead(name: str, work: Any) -> Any:
    """Start ``work()`` on a thread named ``name``; returns a future of its result (the thread ends with it)."""
    import threading
    from concurrent.futures import Future

    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:  # handed to the caller through the future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class StageClock:
    """Wall seconds spent in each named stage, summed over segments: ``with clock("encode"): ...``.

    Examples
    --------
    >>> clock = StageClock()
    >>> with clock("chunk"):
    ...     pass
    >>> with clock("chunk"):
    ...     pass
    >>> sorted(clock.seconds), clock.seconds["chunk"] >= 0
    (['chunk'], True)
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - started)

    def add(self, stage: str, seconds: float) -> None:
        """Count ``seconds`` measured elsewhere (a worker's) towards ``stage``."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def rounded(self) -> dict[str, float]:
        return {stage: round(seconds, 3) for stage, seconds in self.seconds.items()}


def _run_stages(
    segments: list[seg.Segment], model_path: str, config: "IndexConfig", encoder_config: EncoderConfig, fde_config: FDEConfig, clock: StageClock
) -> None:
    """Chunk, encode and FDE every segment that lacks a stage file (one task per stage per segment)."""
    todo = [s for s in segments if not s.complete()]
    if not _stage_tasks_parallel():
        # the checkpoint loads (~2.5 s) on a thread while the first segment is chunked (load_encoder
        # caches it for encode_task: same arguments, positional as there), and so does the FDE kernel
        # (~0.9 s) that would otherwise load beside the encoder, on a busy core. A failed warm-up is
        # not waited for: the FDE stage meets the same error and reports it.
        encoding = any(not s.present.get("tokens") for s in todo)
        loading = _run_ahead("lateflow-load-encoder", lambda: load_encoder(encoder_config, config.device)) if encoding else None
        if any(not s.present.get("fde") for s in todo):
            _run_ahead("lateflow-warm-fde", lambda: warm_up_fde(fde_config))
        for s in todo:
            with clock("chunk"):
                chunk_task(s.docs, s.chunks, model_path, config.chunk)
            if loading is not None:
                with clock("load_encoder"):  # only what the chunking did not hide
                    loading.result()  # re-raises a load failure here, before any encoding
                loading = None
            with clock("encode"):
                encode_task(s.chunks, s.tokens, encoder_config, config.device, s.fde, fde_config)
            with clock("fde"):
                fde_task(s.tokens, s.fde, fde_config)  # no work unless the FDE file is missing (e.g. a resumed run)
        return
    # every path is known in advance, so tasks pass nothing but paths: wait_for orders each segment's
    # stages, and different segments run in parallel on the workers
    submitted = []
    for s in todo:
        chunked = chunk_task.submit(s.docs, s.chunks, model_path, config.chunk)
        encoded = encode_task.submit(s.chunks, s.tokens, encoder_config, config.device, s.fde, fde_config, wait_for=[chunked])
        submitted.append((chunked, encoded, fde_task.submit(s.tokens, s.fde, fde_config, wait_for=[encoded])))
    with clock("stages_parallel"):  # the wall time of all of them together
        for futures in submitted:
            for stage, future in zip(("chunk", "encode", "fde"), futures):
                clock.add(stage, future.result().seconds)  # raises the first failure of the segment, in stage order


@task(name="assemble", cache_policy=NO_CACHE)
def assemble_task(
    version_dir: str, plan: seg.Plan, corpus: Corpus, ann: ANNConfig, seed: int, token_codec: str = DEFAULT_TOKEN_CODEC
) -> dict[str, Any]:
    """Prefect task: take every document's rows from its segment, in corpus order, and build the ANN index.

    The token vectors are written in ``token_codec`` (:mod:`storage.token_codec`).
    """
    get_token_codec(token_codec)
    out = Path(version_dir)
    out.mkdir(parents=True, exist_ok=True)
    clock = StageClock()
    doc_ids = corpus.docs.column("doc_id").to_pylist()
    with clock("gather"):
        n_chunks = seg.gather(plan, doc_ids, "chunks", out / files.CHUNKS_FILE, compression="zstd")
        # float16 vectors and FDEs barely compress; skipping compression keeps writes and loads fast
        if token_codec == SEGMENT_TOKEN_CODEC:
            n_tokens = seg.gather(plan, doc_ids, "tokens", out / files.TOKENS_FILE, compression="none")
        else:
            # segments hold float16 (a codec change re-encodes nothing): transcoded as they are gathered
            # (a staged float16 copy cost a write and a read of the whole store, ~1 s per 340k tokens)
            first = next((s.tokens for s in plan.segments), None)
            transcode = files.TokenTranscoder(first, fs.read_parquet_schema(first), token_codec) if first else None
            n_tokens = seg.gather(plan, doc_ids, "tokens", out / files.TOKENS_FILE, compression="none", transform=transcode)
        n_fde = seg.gather(plan, doc_ids, "fde", out / files.FDE_FILE, compression="none")
    if not n_chunks == n_tokens == n_fde:
        raise IndexFormatError(f"{version_dir}: segments disagree ({n_chunks} chunks, {n_tokens} token rows, {n_fde} FDE rows)")
    chunks = pq.read_table(out / files.CHUNKS_FILE, columns=["doc_id"])
    chunked = pc.is_in(corpus.docs.column("doc_id"), value_set=pc.unique(chunks.column("doc_id")))
    docs = corpus.docs.filter(chunked)
    no_chunk = corpus.docs.filter(pc.invert(chunked))
    rejected = pa.concat_tables(
        [
            corpus.rejected,
            pa.Table.from_pydict(
                {
                    "doc_id": no_chunk.column("doc_id").to_pylist(),
                    "source": [corpus.source] * no_chunk.num_rows,
                    "line": [None] * no_chunk.num_rows,
                    "reason": ["no token the model's tokenizer can read"] * no_chunk.num_rows,
                },
                schema=REJECTED,
            ),
        ]
    )
    write_parquet(docs, out / files.DOCS_FILE)
    write_parquet(rejected, out / files.REJECTED_FILE)
    # the token ids alone (not the vectors) for the document frequencies
    ids, offsets = files.read_token_ids(out / files.TOKENS_FILE)
    write_parquet(document_frequencies(ids, offsets, chunks.column("doc_id")), out / files.IDF_FILE)
    fde_path = out / files.FDE_FILE
    fde_shape = files.fde_shape(fde_path)
    with clock("ann"):
        # from the file a block at a time: the FDE matrix is 4.3 GB at 100k chunks, ~40 GB at a million
        index, ann_facts = build_ann_from_blocks(lambda: files.iter_fde(fde_path), fde_shape, ann, seed=seed)
        files.write_faiss(index, out / files.ANN_FILE)
    return {
        "stage_seconds": clock.rounded(),
        "docs": docs.num_rows,
        "chunks": n_chunks,
        "tokens": int(offsets[-1]),
        "rejected": rejected.num_rows,
        "fde_dim": int(fde_shape[1]),
        "ann": ann_facts,
    }


def _current_manifest(index_dir: Path) -> dict[str, Any] | None:
    """The index's current manifest if it opens cleanly (sizes checked), else None."""
    try:
        return read_manifest(index_dir)
    except IndexFormatError:
        return None


def _encoding_precision(config: "IndexConfig", current: dict[str, Any] | None) -> str:
    """The concrete encoder precision of a build.

    An explicit precision is used as given. ``auto`` keeps the current version's precision when the
    index exists, so a scheduled update never re-encodes a whole corpus because it runs on another
    machine or because this default changed (indexes built before ``auto`` stay fp32); a new index
    gets :func:`tasks.encode.resolve_precision` for the device it is built on.
    """
    if config.precision != "auto":
        return config.precision
    if current is not None and current.get("encoding", {}).get("precision") in PRECISIONS:
        return current["encoding"]["precision"]
    return resolve_precision("auto", select_device(config.device))


def _previous_docs(index_dir: Path) -> dict[str, tuple[str, str | None]]:
    """doc_id -> (content hash, metadata JSON) of the current version (empty when there is none)."""
    try:
        table = pq.read_table(resolve_index_dir(index_dir) / files.DOCS_FILE, columns=["doc_id", "content_hash", "metadata"])
    except (IndexFormatError, OSError, pa.ArrowInvalid, KeyError):
        return {}
    return {d: (h, m) for d, h, m in zip(*(table.column(c).to_pylist() for c in ("doc_id", "content_hash", "metadata")))}


def _changes(previous: dict[str, tuple[str, str | None]], docs: pa.Table) -> dict[str, int]:
    """How the corpus differs from the current version: new, changed, unchanged and removed documents.

    ``metadata_changed`` counts unchanged documents (same title and text, not re-encoded) whose
    metadata changed: the new version serves and filters on the new values.
    """
    ids, hashes, metadata = (docs.column(c).to_pylist() for c in ("doc_id", "content_hash", "metadata"))
    new = sum(d not in previous for d in ids)
    changed = sum(d in previous and previous[d][0] != h for d, h in zip(ids, hashes))
    metadata_changed = sum(d in previous and previous[d][0] == h and previous[d][1] != m for d, h, m in zip(ids, hashes, metadata))
    return {
        "new": new, "changed": changed, "unchanged": len(ids) - new - changed, "removed": len(set(previous) - set(ids)),
        "metadata_changed": metadata_changed,
    }


def _switch(out: Path, version: Path, manifest: dict[str, Any], keep_versions: int) -> list[str]:
    """Make ``version`` current, keep ``keep_versions`` versions in all, remove the rest; return the kept older ones."""
    before = pointer(out)
    old = current_version(out)
    history = [old] if old else []
    if before and isinstance(before.get("previous_versions"), list):
        history += [v for v in before["previous_versions"] if isinstance(v, str)]
    kept = [v for v in dict.fromkeys(history) if v != version.name and (out / "versions" / v / "manifest.json").is_file()]
    kept = kept[: max(0, keep_versions - 1)]
    write_pointer(out, version, manifest, kept)
    prune_versions(out, keep=[version.name, *kept])
    if old is not None:
        # artifacts of a pre-versions build stayed readable for one more build; now they go
        remove_legacy_artifacts(out)
    return kept


@flow(name="index", log_prints=True)
def index_flow(
    corpus: str, index_dir: str, config: IndexConfig = IndexConfig(), cache: str | None = None, keep_versions: int = 2
) -> dict[str, Any]:
    """Build a new version of the index of ``corpus`` in ``index_dir`` (incrementally); return its manifest.

    Parameters
    ----------
    corpus
        BEIR folder, ``corpus.jsonl`` or ``.parquet`` file: a local path, a ``file://`` URL, or any
        URL :func:`storage.fs.resolve` opens (``s3://``, ``gs://``, fsspec schemes).
    index_dir
        Output folder (local path or ``file://`` URL); created if missing. Each build that changes
        anything writes ``INDEX/versions/<version>/`` and then switches ``INDEX/manifest.json`` to it.
        Documents whose id and content are unchanged are not encoded again; deleted ones are
        dropped; a run killed half-way resumes from its finished segments; an unchanged corpus
        returns the current manifest with no model work. A second run on the same folder while
        one is running fails at once (:class:`storage.lock.IndexLockedError`).
    config
        Model, chunking, precision, FDE and ANN settings, and ``shard_size`` (documents per segment).
    cache
        Where the shard cache lives (default ``INDEX/.cache``): a local path or a filesystem URL
        that every worker of a distributed run can reach.
    keep_versions
        Versions kept on disk, the current one included (default 2: the previous version stays
        readable while services switch over).

    Returns
    -------
    dict
        The manifest of the version now current, plus ``outcome`` (not stored): ``built`` (a new
        version), ``up_to_date`` (nothing to do) or ``adopted`` (an existing complete version already
        held this input and these settings: switched to it, nothing built).
    """
    started = time.perf_counter()
    if keep_versions < 1:
        raise ValueError(f"keep_versions must be at least 1, got {keep_versions}")
    out = _index_dir(index_dir)
    with IndexLock(out):
        remove_temporaries(out)  # a killed run's half-written manifest.json, never read by anyone
        remove_incomplete_versions(out)  # a killed run's version without a manifest: nobody can read it
        return _build(corpus, out, config, _cache_location(out, cache), keep_versions, started)


def _logger() -> Any:
    """The flow run's logger (shown in the Prefect UI), or a plain one when called without the engine."""
    try:
        return get_run_logger()
    except Exception:  # MissingContextError: index_flow.fn(...) called directly
        return logging.getLogger("lateflow.index")


def _build(corpus: str, out: Path, config: IndexConfig, cache: str, keep_versions: int, started: float) -> dict[str, Any]:
    logger = _logger()
    model_path = resolve_model_path(config.model)
    dim, max_positions = _model_dim(model_path)
    if config.chunk.window > max_positions - 2:
        raise ValueError(f"chunk window {config.chunk.window} exceeds this model's limit of {max_positions - 2} tokens")
    fde_config = config.fde.config(dim)
    current = _current_manifest(out)
    precision = _encoding_precision(config, current)
    encoder_config = EncoderConfig(model_path=model_path, precision=precision, drop_punctuation=config.drop_punctuation, batch_tokens=config.batch_tokens)
    clock = StageClock()
    with clock("load_corpus"):
        corpus_data = load_corpus_task(corpus, config.on_error)
    settings = seg.SegmentSettings(
        pipeline_version=PIPELINE_VERSION,
        chunk=config.chunk.to_dict(),
        model_fingerprint=model_fingerprint(model_path),
        # the device never changes the vectors beyond float noise, so it is not part of the key
        encoder={"precision": precision, "drop_punctuation": config.drop_punctuation, "device_class": "any"},
        fde=fde_config.to_dict(),
    )
    build_key = stable_key(
        settings.key(),
        config.ann.to_dict(),
        table_digest(corpus_data.docs, ["doc_id", "title", "text", "metadata", "content_hash"]),
        table_digest(corpus_data.rejected, REJECTED.names),
        *config.token_codec_key(),
    )
    if current is not None and current.get("build_key") == build_key:
        return {**current, "outcome": "up_to_date"}  # the index already holds exactly this input and these settings
    for name, manifest in complete_versions(out).items():
        if manifest.get("build_key") == build_key:
            # a run killed between writing this version and switching to it, or a corpus that went back
            # to an earlier state: the version is complete, so switching to it is all that is left
            _switch(out, out / "versions" / name, manifest, keep_versions)
            return {**manifest, "outcome": "adopted"}

    fs.makedirs(cache)
    previous = _previous_docs(out)
    me = str(out.resolve())
    with _building_in_cache(cache, me) as planned:
        plan = seg.plan_segments(corpus_data.docs, seg.read_catalog(cache, settings), cache, settings, config.shard_size)
        docs_of = {d: i for i, d in enumerate(corpus_data.docs.column("doc_id").to_pylist())}
        for s in plan.segments:
            if s.new:
                s.present = {stage: seg.stage_file_usable(getattr(s, stage)) for stage in seg.STAGES}
                if not fs.exists(s.docs):
                    docs_table = corpus_data.docs.take(pa.array([docs_of[d] for d in s.doc_ids], type=pa.int64()))
                    fs.write_parquet(docs_table, s.docs, page_checksums=True)  # checked when compaction rewrites it
        # before any stage runs: another index sharing this cache must not prune what this build needs
        planned.update(path for s in plan.segments for path in s.paths().values())
        seg.register_cache_user(cache, me, planned, building=True)
        to_encode = [s for s in plan.segments if not s.present.get("tokens")]
        changes = _changes(previous, corpus_data.docs)
        logger.info(
            "%d documents: %d new, %d changed, %d unchanged, %d removed; %d of %d segments need work",
            corpus_data.docs.num_rows, changes["new"], changes["changed"], changes["unchanged"], changes["removed"],
            sum(not s.complete() for s in plan.segments), len(plan.segments),
        )
        _run_stages(plan.segments, model_path, config, encoder_config, fde_config, clock)

        version = new_version_dir(out, build_key)
        try:
            with clock("assemble"):
                facts = assemble_task(str(version), plan, corpus_data, config.ann, config.fde.seed, config.token_codec)
            clock.seconds.update({f"assemble_{stage}": seconds for stage, seconds in facts.pop("stage_seconds").items()})
            corpus_path = corpus if not fs.is_local(corpus) else str(fs.local_path(corpus).resolve())
            body = {
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "version": version.name,
                "corpus": {"path": corpus_path, "file_sha256": corpus_data.file_sha256},
                "model": {"spec": config.model or "default", "path": model_path, "fingerprint": settings.model_fingerprint, "dim": dim},
                "chunking": config.chunk.to_dict(),
                "encoding": {k: v for k, v in encoder_config.to_dict().items() if k != "model_path"},
                "fde": fde_config.to_dict(),
                "ann": {**config.ann.to_dict(), **facts.pop("ann")},
                "token_store": token_store_entry(config.token_codec, dim),
                "counts": facts,
                "incremental": {
                    **{f"docs_{k}": v for k, v in changes.items()},
                    "docs_encoded": sum(len(s.doc_ids) for s in to_encode),
                    "segments": len(plan.segments),
                    "segments_encoded": len(to_encode),
                    "segments_reused": sum(not s.new for s in plan.segments),
                },
                "versions": library_versions(),
                "build_seconds": round(time.perf_counter() - started, 3),
                # where the build's wall time went (stages sum over segments; the rest is planning and bookkeeping)
                "stage_seconds": clock.rounded(),
                "build_key": build_key,
            }
            manifest = write_manifest(
                version, body, [files.DOCS_FILE, files.CHUNKS_FILE, files.TOKENS_FILE, files.FDE_FILE, files.ANN_FILE, files.REJECTED_FILE, files.IDF_FILE]
            )
        except BaseException:
            # a failed assembly (a full disk, say) leaves no half-written version behind to pile up run
            # after run; the segments it read stay in the cache for the next attempt
            shutil.rmtree(version, ignore_errors=True)
            raise
        _switch(out, version, manifest, keep_versions)
        _tidy_cache(plan, corpus_data.docs, cache, settings, me)
        return {**manifest, "outcome": "built"}


@contextlib.contextmanager
def _building_in_cache(cache: str, index_dir: str) -> Iterator[set[str]]:
    """Mark this build in the cache's user registry while it runs (see ``register_cache_user``).

    Yields the set of cache files the build plans to use, for the caller to fill. A build that
    fails is unmarked with those files, so that it does not hold other indexes' pruning back.
    """
    planned: set[str] = set()
    seg.register_cache_user(cache, index_dir, planned, building=True)  # before the catalog is read
    try:
        yield planned
    except BaseException:
        seg.register_cache_user(cache, index_dir, planned, building=False)
        raise


def _tidy_cache(plan: seg.Plan, docs: pa.Table, cache: str, settings: seg.SegmentSettings, index_dir: str) -> None:
    """Keep the cache bounded: drop files no live document of any index using it needs, compact mostly-dead segments.

    Runs after the switch, so a crash here costs nothing but disk until the next run.
    """
    live_pairs = set(zip(docs.column("doc_id").to_pylist(), docs.column("content_hash").to_pylist()))
    keep: set[str] = set()
    for s in plan.segments:
        live = {d for d, h in zip(s.doc_ids, s.content_hashes) if (d, h) in live_pairs}
        if 2 * len(live) < len(s.doc_ids):
            try:
                s = seg.compact(s, live, cache, settings)
            except IndexFormatError as exc:
                # the new version is already live and was gathered from checked files: a damaged
                # cache file found here must not fail that build. The segment stays as it is (a
                # file that failed its checksums twice is deleted, so the next run recomputes it)
                _logger().warning("cache compaction skipped a segment: %s", exc)
        keep.update(s.paths().values())
    seg.register_cache_user(cache, index_dir, keep, building=False)
    seg.prune_cache(cache, keep, index_dir)
