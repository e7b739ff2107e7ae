"""The ``index`` flow: corpus -> chunk -> encode -> FDE -> ANN -> manifest.

Documents are split into shards of ``shard_size``; each stage runs as one Prefect task per shard and
writes a content-addressed shard file under ``INDEX/.cache`` (see :mod:`storage.shards`), so a
re-run on the same input does no model work and an interrupted run resumes. The final artifacts
are assembled from the shards, then the manifest is written last.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from storage import index_files as files
from storage.atomic import atomic_path, write_parquet
from storage.corpus import Corpus, read_corpus
from storage.hashing import sha256_file, sha256_tree, stable_key
from storage.manifest import IndexFormatError, library_versions, read_manifest, write_manifest
from storage.schemas import REJECTED
from tasks.ann import ANNConfig, build_ann
from tasks.chunk import ChunkConfig, chunk_task
from tasks.encode import EncoderConfig, encode_task, resolve_model_path
from tasks.fde import FDEConfig
from tasks.fde import fde_task
from tasks.idf import document_frequencies

# bump when a stage's output format or semantics change, so old cache shards are not reused
PIPELINE_VERSION = 1


@dataclass(frozen=True)
class FDEParams:
    """FDE settings without the token dimension (which comes from the model)."""

    repetitions: int = 20
    simhash_bits: int = 4
    projection_dim: int | None = 32
    final_dim: int | None = None
    seed: int = 42

    def config(self, dim: int) -> FDEConfig:
        return FDEConfig(dim=dim, fill_empty_partitions=True, **asdict(self))


@dataclass(frozen=True)
class IndexConfig:
    """Everything that determines an index (recorded in the manifest)."""

    model: str | None = None
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    precision: str = "fp32"
    drop_punctuation: bool = True
    batch_tokens: int = 8192
    fde: FDEParams = field(default_factory=FDEParams)
    ann: ANNConfig = field(default_factory=ANNConfig)
    shard_size: int = 2000
    device: str | None = None
    on_error: str = "raise"


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


def _shard_files(corpus: Corpus, cache: Path, config: IndexConfig, model_path: str, fde_config: FDEConfig) -> list[dict[str, str]]:
    """Write each shard's documents and return the cache file names of every stage per shard."""
    fingerprint = model_fingerprint(model_path)
    encoder_key = {"precision": config.precision, "drop_punctuation": config.drop_punctuation, "device_class": "any"}
    shards = []
    for start in range(0, corpus.docs.num_rows, config.shard_size):
        docs = corpus.docs.slice(start, config.shard_size)
        docs_key = stable_key(docs.column("doc_id").to_pylist(), docs.column("content_hash").to_pylist())
        chunk_key = stable_key(PIPELINE_VERSION, docs_key, config.chunk.to_dict(), fingerprint)
        token_key = stable_key(chunk_key, encoder_key)
        fde_key = stable_key(token_key, fde_config.to_dict())
        docs_path = cache / f"docs-{docs_key}.parquet"
        if not docs_path.exists():
            write_parquet(docs, docs_path)
        shards.append(
            {
                "docs": str(docs_path),
                "chunks": str(cache / f"chunks-{chunk_key}.parquet"),
                "tokens": str(cache / f"tokens-{token_key}.parquet"),
                "fde": str(cache / f"fde-{fde_key}.parquet"),
            }
        )
    return shards


def _concat_renumbered(paths: list[str], out: Path, *, compression: str) -> int:
    """Stream shard tables into one Parquet file, renumbering ``chunk_id`` to run 0..n-1."""
    next_id, writer = 0, None
    with atomic_path(out) as tmp:
        try:
            for path in paths:
                table = pq.read_table(path)
                ids = pa.array(np.arange(next_id, next_id + table.num_rows, dtype=np.int64))
                table = table.set_column(table.schema.get_field_index("chunk_id"), table.schema.field("chunk_id"), ids)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression=compression)
                writer.write_table(table)
                next_id += table.num_rows
        finally:
            if writer is not None:
                writer.close()
    return next_id


