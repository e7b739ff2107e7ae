"""Shared fixtures: the real bundled model, a Prefect test harness, small real corpora."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.settings import apply_quiet_defaults

apply_quiet_defaults()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def model_path() -> str:
    from tasks.encode import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from tasks.encode import load_tokenizer

    return load_tokenizer(model_path)


@pytest.fixture(scope="session")
def encoder(model_path):
    from tasks.encode import EncoderConfig, load_encoder

    return load_encoder(EncoderConfig(model_path=model_path))


@pytest.fixture(scope="session")
def prefect_harness():
    """A throw-away Prefect API for the whole session (starting one costs ~8 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def limit_small() -> Path:
    from evaluation.demo import bundled_dataset

    return bundled_dataset("limit-small")


def small_index_config():
    """Small, fast index settings for tests: 64-token windows cut a LIMIT-small document into ~3
    chunks (so the chunk -> document logic is exercised), and 1,024-dim FDEs build in a blink."""
    from flows.index import FDEParams, IndexConfig
    from tasks.chunk import ChunkConfig

    return IndexConfig(chunk=ChunkConfig(window=64, overlap=16), fde=FDEParams(repetitions=8, simhash_bits=3, projection_dim=16), shard_size=25)


@pytest.fixture(scope="session")
def limit_small_index(tmp_path_factory, limit_small, prefect_harness) -> Path:
    """LIMIT-small (46 documents) indexed once per session with :func:`small_index_config`; read-only.

    Tests that change an index must copy it first (``shutil.copytree``).
    """
    from flows.index import index_flow

    out = tmp_path_factory.mktemp("limit-small-index") / "index"
    index_flow(str(limit_small), str(out), small_index_config())
    return out


@pytest.fixture(scope="session")
def scifact_sample(tmp_path_factory) -> Path:
    """60 real SciFact documents (every 80th line) as a corpus.jsonl; skipped without ../shared."""
    source = SHARED_DATASETS / "scifact" / "corpus.jsonl"
    if not source.exists():
        pytest.skip("../shared/datasets/scifact is not present")
    lines = source.read_text(encoding="utf-8").splitlines()[::80][:60]
    out = tmp_path_factory.mktemp("scifact-sample") / "corpus.jsonl"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path
