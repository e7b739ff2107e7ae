"""Prefect process hygiene: temporary API servers orphaned by killed runs are stopped (Linux)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from flows.settings import reap_orphaned_ephemeral_servers

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _orphan(home: str, ephemeral: str = "1") -> int:
    """Start a sleeping process that looks like Prefect's temporary server, orphaned (its parent exits at once)."""
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT__SERVER_EPHEMERAL": ephemeral}
    script = "import time; time.sleep(120)"
    # the shell starts it in the background and exits: the sleeper is re-parented to init
    out = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -c "{script}" -m uvicorn --factory prefect.server.api.server:create_app >/dev/null 2>&1 & echo $!'],
        env=env, capture_output=True, text=True, check=True,
    )
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # wait until the re-parenting is visible
        with open(f"/proc/{pid}/stat", "rb") as handle:
            if int(handle.read().rsplit(b")", 1)[1].split()[1]) == 1:
                return pid
        time.sleep(0.05)
    pytest.skip("orphans are not re-parented to pid 1 here (a subreaper is in the way)")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_only_orphaned_ephemeral_servers_of_this_prefect_home_are_stopped(tmp_path):
    ours, other_home, not_ephemeral = _orphan(str(tmp_path / "ours")), _orphan(str(tmp_path / "other")), _orphan(str(tmp_path / "ours"), "0")
    try:
        assert reap_orphaned_ephemeral_servers(str(tmp_path / "ours")) == [ours]
        deadline = time.monotonic() + 10
        while _alive(ours) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(ours) and _alive(other_home) and _alive(not_ephemeral)
    finally:
        for pid in (ours, other_home, not_ephemeral):
            try:
                os.kill(pid, 9)
            except OSError:
                pass


@pytest.mark.parametrize("changes, message", [
    ({"shard_size": 0}, "shard_size"),
    ({"batch_tokens": 10}, "batch_tokens"),
    ({"device": "gpu"}, "not a torch device"),
])
def test_index_settings_are_checked_before_any_work(changes, message):
    from flows.index import IndexConfig

    with pytest.raises(ValueError, match=message):
        IndexConfig(**changes)


def test_cuda_without_a_gpu_is_refused_where_this_process_encodes(capsys):
    import torch

    from flows.index import IndexConfig
    from lateflow.cli import main as cli_main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    IndexConfig(device="cuda")  # a Dask coordinator without a GPU may send work to workers with one
    assert cli_main(["index", "corpus.jsonl", "--index", "idx", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bad_fde_settings_are_named_before_any_work():
    from flows.index import FDEParams, IndexConfig

    with pytest.raises(ValueError, match="repetitions"):
        IndexConfig(fde=FDEParams(repetitions=0))
    with pytest.raises(ValueError, match="simhash_bits"):
        IndexConfig(fde=FDEParams(simhash_bits=40))
