"""The scaling study's synthetic-document generator (evaluation/benchmarks/scaling.py), on tiny arrays."""
from __future__ import annotations

import numpy as np
import pytest

from evaluation.benchmarks.scaling import SyntheticRecipe, select_real_documents, split_runs, synthetic_documents

# six source chunks of 5, 8, 0, 10, 7 and 6 token rows (chunk 2 is empty)
OFFSETS = np.array([0, 5, 13, 13, 23, 30, 36])
POOL = np.array([0, 2, 3, 4])  # chunks 1 and 5 stand for judged documents' chunks


def _docs(seed: int = 3, n: int = 200, mean: float = 4.0):
    return synthetic_documents(OFFSETS, POOL, n, SyntheticRecipe(mean_tokens=mean, min_runs=2, max_runs=3, seed=seed))


def test_same_seed_same_documents_and_other_seed_differs():
    a, b, c = _docs(3), _docs(3), _docs(4)
    assert np.array_equal(a.rows, b.rows) and np.array_equal(a.offsets, b.offsets)
    assert np.array_equal(a.run_sources, b.run_sources) and np.array_equal(a.run_starts, b.run_starts)
    assert not (np.array_equal(a.offsets, c.offsets) and np.array_equal(a.rows, c.rows))


def test_every_row_is_a_real_row_of_a_pool_chunk_in_contiguous_runs():
    docs = _docs()
    assert set(docs.run_sources.tolist()) <= {0, 3, 4}  # the pool, minus the empty chunk 2
    run_first = np.cumsum(docs.run_lengths) - docs.run_lengths
    for run, (source, start, length) in enumerate(zip(docs.run_sources, docs.run_starts, docs.run_lengths)):
        assert 0 <= start and start + length <= OFFSETS[source + 1] - OFFSETS[source]
        rows = docs.rows[run_first[run] : run_first[run] + length]
        assert np.array_equal(rows, np.arange(OFFSETS[source] + start, OFFSETS[source] + start + length))
    # runs tile each document exactly
    assert np.array_equal(docs.offsets[1:], np.cumsum(docs.run_lengths)[docs.run_offsets[1:] - 1])


def test_lengths_within_bounds_and_runs_per_document():
    docs = _docs(n=500)
    lengths = np.diff(docs.offsets)
    assert lengths.min() >= 1 and lengths.max() <= 10  # the longest pool chunk
    runs = np.diff(docs.run_offsets)
    assert (runs <= 3).all() and (runs >= np.minimum(2, lengths)).all()
    assert (docs.run_lengths >= 1).all()


def test_mean_length_follows_the_recipe():
    lengths = np.diff(_docs(n=4000, mean=5.0).offsets)
    assert abs(lengths.mean() - 5.0) < 0.5  # rounding and the cap move it a little


def test_no_documents_and_no_pool():
    assert len(_docs(n=0)) == 0 and len(_docs(n=0).rows) == 0
    with pytest.raises(ValueError, match="no non-empty source chunk"):
        synthetic_documents(OFFSETS, np.array([2]), 3, SyntheticRecipe())


def test_split_runs_sums_to_each_length():
    lengths = np.array([1, 2, 9, 40])
    parts, offsets = split_runs(lengths, 2, 4, np.random.default_rng(0))
    assert [int(parts[a:b].sum()) for a, b in zip(offsets[:-1], offsets[1:])] == lengths.tolist()
    assert (parts >= 1).all() and np.diff(offsets)[0] == 1


def test_real_subset_keeps_judged_documents():
    picked = select_real_documents(50, np.array([3, 40, 3]), 10, seed=1)
    assert len(picked) == 10 and {3, 40} <= set(picked.tolist()) and (np.diff(picked) > 0).all()
    assert np.array_equal(picked, select_real_documents(50, np.array([3, 40]), 10, seed=1))
    assert np.array_equal(select_real_documents(50, np.array([3]), 80, seed=1), np.arange(50))
    with pytest.raises(ValueError):
        select_real_documents(50, np.arange(20), 10, seed=1)
