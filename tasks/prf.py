"""Stage 5: ColBERT-PRF pseudo-relevance feedback (Wang, Macdonald, Tonellotto, Ounis 2021).

From the first pass's top ``fb_docs`` documents, the token embeddings are clustered with k-means
(k-means++ seeds, FAISS Lloyd iterations, seeded) into ``k`` centroids. Each centroid is mapped to a token id by majority vote
over its ``vote_tokens`` nearest member tokens (special tokens and, by the index's default,
punctuation were already dropped from the store); centroids are ranked by that token's IDF
``ln((1+N)/(df+1))`` over the whole index, and the top ``fb_embs`` are appended to the query with
weight ``beta * idf`` (original query tokens weigh 1). Scoring is weighted MaxSim
``sum_i w_i max_j <q_i, d_j>``.

The paper maps a centroid through an ANN over the whole token index; we vote among the centroid's
own cluster members (feedback-document tokens), so no token-level ANN index is needed and the
index stays small.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

PRF_MODES = ("rerank", "retrieve")


@dataclass(frozen=True)
class PRFConfig:
    """ColBERT-PRF settings.

    The paper's reference values are fb_docs=3, k=24, fb_embs=10, beta=1.0. Ours were chosen by a
    sweep on the scifact **train** split (reports/prf-sweep-scifact-train.md): every beta >= 0.25
    hurt there (beta=1.0: -0.06 to -0.08 nDCG@10), so the default is the best, gentle, setting; the
    README says where PRF helps and where it does not.
    """

    fb_docs: int = 5
    k: int = 24
    fb_embs: int = 5
    beta: float = 0.1
    mode: str = "rerank"
    vote_tokens: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fb_docs < 1:
            raise ValueError(f"prf fb_docs must be at least 1, got {self.fb_docs}")
        if self.fb_embs < 1:
            raise ValueError(f"prf fb_embs must be at least 1, got {self.fb_embs}")
        if self.k <= self.fb_embs:
            raise ValueError(f"prf k (clusters) must exceed fb_embs (expansion embeddings kept): got k={self.k}, fb_embs={self.fb_embs}")
        if self.beta < 0:
            raise ValueError(f"prf beta must be >= 0, got {self.beta}")
        if self.mode not in PRF_MODES:
            raise ValueError(f"prf mode must be one of {PRF_MODES}, got {self.mode!r}")
        if self.vote_tokens < 1:
            raise ValueError(f"prf vote_tokens must be at least 1, got {self.vote_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Expansion:
    """Expansion embeddings (centroids), their token ids and weights ``beta * idf``."""

    vectors: np.ndarray  # (n, dim) float32
    token_ids: np.ndarray  # (n,) int64
    weights: np.ndarray  # (n,) float32


def kmeans_plusplus_seeds(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ seeding (Arthur and Vassilvitskii 2007): each next seed drawn with probability ~ D(x)^2.

    FAISS seeds k-means at random, which on a few hundred feedback tokens often merges two clear
    clusters and splits another; k-means++ avoids that for a few ms (scikit-learn's takes ~10 ms here).

    Examples
    --------
    >>> pts = np.array([[0.0, 0.0], [0.0, 0.1], [5.0, 5.0], [5.0, 5.1]], dtype=np.float32)
    >>> seeds = kmeans_plusplus_seeds(pts, 2, seed=0)
    >>> sorted(int(s[0] > 2) for s in seeds)  # one seed in each far-apart pair
    [0, 1]
    """
    rng = np.random.default_rng(seed)
    # the greedy variant (as scikit-learn): draw 2 + ln(k) candidates per step, keep the one that
    # lowers the potential most; plain k-means++ too often puts two seeds in one tight cluster
    trials = 2 + int(np.log(k))
    squared_norms = np.einsum("ij,ij->i", points, points)

    def distances_to(rows: np.ndarray) -> np.ndarray:
        return np.maximum(squared_norms[None, :] - 2 * points[rows] @ points.T + squared_norms[rows, None], 0)

    chosen = [int(rng.integers(len(points)))]
    nearest = distances_to(np.array(chosen))[0]
    for _ in range(1, k):
        total = float(nearest.sum())
        if total <= 0:  # every point coincides with a seed already
            chosen.append(int(rng.integers(len(points))))
            continue
        candidates = rng.choice(len(points), size=trials, p=nearest / total)
        updated = np.minimum(nearest[None, :], distances_to(candidates))
        best = int(np.argmin(updated.sum(axis=1)))
        chosen.append(int(candidates[best]))
        nearest = updated[best]
    return np.ascontiguousarray(points[chosen], dtype=np.float32)


