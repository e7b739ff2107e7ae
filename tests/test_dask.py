"""Scale-out: the index flow on a real 2-worker Dask LocalCluster builds the same index as the default runner."""
from __future__ import annotations

import json
import pytest

from flows.index import index_flow
from flows.runners import with_runner
from tests.conftest import write_jsonl
from tests.test_incremental import assert_same_index, config as small_config

distributed = pytest.importorskip("distributed")


def _encoders_loaded() -> int:
    """Run on a worker: how many encoders this worker process loaded (one per model it encoded with)."""
    import sys

    module = sys.modules.get("tasks.encode")
    return module.load_encoder.cache_info().currsize if module else 0


def test_dask_runner_builds_the_same_index_as_the_default_runner(tmp_path, limit_small, prefect_harness):
    docs = [json.loads(line) for line in (limit_small / "corpus.jsonl").read_text(encoding="utf-8").splitlines()][:8]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    config = small_config(shard_size=2)  # 4 segments to spread over 2 workers
    index_flow(str(corpus), str(tmp_path / "default"), config)

    # OMP/OPENBLAS threads are pinned to 1 in the workers by distributed's defaults (STACK.md)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with distributed.Client(cluster) as client:
            manifest = with_runner(index_flow, "dask", dask_address=cluster.scheduler_address)(str(corpus), str(tmp_path / "dask"), config)
            per_worker = client.run(_encoders_loaded)
    assert manifest["incremental"]["segments_encoded"] == 4
    assert sum(per_worker.values()) >= 1, per_worker  # the encoding ran in worker processes
    # the workers' own timings reach the manifest: every stage took time, encoding the most
    seconds = manifest["stage_seconds"]
    assert {"chunk", "encode", "fde", "stages_parallel"} <= set(seconds), seconds
    assert 0 < seconds["chunk"] < seconds["encode"], seconds
    assert_same_index(tmp_path / "default", tmp_path / "dask")
