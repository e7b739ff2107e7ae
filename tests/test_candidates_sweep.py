"""The candidate sweep on a real (small) index, with a second index built filling empty partitions (``--fde-fill``)."""
from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

from storage import index_files as files
from storage.manifest import resolve_index_dir


@pytest.fixture(scope="module")
def fill_and_nofill(tmp_path_factory, limit_small, limit_small_index):
    """The session's LIMIT-small index (copied: it is read-only; unfilled FDEs, the default) and the same corpus with ``--fde-fill``."""
    from flows.index import index_flow
    from tests.conftest import small_index_config

    root = tmp_path_factory.mktemp("fill-nofill")
    nofill = root / "nofill"
    shutil.copytree(limit_small_index, nofill, symlinks=True)
    config = small_index_config()
    assert config.fde.fill_empty_partitions is False
    filled = replace(config, fde=replace(config.fde, fill_empty_partitions=True))
    manifest = index_flow(str(limit_small), str(root / "filled"), filled, cache=str(nofill / ".cache"))
    return root / "filled", nofill, manifest


def test_filling_reruns_only_the_fde_stage_and_changes_the_document_fdes(fill_and_nofill):
    filled, nofill, manifest = fill_and_nofill
    assert manifest["fde"]["fill_empty_partitions"] is True
    assert manifest["incremental"]["segments_encoded"] == 0  # the tokens came from the shared cache
    with_fill = files.read_fde(resolve_index_dir(filled) / files.FDE_FILE)
    without = files.read_fde(resolve_index_dir(nofill) / files.FDE_FILE)
    assert with_fill.shape == without.shape
    # LIMIT-small chunks are short: some of their 8 partitions are empty, and only filling writes there
    assert np.count_nonzero(without == 0) > np.count_nonzero(with_fill == 0)


def test_sweep_with_every_chunk_as_candidate_equals_the_exact_ranking(fill_and_nofill, limit_small):
    from evaluation.benchmarks.candidates_sweep import render, sweep

    filled, nofill, _ = fill_and_nofill
    # filled first, as --index; both rerank scopes
    report = sweep(str(limit_small), str(filled), "test", [2, 10_000], 40, also=[str(nofill)], depth=10, scopes=("documents", "chunks"))
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == [
        "maxsim-exact", "fde-rerank@2", "fde-rerank@2 (chunks)", "fde-rerank@10000", "fde-rerank@10000 (chunks)",
        "nofill fde-rerank@2", "nofill fde-rerank@2 (chunks)", "nofill fde-rerank@10000", "nofill fde-rerank@10000 (chunks)",
    ]
    # every chunk reranked: the exact ranking, whatever the FDEs and the scope
    for name in ("fde-rerank@10000", "nofill fde-rerank@10000", "fde-rerank@10000 (chunks)", "nofill fde-rerank@10000 (chunks)"):
        assert rows[name]["recall_exact_top10"] == 1.0 and rows[name]["share_of_exact"] == pytest.approx(1.0)
    assert "| nofill fde-rerank@2 |" in render(report) and report["depth"] == 10


def test_hnsw_storage_benchmark_compares_with_flat_search(limit_small, limit_small_index):
    from evaluation.benchmarks.hnsw_storage import compare, render

    report = compare(str(limit_small), str(limit_small_index), "test", 20, ["flat", "sq8"], [16, 64], 10)
    rows = report["rows"]
    assert [(r["storage"], r["ef_search"]) for r in rows] == [("exact (flat)", None), ("flat", 16), ("flat", 64), ("sq8", 16), ("sq8", 64)]
    assert rows[0]["doc_overlap"] == 1.0 and all(0.8 <= r["doc_overlap"] <= 1.0 for r in rows)
    assert report["queries"] == 20 and "| sq8 | 64 |" in render(report)
