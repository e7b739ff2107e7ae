"""Exact MaxSim kernels against a naive loop, on random inputs."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from tasks import rerank
from tasks.rerank import group_max, maxsim_candidates, maxsim_exhaustive, maxsim_kernel


def naive_maxsim(q, d, w=None):
    w = np.ones(len(q)) if w is None else w
    return sum(w[i] * max(float(np.dot(q[i], t)) for t in d) for i in range(len(q)))


def _store(rng, lengths, dim):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    vecs = rng.normal(size=(offsets[-1], dim))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs.astype(np.float16), offsets


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_sets=st.integers(1, 12), dim=st.integers(2, 16), nq=st.integers(1, 6))
def test_maxsim_kernel_matches_naive_loop(seed, n_sets, dim, nq):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 7, size=n_sets)
    store, offsets = _store(rng, lengths, dim)
    q = rng.normal(size=(nq, dim)).astype(np.float32)
    w = rng.uniform(0.1, 2, size=nq).astype(np.float32)
    got = maxsim_kernel(q, store, offsets, w)
    for i in range(n_sets):
        doc = store[offsets[i] : offsets[i + 1]].astype(np.float32)
        if len(doc) == 0:
            assert got[i] == -np.inf
        else:
            assert np.isclose(got[i], naive_maxsim(q, doc, w), atol=1e-4)


def test_small_blocks_give_the_same_scores(monkeypatch):
    rng = np.random.default_rng(1)
    store, offsets = _store(rng, rng.integers(1, 30, size=200), 8)
    q = rng.normal(size=(5, 8)).astype(np.float32)
    full = maxsim_kernel(q, store, offsets)
    monkeypatch.setattr(rerank, "_BLOCK_ROWS", 7)
    assert np.allclose(maxsim_kernel(q, store, offsets), full, atol=1e-5)
    assert np.allclose(maxsim_exhaustive([q, q[:2]], store, offsets, block_rows=11)[0], full, atol=1e-5)


def test_exhaustive_equals_per_query_kernel():
    rng = np.random.default_rng(2)
    store, offsets = _store(rng, rng.integers(0, 9, size=50), 6)
    queries = [rng.normal(size=(n, 6)).astype(np.float32) for n in (1, 4, 9)]
    got = maxsim_exhaustive(queries, store, offsets)
    for row, q in zip(got, queries):
        assert np.allclose(row, maxsim_kernel(q, store, offsets), atol=1e-5)


def test_candidates_match_full_scoring_in_any_order():
    rng = np.random.default_rng(3)
    store, offsets = _store(rng, [2, 0, 3, 1, 4, 2], 4)
    q = rng.normal(size=(3, 4)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, size=3).astype(np.float32)
    full = maxsim_kernel(q, store, offsets, w)
    for ids in ([2, 3], [5, 0, 2, 3], [4, 4, 1, 2], [1], []):
        got = maxsim_candidates(q, store, offsets, np.array(ids, dtype=np.int64), w)
        assert got.dtype == np.float32 and np.allclose(got, full[ids], atol=1e-6)  # -inf for the empty set 1


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n_sets=st.integers(1, 20), dim=st.integers(2, 24), nq=st.integers(1, 6))
def test_int8_codes_with_row_scale_score_like_their_decoded_rows(seed, n_sets, dim, nq):
    """Every kernel on (codes, row_scale) equals the same kernel on codes * row_scale (the unit vectors)."""
    from storage.token_codec import int8_rows

    rng = np.random.default_rng(seed)
    store, offsets = _store(rng, rng.integers(0, 7, size=n_sets), dim)
    codes, scale = int8_rows(store, "float16")
    decoded = codes.astype(np.float32) * scale[:, None]
    q = rng.normal(size=(nq, dim)).astype(np.float32)
    w = rng.uniform(0.1, 2, size=nq).astype(np.float32)
    want = maxsim_kernel(q, decoded, offsets, w)
    assert np.allclose(maxsim_kernel(q, codes, offsets, w, row_scale=scale), want, atol=1e-4)
    ids = rng.integers(0, n_sets, size=5)
    assert np.allclose(maxsim_candidates(q, codes, offsets, ids, w, row_scale=scale), want[ids], atol=1e-4)
    assert np.allclose(maxsim_exhaustive([q], codes, offsets, row_scale=scale)[0], maxsim_kernel(q, decoded, offsets), atol=1e-4)


def test_group_max_picks_first_best():
    best, arg = group_max(np.array([1.0, 5.0, 5.0, 2.0, 9.0]), np.array([0, 3, 5]))
    assert best.tolist() == [5.0, 9.0] and arg.tolist() == [1, 4]
