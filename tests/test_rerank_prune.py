"""The bounded int8 prefilter: its error bound and its top-k equal to the exact rerank's, on random inputs."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from storage.token_codec import encode, int8_rows
from tasks import rerank_prune
from tasks.rerank import group_max, maxsim_candidates
from tasks.rerank_prune import approximate_maxsim, int8_matmul, maxsim_top_groups, quantize_query


def _int8_store(rng, lengths, dim):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    unit = rng.normal(size=(offsets[-1], dim)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    codes, row_scale = int8_rows(encode(unit, "int8"), "int8")
    return codes, row_scale, offsets


def _unit_query(rng, n, dim):
    q = rng.normal(size=(n, dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), nq=st.integers(1, 8), dim=st.integers(2, 64))
def test_quantized_query_reconstructs_within_its_residual(seed, nq, dim):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(nq, dim)).astype(np.float32)
    codes, scales, residuals = quantize_query(q)
    assert codes.dtype == np.int8 and np.abs(codes).max() == 127
    error = q - codes.astype(np.float32) * scales[:, None]
    assert np.allclose(np.linalg.norm(error, axis=1), residuals, atol=1e-6)
    # rounding to the nearest code: at most half a step per value
    assert np.all(np.abs(error) <= scales[:, None] / 2 + 1e-7)


def test_int8_matmul_is_exact_and_its_fallback_agrees(monkeypatch):
    rng = np.random.default_rng(0)
    rows = rng.integers(-127, 128, size=(37, 24), dtype=np.int8)
    codes = rng.integers(-127, 128, size=(5, 24), dtype=np.int8)
    expected = codes.astype(np.int64) @ rows.astype(np.int64).T
    assert np.array_equal(int8_matmul(codes, rows), expected)
    import torch

    monkeypatch.delattr(torch, "_int_mm")  # an older torch: numpy in int32
    assert np.array_equal(int8_matmul(codes, rows), expected)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n_sets=st.integers(1, 30), dim=st.integers(2, 48), nq=st.integers(1, 8))
def test_approximate_scores_are_within_the_bound(seed, n_sets, dim, nq):
    rng = np.random.default_rng(seed)
    store, row_scale, offsets = _int8_store(rng, rng.integers(0, 9, size=n_sets), dim)
    q = _unit_query(rng, nq, dim)
    w = rng.uniform(0.2, 2.0, size=nq).astype(np.float32)
    ids = rng.permutation(n_sets)
    codes, scales, residuals = quantize_query(q)
    approx = approximate_maxsim(codes, scales, store, offsets, ids, row_scale, w)
    exact = maxsim_candidates(q, store, offsets, ids, w, row_scale)
    empty = np.isinf(exact)
    assert np.array_equal(np.isinf(approx), empty)
    assert np.all(np.abs(approx[~empty] - exact[~empty]) <= w @ residuals + 1e-5)


def _top(scores, group_offsets, k):
    best, arg = group_max(scores, group_offsets)
    order = np.argsort(-best, kind="stable")[:k]
    return order, best[order], arg[order]


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 10_000), n_groups=st.integers(1, 40), dim=st.integers(4, 48), nq=st.integers(1, 8), k=st.integers(1, 12),
    weighted=st.booleans(),
)
def test_top_groups_equal_the_exact_rerank(seed, n_groups, dim, nq, k, weighted):
    rng = np.random.default_rng(seed)
    sets_per_group = rng.integers(1, 4, size=n_groups)
    group_offsets = np.concatenate([[0], np.cumsum(sets_per_group)]).astype(np.int64)
    n_sets = int(group_offsets[-1])
    store, row_scale, offsets = _int8_store(rng, rng.integers(0, 12, size=n_sets), dim)
    set_ids = rng.permutation(n_sets)  # candidates in any store order
    q = _unit_query(rng, nq, dim)
    w = rng.uniform(0.2, 2.0, size=nq).astype(np.float32) if weighted else None
    pruned, share = maxsim_top_groups(q, store, offsets, set_ids, group_offsets, k, w, row_scale)
    exact = maxsim_candidates(q, store, offsets, set_ids, w, row_scale)
    got, want = _top(pruned, group_offsets, k), _top(exact, group_offsets, k)
    finite = np.isfinite(want[1])
    # the exact top k (ties aside: random unit vectors have none): same groups, order, scores, best sets
    assert np.array_equal(got[0][finite], want[0][finite])
    assert np.allclose(got[1][finite], want[1][finite], atol=1e-5)
    assert np.array_equal(got[2][finite], want[2][finite])
    # whatever was scored is scored exactly; the rest is -inf
    scored = np.isfinite(pruned)
    assert np.allclose(pruned[scored], exact[scored], atol=1e-5)
    assert 0.0 < share <= 1.0 or not np.isfinite(exact).any()


def test_prefilter_prunes_most_candidates_when_scores_spread():
    """A clustered query: a few groups are close to it, most are not, and only those few are re-scored."""
    rng = np.random.default_rng(1)
    dim, n_groups = 64, 200
    q = _unit_query(rng, 6, dim)
    near = q[rng.integers(0, 6, size=40)] + 0.3 * rng.normal(size=(40, dim))
    far = rng.normal(size=(n_groups * 8 - 40, dim))
    unit = np.concatenate([near, far]).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    store, row_scale = int8_rows(encode(unit, "int8"), "int8")
    offsets = np.arange(0, n_groups * 8 + 1, 8)
    groups = np.arange(n_groups + 1)
    pruned, share = maxsim_top_groups(q, store, offsets, np.arange(n_groups), groups, 3, row_scale=row_scale)
    assert share < 0.2
    exact = maxsim_candidates(q, store, offsets, np.arange(n_groups), row_scale=row_scale)
    assert np.array_equal(_top(pruned, groups, 3)[0], _top(exact, groups, 3)[0])


def test_float_stores_and_few_groups_are_scored_exactly():
    rng = np.random.default_rng(2)
    store, row_scale, offsets = _int8_store(rng, [3, 4, 5, 2], 16)
    q = _unit_query(rng, 3, 16)
    groups = np.array([0, 2, 4])
    exact = maxsim_candidates(q, store, offsets, np.arange(4), row_scale=row_scale)
    # k >= number of groups: nothing can be pruned
    scores, share = maxsim_top_groups(q, store, offsets, np.arange(4), groups, 2, row_scale=row_scale)
    assert share == 1.0 and np.allclose(scores, exact)
    # a float store: no int8 codes to prefilter with
    floats = (store.astype(np.float32) * row_scale[:, None]).astype(np.float32)
    scores, share = maxsim_top_groups(q, floats, offsets, np.arange(4), groups, 1)
    assert share == 1.0 and np.allclose(scores, exact, atol=1e-5)
    assert not rerank_prune.prunable(floats, None)


@pytest.mark.parametrize("k", [1, 5])
def test_empty_sets_never_win(k):
    rng = np.random.default_rng(3)
    store, row_scale, offsets = _int8_store(rng, [0, 4, 0, 6, 3, 0, 5, 2], 16)
    groups = np.array([0, 1, 2, 3, 5, 6, 8])  # groups 0, 2 and 4 hold only an empty set
    q = _unit_query(rng, 4, 16)
    pruned, _ = maxsim_top_groups(q, store, offsets, np.arange(8), groups, k, row_scale=row_scale)
    exact = maxsim_candidates(q, store, offsets, np.arange(8), row_scale=row_scale)
    got, want = _top(pruned, groups, k), _top(exact, groups, k)
    finite = np.isfinite(want[1])
    assert np.array_equal(got[0][finite], want[0][finite]) and not {0, 2, 4} & set(got[0][np.isfinite(got[1])].tolist())


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000), n_groups=st.integers(1, 40), dim=st.integers(4, 48), n_queries=st.integers(1, 4),
    k=st.integers(1, 12), block_values=st.sampled_from([1, 50, 700, 1 << 25]),
)
def test_pruned_brute_force_has_the_exact_top_groups_of_every_query(seed, n_groups, dim, n_queries, k, block_values):
    from tasks.rerank import maxsim_exhaustive

    rng = np.random.default_rng(seed)
    group_offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 4, size=n_groups))]).astype(np.int64)
    store, row_scale, offsets = _int8_store(rng, rng.integers(0, 12, size=int(group_offsets[-1])), dim)
    queries = [_unit_query(rng, int(rng.integers(1, 9)), dim) for _ in range(n_queries)]
    pruned = rerank_prune.maxsim_exhaustive_top_groups(queries, store, offsets, group_offsets, k, row_scale, block_values=block_values)
    exact = maxsim_exhaustive(queries, store, offsets, row_scale=row_scale)
    assert pruned.shape == exact.shape == (n_queries, len(offsets) - 1)
    for p, e in zip(pruned, exact):
        got, want = _top(p, group_offsets, k), _top(e, group_offsets, k)
        finite = np.isfinite(want[1])
        assert np.array_equal(got[0][finite], want[0][finite]) and np.array_equal(got[2][finite], want[2][finite])
        assert np.allclose(got[1][finite], want[1][finite], atol=1e-5)
        scored = np.isfinite(p)
        assert np.allclose(p[scored], e[scored], atol=1e-5)


def test_pruned_brute_force_prunes_and_needs_its_margin(monkeypatch):
    """On spread scores most sets are cut; without the 2 * bound margin the top k would be wrong somewhere."""
    from tasks.rerank import maxsim_exhaustive

    rng = np.random.default_rng(4)
    dim, n_groups = 32, 300
    store, row_scale, offsets = _int8_store(rng, rng.integers(1, 10, size=n_groups), dim)
    groups = np.arange(n_groups + 1)
    queries = [_unit_query(rng, 6, dim) for _ in range(40)]
    exact = maxsim_exhaustive(queries, store, offsets, row_scale=row_scale)
    pruned = rerank_prune.maxsim_exhaustive_top_groups(queries, store, offsets, groups, 5, row_scale)
    assert np.isinf(pruned).mean() > 0.5
    assert all(np.array_equal(_top(p, groups, 5)[0], _top(e, groups, 5)[0]) for p, e in zip(pruned, exact))
    monkeypatch.setattr(rerank_prune, "_ROUNDING_SLACK", -1.0)  # a negative margin: cuts sets that belong in the top k
    broken = rerank_prune.maxsim_exhaustive_top_groups(queries, store, offsets, groups, 5, row_scale)
    assert not all(np.array_equal(_top(p, groups, 5)[0], _top(e, groups, 5)[0]) for p, e in zip(broken, exact))


def test_pruned_brute_force_edge_cases():
    """k = 0, and fewer groups holding a token than k (nothing to prune: every set scored, as plain brute force)."""
    from tasks.rerank import maxsim_exhaustive

    rng = np.random.default_rng(5)
    store, row_scale, offsets = _int8_store(rng, [0] * 18 + [30, 30], 16)  # 20 sets, only the last two hold tokens
    queries = [_unit_query(rng, 4, 16)]
    groups = np.arange(21)
    plain = maxsim_exhaustive(queries, store, offsets, row_scale=row_scale)
    for k in (0, 5):
        pruned = rerank_prune.maxsim_exhaustive_top_groups(queries, store, offsets, groups, k, row_scale)
        assert np.array_equal(np.isfinite(pruned), np.isfinite(plain)) and np.allclose(pruned[np.isfinite(pruned)], plain[np.isfinite(plain)], atol=1e-5)
    scores, share = maxsim_top_groups(queries[0], store, offsets, np.arange(20), groups, 0, row_scale=row_scale)
    assert share == 1.0