@task(name="assemble", cache_policy=NO_CACHE)
def assemble_task(index_dir: str, shards: list[dict[str, str]], corpus: Corpus, ann: ANNConfig, seed: int) -> dict[str, Any]:
    """Prefect task: merge shard files into the index artifacts and build the ANN index."""
    out = Path(index_dir)
    n_chunks = _concat_renumbered([s["chunks"] for s in shards], out / files.CHUNKS_FILE, compression="zstd")
    # float16 vectors and FDEs barely compress; skipping compression keeps writes and loads fast
    _concat_renumbered([s["tokens"] for s in shards], out / files.TOKENS_FILE, compression="none")
    _concat_renumbered([s["fde"] for s in shards], out / files.FDE_FILE, compression="none")
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
    store = files.read_token_store(out / files.TOKENS_FILE)
    write_parquet(document_frequencies(store.token_ids, store.offsets, chunks.column("doc_id")), out / files.IDF_FILE)
    fde = files.read_fde(out / files.FDE_FILE)
    index, ann_facts = build_ann(fde, ann, seed=seed)
    files.write_faiss(index, out / files.ANN_FILE)
    return {
        "docs": docs.num_rows,
        "chunks": n_chunks,
        "tokens": int(store.offsets[-1]),
        "rejected": rejected.num_rows,
        "fde_dim": int(fde.shape[1]),
        "ann": ann_facts,
    }


def _prune_cache(cache: Path, keep: set[str]) -> None:
    """Remove shard files that the finished index no longer uses (bounded disk across rebuilds)."""
    for path in cache.glob("*.parquet"):
        if str(path) not in keep:
            path.unlink(missing_ok=True)


def _current_manifest(index_dir: Path) -> dict[str, Any] | None:
    """The index's manifest if it opens cleanly (sizes checked), else None."""
    try:
        return read_manifest(index_dir)
    except IndexFormatError:
        return None


@flow(name="index", log_prints=True)
def index_flow(corpus: str, index_dir: str, config: IndexConfig = IndexConfig()) -> dict[str, Any]:
    """Build (or bring up to date) the index of ``corpus`` in ``index_dir``; return the manifest.

    Parameters
    ----------
    corpus
        BEIR folder, ``corpus.jsonl`` or ``.parquet`` file.
    index_dir
        Output folder; created if missing. Re-running with the same input and settings reuses every
        cached shard (no model work); a run killed half-way resumes from the finished shards.
    config
        Model, chunking, precision, FDE and ANN settings.
    """
    started = time.perf_counter()
    out = Path(index_dir)
    cache = out / files.CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model_path(config.model)
    dim, max_positions = _model_dim(model_path)
    if config.chunk.window > max_positions - 2:
        raise ValueError(f"chunk window {config.chunk.window} exceeds this model's limit of {max_positions - 2} tokens")
    fde_config = config.fde.config(dim)
    encoder_config = EncoderConfig(
        model_path=model_path, precision=config.precision, drop_punctuation=config.drop_punctuation, batch_tokens=config.batch_tokens
    )
    corpus_data = load_corpus_task(corpus, config.on_error)
    shards = _shard_files(corpus_data, cache, config, model_path, fde_config)
    build_key = stable_key([s["fde"] for s in shards], config.ann.to_dict(), corpus_data.rejected.num_rows)
    current = _current_manifest(out)
    if current is not None and current.get("build_key") == build_key:
        return current  # the index already holds exactly this input and these settings
    for shard in shards:
        chunk_task(shard["docs"], shard["chunks"], model_path, config.chunk)
        encode_task(shard["chunks"], shard["tokens"], encoder_config, config.device)
        fde_task(shard["tokens"], shard["fde"], fde_config)
    facts = assemble_task(str(out), shards, corpus_data, config.ann, config.fde.seed)
    body = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "corpus": {"path": str(Path(corpus).resolve()), "file_sha256": sha256_file(corpus_data.source)},
        "model": {"spec": config.model or "default", "path": model_path, "fingerprint": model_fingerprint(model_path), "dim": dim},
        "chunking": config.chunk.to_dict(),
        "encoding": {k: v for k, v in encoder_config.to_dict().items() if k != "model_path"},
        "fde": fde_config.to_dict(),
        "ann": {**config.ann.to_dict(), **facts.pop("ann")},
        "counts": facts,
        "versions": library_versions(),
        "build_seconds": round(time.perf_counter() - started, 3),
        "build_key": build_key,
    }
    manifest = write_manifest(
        out, body, [files.DOCS_FILE, files.CHUNKS_FILE, files.TOKENS_FILE, files.FDE_FILE, files.ANN_FILE, files.REJECTED_FILE, files.IDF_FILE]
    )
    _prune_cache(cache, {p for s in shards for p in s.values()})
    return manifest
