"""Per-thread CPU accounting of the pipeline benchmark (evaluation/benchmarks/thread_cpu.py)."""
from __future__ import annotations

import sys
import threading

import pytest

from evaluation.benchmarks.thread_cpu import ThreadCPU


def _spin_then_wait(spun: threading.Event, done: threading.Event, n: int = 4_000_000) -> None:
    sum(i * i for i in range(n))
    spun.set()
    # Stay alive until the block has taken its final sample. A thread that ends between two samples
    # is missed by design (documented); whether the sampler got the GIL while the workers spun is
    # the scheduler's business, not what this test checks (it failed once in CI for that reason).
    done.wait(timeout=60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/task is Linux's")
def test_a_named_worker_thread_gets_its_own_cpu_time():
    done = threading.Event()
    spun = [threading.Event() for _ in range(2)]
    workers = [threading.Thread(target=_spin_then_wait, args=(s, done), name=f"worker_{i}") for i, s in enumerate(spun)]
    try:
        with ThreadCPU(interval=0.05) as cpu:
            for w in workers:
                w.start()
            for s in spun:
                assert s.wait(timeout=60)
    finally:
        done.set()
        for w in workers:
            w.join()
    groups = cpu.by_group()
    # both workers add up under one group; the main thread only waited; the sampler is left out
    assert groups.get("worker", 0) >= 0.1
    assert groups.get("MainThread", 0) < groups["worker"]
    assert "thread-cpu-sampler" not in groups
