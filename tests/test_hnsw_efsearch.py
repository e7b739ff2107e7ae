"""The efSearch benchmark (evaluation/benchmarks/hnsw_efsearch.py) end to end on LIMIT-small."""
from __future__ import annotations

import json
from dataclasses import replace

from evaluation.benchmarks import hnsw_efsearch
from tasks.ann import ANNConfig


def test_a_search_as_wide_as_the_index_agrees_with_flat_search(tmp_path, limit_small, limit_small_index, prefect_harness):
    from flows.index import index_flow
    from tests.conftest import small_index_config

    hnsw = tmp_path / "hnsw"
    manifest = index_flow(str(limit_small), str(hnsw), replace(small_index_config(), ann=ANNConfig(kind="hnsw")), cache=str(tmp_path / "cache"))
    assert manifest["ann"]["kind"] == "hnsw" and manifest["counts"]["chunks"] < 512
    out = tmp_path / "ef.md"
    assert hnsw_efsearch.main([
        str(limit_small), "--split", "test", "--queries", "25", "--flat", str(limit_small_index), "--hnsw", str(hnsw),
        "--ef-search", "8", "512", "--repeats", "1", "--out", str(out),
    ]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {r["ef_search"]: r for r in report["rows"]}
    # efSearch above the chunk count visits every chunk: the same candidates, so the same top 10 as flat
    assert rows[512]["top10_overlap_with_flat"] == 1.0 and rows[512]["identical_top10"] == 1.0
    assert rows[512]["ndcg@10"] == report["flat_ndcg@10"]
    assert 0.0 <= rows[8]["top10_overlap_with_flat"] <= 1.0 and rows[8]["p50_ms"] > 0
    assert "| 512 |" in out.read_text()
