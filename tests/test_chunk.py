"""Chunking: offsets round-trip to the source text; long documents become many windows."""
from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, strategies as st

from storage.corpus import full_text
from tasks.chunk import ChunkConfig, chunk_documents, window_starts


@given(n=st.integers(0, 2000), window=st.integers(8, 300), overlap_frac=st.floats(0, 0.9))
def test_windows_cover_every_token_with_the_requested_overlap(n, window, overlap_frac):
    overlap = min(int(window * overlap_frac), window - 1)
    starts = window_starts(n, window, overlap)
    covered = set()
    for s in starts:
        covered.update(range(s, min(s + window, n)))
    assert covered == set(range(n))
    assert all(b - a == window - overlap for a, b in zip(starts, starts[1:]))
    if starts:
        assert starts[-1] + window >= n and (len(starts) == 1 or starts[-2] + window < n)


def _docs(rows):
    return pa.table({"doc_id": [r[0] for r in rows], "title": [r[1] for r in rows], "text": [r[2] for r in rows]})


def test_offsets_round_trip_to_the_source_text(tokenizer):
    rows = [("d1", "Aspirin and stroke", "Low-dose aspirin (75–100 mg) reduced the risk of stroke by 17%; café-level émigré text. " * 12), ("d2", "", "short one")]
    chunks = chunk_documents(_docs(rows), tokenizer, ChunkConfig(window=32, overlap=8))
    for row in chunks.to_pylist():
        title, text = next((t, x) for d, t, x in rows if d == row["doc_id"])
        body = full_text(title, text)
        assert body[row["char_start"] : row["char_end"]] == row["text"]
        ids = tokenizer(body, add_special_tokens=False)["input_ids"]
        assert ids[row["token_start"] : row["token_end"]] == row["input_ids"]
    d1 = [r for r in chunks.to_pylist() if r["doc_id"] == "d1"]
    assert [r["ordinal"] for r in d1] == list(range(len(d1)))
    assert all(b["token_start"] == a["token_end"] - 8 for a, b in zip(d1, d1[1:]))
    assert chunks.column("chunk_id").to_pylist() == list(range(chunks.num_rows))


def test_document_100x_longer_than_the_window(tokenizer):
    text = " ".join(f"word{i}" for i in range(3000))
    chunks = chunk_documents(_docs([("long", "", text)]), tokenizer, ChunkConfig(window=16, overlap=4))
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert n_tokens >= 100 * 16
    assert chunks.num_rows == len(window_starts(n_tokens, 16, 4))
    assert chunks.column("token_end").to_pylist()[-1] == n_tokens
    assert max(len(ids) for ids in chunks.column("input_ids").to_pylist()) == 16


def test_bad_chunk_config():
    with pytest.raises(ValueError, match="overlap"):
        ChunkConfig(window=16, overlap=16)
    with pytest.raises(ValueError, match="window"):
        ChunkConfig(window=2, overlap=0)
