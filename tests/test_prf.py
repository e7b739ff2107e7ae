"""ColBERT-PRF: expansion embeddings are centroids, weights follow IDF, validation, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.prf import PRFConfig, expand_query, expansion_embeddings
from tasks.rerank import maxsim_kernel


def _clusters(rng, n_clusters=6, per=20, dim=16, noise=0.05):
    centers = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    vecs = np.repeat(centers, per, axis=0) + rng.normal(0, noise, (n_clusters * per, dim)).astype(np.float32)
    ids = np.repeat(np.arange(100, 100 + n_clusters), per)
    return centers, vecs, ids


def test_expansions_are_centroids_of_the_feedback_tokens():
    rng = np.random.default_rng(0)
    _, vecs, ids = _clusters(rng)
    idf = np.linspace(0, 5, 200).astype(np.float32)
    exp = expansion_embeddings(vecs, ids, idf, PRFConfig(k=6, fb_embs=3))
    for vec, tid in zip(exp.vectors, exp.token_ids):
        members = vecs[ids == tid]
        assert np.allclose(vec, members.mean(axis=0), atol=1e-4)  # well-separated clusters: centroid = member mean


def test_weights_follow_idf_and_beta():
    rng = np.random.default_rng(1)
    _, vecs, ids = _clusters(rng)
    idf = np.zeros(200, np.float32)
    idf[100:106] = [0.1, 3.0, 0.5, 2.0, 4.0, 1.0]
    exp = expansion_embeddings(vecs, ids, idf, PRFConfig(k=6, fb_embs=3, beta=0.5))
    assert exp.token_ids.tolist() == [104, 101, 103]
    assert np.allclose(exp.weights, [2.0, 1.5, 1.0])


def test_k_must_exceed_fb_embs():
    with pytest.raises(ValueError, match="k \\(clusters\\) must exceed fb_embs"):
        PRFConfig(k=10, fb_embs=10)
    with pytest.raises(ValueError, match="mode"):
        PRFConfig(mode="sideways")


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(2)
    vecs = rng.normal(size=(300, 8)).astype(np.float32)
    ids = rng.integers(0, 50, size=300)
    idf = rng.uniform(0, 3, size=50).astype(np.float32)
    a = expansion_embeddings(vecs, ids, idf, PRFConfig(seed=7))
    b = expansion_embeddings(vecs, ids, idf, PRFConfig(seed=7))
    assert np.array_equal(a.vectors, b.vectors) and np.array_equal(a.token_ids, b.token_ids)


def test_fewer_tokens_than_clusters_and_no_feedback():
    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(5, 8)).astype(np.float32)
    exp = expansion_embeddings(vecs, np.arange(5), np.ones(5, np.float32), PRFConfig(k=24, fb_embs=10))
    assert len(exp.vectors) == 5
    empty = expansion_embeddings(np.zeros((0, 8), np.float32), np.zeros(0, np.int64), np.ones(5, np.float32), PRFConfig())
    assert empty.vectors.shape == (0, 8)


def test_weighted_maxsim_of_expanded_query():
    rng = np.random.default_rng(4)
    centers, vecs, ids = _clusters(rng)
    q = centers[:2]
    exp = expansion_embeddings(vecs, ids, np.ones(200, np.float32), PRFConfig(k=6, fb_embs=2, beta=2.0))
    qv, w = expand_query(q, exp)
    assert w.tolist() == [1, 1, 2, 2] and len(qv) == 4
    doc = rng.normal(size=(7, 16)).astype(np.float32)
    expected = sum(wi * max(float(x @ d) for d in doc) for x, wi in zip(qv, w))
    assert np.isclose(maxsim_kernel(qv, doc, np.array([0, 7]), w)[0], expected, atol=1e-4)
