"""Per-thread CPU accounting of the pipeline benchmark (evaluation/benchmarks/thread_cpu.py)."""
from __future__ import annotations

import sys
import threading

import pytest

from evaluation.benchmarks.thread_cpu import ThreadCPU


def _spin(n: int = 4_000_000) -> None:
    sum(i * i for i in range(n))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/task is Linux's")
def test_a_named_worker_thread_gets_its_own_cpu_time():
    with ThreadCPU(interval=0.05) as cpu:
        workers = [threading.Thread(target=_spin, name=f"worker_{i}") for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    groups = cpu.by_group()
    # both workers add up under one group; the main thread only waited; the sampler is left out
    assert groups.get("worker", 0) >= 0.1
    assert groups.get("MainThread", 0) < groups["worker"]
    assert "thread-cpu-sampler" not in groups
