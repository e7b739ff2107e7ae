"""The index-opening benchmark (evaluation/benchmarks/open_memory.py) end to end on LIMIT-small."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from evaluation.benchmarks import open_memory
from lateflow.engine import LateIndex


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_each_opening_is_measured_in_its_own_process(tmp_path, limit_small_index):
    out = tmp_path / "open.md"
    assert open_memory.main([str(limit_small_index), "--token-memory", "auto", "float32", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["token_memory"] for r in rows] == ["auto", "float32"]
    index = LateIndex.open(limit_small_index, token_memory="float32")
    for row in rows:
        assert row["chunks"] == index.tokens.n_chunks and row["tokens"] == int(index.tokens.offsets[-1])
        assert row["rss_before_gib"] > 0 and row["peak_gib"] >= row["rss_after_gib"] > 0 and row["open_seconds"] > 0
    # the held bytes are those of the opened store: int8 codes + scales (auto on an int8 store) vs float32
    n_tokens, dim = index.tokens.vectors.shape
    assert rows[0]["token_dtype"] == "int8" and rows[1]["token_dtype"] == "float32"
    assert rows[1]["held_gib"]["tokens"] == round((n_tokens * dim * 4 + n_tokens * 4 + 8 * (index.tokens.n_chunks + 1)) / 2**30, 3)
    assert rows[0]["held_gib"]["tokens"] < rows[1]["held_gib"]["tokens"] and rows[0]["held_gib"]["ann"] > 0
    assert np.isclose(rows[0]["held_gib"]["ann"], rows[1]["held_gib"]["ann"])
    assert f"| {limit_small_index} | auto (int8) |" in out.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_ann_build_benchmark_builds_the_same_index_both_ways_in_fresh_processes(tmp_path, limit_small_index):
    from evaluation.benchmarks import ann_build

    out = tmp_path / "ann-build.md"
    assert ann_build.main([str(limit_small_index), "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    index = LateIndex.open(limit_small_index)
    assert [r["method"] for r in rows] == ["whole", "blocks"]
    for row in rows:
        assert (row["kind"], row["chunks"], row["fde_dim"]) == (index.manifest["ann"]["kind"], index.tokens.n_chunks, index.ann.d)
        assert row["peak_gib"] >= row["rss_before_gib"] > 0 and row["seconds"] >= 0
    assert rows[0]["index_gib"] == rows[1]["index_gib"] and rows[0]["fde_gib"] == round(index.tokens.n_chunks * index.ann.d * 4 / 2**30, 3)
    assert f"| {limit_small_index} | blocks | {rows[1]['kind']} |" in out.read_text()