def _kmeans(points: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded k-means: k-means++ seeds, then FAISS Lloyd iterations (5-10x faster than scikit-learn)."""
    import faiss

    # a few hundred feedback tokens is far below FAISS's default of 39 points per centroid: allow it
    # explicitly (the default prints a warning on every query); 20 iterations converge on such sets
    model = faiss.Kmeans(points.shape[1], k, niter=20, seed=seed, min_points_per_centroid=1, max_points_per_centroid=1 << 20, verbose=False)
    model.train(points, init_centroids=kmeans_plusplus_seeds(points, k, seed))
    _, labels = model.index.search(points, 1)
    return model.centroids.astype(np.float32), labels[:, 0]


def expansion_embeddings(feedback_vectors: np.ndarray, feedback_token_ids: np.ndarray, idf: np.ndarray, config: PRFConfig) -> Expansion:
    """Cluster feedback token embeddings and keep the ``fb_embs`` centroids with the highest token IDF.

    Parameters
    ----------
    feedback_vectors
        (n_tokens, dim) token embeddings of the feedback documents (float16 or float32).
    feedback_token_ids
        (n_tokens,) their token ids.
    idf
        Dense IDF lookup indexed by token id (:func:`tasks.idf.idf_lookup`).
    config
        PRF settings. With fewer distinct tokens than ``k``, ``k`` shrinks to that number.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> vecs = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0) + rng.normal(0, 0.01, (12, 4)).astype(np.float32)
    >>> ids = np.repeat(np.array([10, 11, 12, 13]), 3)
    >>> idf = np.zeros(20, np.float32); idf[[10, 11, 12, 13]] = [0.5, 2.0, 1.0, 3.0]
    >>> exp = expansion_embeddings(vecs, ids, idf, PRFConfig(k=4, fb_embs=2, beta=1.0))
    >>> exp.token_ids.tolist(), exp.weights.tolist()
    ([13, 11], [3.0, 2.0])
    """
    points = np.ascontiguousarray(feedback_vectors, dtype=np.float32)
    if len(points) == 0:
        return Expansion(np.zeros((0, feedback_vectors.shape[1]), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))
    distinct = len(np.unique(points, axis=0))
    k = min(config.k, distinct)
    centroids, labels = _kmeans(points, k, config.seed)
    # vote among the centroid's own members, its vote_tokens nearest ones; ties go to the smallest id
    token_ids = np.empty(k, dtype=np.int64)
    for c in range(k):  # k is a few dozen: a loop over centroids, not tokens
        members = np.flatnonzero(labels == c)
        nearest = members[np.argsort(-(points[members] @ centroids[c]), kind="stable")[: config.vote_tokens]]
        ids, counts = np.unique(feedback_token_ids[nearest], return_counts=True)
        token_ids[c] = ids[np.argmax(counts)]
    centroid_idf = idf[token_ids]
    keep = np.argsort(-centroid_idf, kind="stable")[: min(config.fb_embs, k)]
    return Expansion(vectors=centroids[keep], token_ids=token_ids[keep], weights=(config.beta * centroid_idf[keep]).astype(np.float32))


def expand_query(query_vectors: np.ndarray, expansion: Expansion) -> tuple[np.ndarray, np.ndarray]:
    """The expanded query: original tokens with weight 1 followed by the weighted expansion embeddings."""
    vectors = np.concatenate([np.asarray(query_vectors, np.float32), expansion.vectors])
    weights = np.concatenate([np.ones(len(query_vectors), np.float32), expansion.weights])
    return vectors, weights
