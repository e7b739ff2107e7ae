"""FAISS indexes over FDE-like vectors: every kind and HNSW storage finds what exact search finds."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from storage.index_files import read_faiss, write_faiss
import tasks.ann
from tasks.ann import HNSW_STORAGES, ANNConfig, build_ann, build_ann_from_blocks, configure_search, search_ann


@pytest.fixture(scope="module")
def clustered():
    """Unnormalised vectors around 40 centres (FDEs are sums, not unit vectors) and queries near them."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 96)) * 3
    x = (centres[rng.integers(0, 40, 3000)] + rng.normal(size=(3000, 96))).astype(np.float32)
    q = (centres[rng.integers(0, 40, 30)] + rng.normal(size=(30, 96))).astype(np.float32)
    return x, q


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


@pytest.mark.parametrize("storage", sorted(HNSW_STORAGES))
def test_hnsw_storages_find_the_exact_inner_product_neighbours(clustered, storage, tmp_path):
    x, q = clustered
    exact = np.argsort(-(q @ x.T), axis=1)[:, :50]
    index, facts = build_ann(x, ANNConfig(kind="hnsw", hnsw_storage=storage, hnsw_ef_search=128))
    assert facts["kind"] == "hnsw" and facts["storage"] == storage
    assert isinstance(index, faiss.IndexHNSW) and index.hnsw.efSearch == 128
    _, found = search_ann(index, q, 50)
    assert _recall(found, exact) >= 0.95
    # saved and loaded: the same type, and the search knobs are re-applied by configure_search
    write_faiss(index, tmp_path / "ann.faiss")
    loaded = read_faiss(tmp_path / "ann.faiss")
    configure_search(loaded, ANNConfig(hnsw_ef_search=128))
    assert type(loaded) is type(index) and loaded.hnsw.efSearch == 128
    assert np.array_equal(search_ann(loaded, q, 50)[1], found)


def test_sq8_storage_is_a_quarter_of_float32(clustered, tmp_path):
    x, _ = clustered
    sizes = {}
    for storage in ("flat", "sq8"):
        index, _ = build_ann(x, ANNConfig(kind="hnsw", hnsw_storage=storage))
        write_faiss(index, tmp_path / f"{storage}.faiss")
        sizes[storage] = (tmp_path / f"{storage}.faiss").stat().st_size
    graph = sizes["flat"] - x.nbytes  # the HNSW links are the same in both files
    assert sizes["sq8"] - graph == pytest.approx(x.nbytes / 4, rel=0.05)


def test_auto_is_flat_for_small_corpora_and_rejects_unknown_settings(clustered):
    x, q = clustered
    index, facts = build_ann(x[:500], ANNConfig())
    assert facts["kind"] == "flat" and isinstance(index, faiss.IndexFlatIP)
    assert np.array_equal(search_ann(index, q, 10)[1], np.argsort(-(q @ x[:500].T), axis=1, kind="stable")[:, :10])
    with pytest.raises(ValueError, match="hnsw_storage must be one of"):
        ANNConfig(hnsw_storage="pq")
    with pytest.raises(ValueError, match="ann kind must be one of"):
        ANNConfig(kind="lsh")


def _uneven_blocks(x: np.ndarray, seed: int = 0):
    """A fresh iterator over ``x`` cut at random places (blocks of 1 to ~600 rows) on every call."""
    cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, len(x)), size=8, replace=False))
    return lambda: iter(np.split(x, cuts))


@pytest.mark.parametrize(
    "config",
    [ANNConfig(kind="flat"), ANNConfig(kind="ivfpq", pq_subquantizers=8), ANNConfig(kind="ivfpq", ivf_lists=4, pq_subquantizers=8)]
    + [ANNConfig(kind="hnsw", hnsw_storage=storage) for storage in sorted(HNSW_STORAGES)],
    ids=["flat", "ivfpq", "ivfpq-sampled-training", *[f"hnsw-{storage}" for storage in sorted(HNSW_STORAGES)]],
)
def test_an_index_built_from_blocks_equals_the_one_built_from_the_whole_matrix(clustered, config, monkeypatch):
    x, q = clustered
    # small add batches, so that the blocks are regrouped and split as they are for a large corpus
    monkeypatch.setattr(tasks.ann, "_ADD_BATCH_BYTES", 700 * x.shape[1] * 4)
    whole, whole_facts = build_ann(x, config, seed=3)
    blocked, facts = build_ann_from_blocks(_uneven_blocks(x), x.shape, config, seed=3)
    assert facts == whole_facts and blocked.ntotal == len(x)
    if config.kind == "hnsw":
        # the graph depends on the order threads insert in; the stored vectors must not
        assert np.array_equal(blocked.storage.reconstruct_n(0, len(x)), whole.storage.reconstruct_n(0, len(x)))
        assert _recall(search_ann(blocked, q, 50)[1], search_ann(whole, q, 50)[1]) >= 0.95
    else:  # sampled training (4 lists: 1,024 of 3,000 vectors) draws the same rows by the seed
        assert faiss.serialize_index(blocked).tobytes() == faiss.serialize_index(whole).tobytes()


def test_blocks_that_do_not_add_up_to_the_announced_shape_are_refused(clustered):
    x, _ = clustered
    with pytest.raises(ValueError, match="hold 2999 vectors, 3000 announced"):
        build_ann_from_blocks(lambda: iter([x[:2999]]), x.shape, ANNConfig(kind="flat"))
    with pytest.raises(ValueError, match="more than the 2999 vectors announced"):
        build_ann_from_blocks(lambda: iter([x]), (2999, x.shape[1]), ANNConfig(kind="flat"))
    with pytest.raises(ValueError, match=r"shape \(3000, 95\), expected \(rows, 96\)"):
        build_ann_from_blocks(lambda: iter([x[:, :95]]), x.shape, ANNConfig(kind="flat"))
