"""CPU seconds per thread of this process during a block of code, grouped by Python thread name.

Where an indexing run's CPU time goes between the encoder's pool, the FDE worker thread and the
orchestrator's own threads (Prefect's event and log workers, its task-runner threads) is not visible
from ``time.process_time``, which sums every thread. Linux reports each thread's user + system time
in ``/proc/self/task/<tid>/stat``; this module samples it and names each thread by the Python
thread with that native id. Threads Python does not know (torch's intra-op pool, BLAS pools) are
grouped as ``native``; the main thread is one of torch's pool threads too, so its time includes
its share of the model's work. Elsewhere than Linux the result is empty.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

NATIVE = "native"
_TASKS = Path("/proc/self/task")


def _thread_cpu_seconds() -> dict[int, float]:
    """User + system CPU seconds of every live thread of this process, by native thread id."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {}
    try:
        tids = os.listdir(_TASKS)
    except OSError:
        return out
    for tid in tids:
        try:
            fields = (_TASKS / tid / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the thread ended between listing and reading
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15 of stat)
    return out


def thread_group(name: str) -> str:
    """A Python thread's name without its pool counters, so a pool's threads add up.

    Examples
    --------
    >>> thread_group("ThreadPoolExecutor-3_1"), thread_group("fde_0"), thread_group("MainThread"), thread_group("Thread-7 (run)")
    ('ThreadPoolExecutor', 'fde', 'MainThread', 'Thread (run)')
    """
    return re.sub(r"[-_]\d+(_\d+)?", "", name)


class ThreadCPU:
    """``with ThreadCPU() as cpu: ...`` then ``cpu.by_group()``: CPU seconds per thread group in the block.

    Threads are sampled every ``interval`` seconds and once at the end; a thread that starts and ends
    between two samples is missed, and the clock ticks are 10 ms, so read the result to about 0.1 s.

    Examples
    --------
    >>> with ThreadCPU(interval=0.05) as cpu:
    ...     _ = sum(i * i for i in range(3_000_000))
    >>> cpu.by_group().get("MainThread", 1.0) > 0  # (empty where /proc is missing)
    True
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def _sample(self) -> None:
        for thread in threading.enumerate():
            if thread.native_id is not None:
                self._names[thread.native_id] = thread_group(thread.name)
        self._last.update(_thread_cpu_seconds())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "ThreadCPU":
        self._start = _thread_cpu_seconds()
        self._sample()
        self._sampler = threading.Thread(target=self._run, name="thread-cpu-sampler", daemon=True)
        self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        self._sample()

    def by_group(self) -> dict[str, float]:
        """CPU seconds spent in the block per thread group, largest first (the sampler itself left out)."""
        totals: dict[str, float] = {}
        for tid, seconds in self._last.items():
            group = self._names.get(tid, NATIVE)
            if group == "thread-cpu-sampler":
                continue
            totals[group] = totals.get(group, 0.0) + seconds - self._start.get(tid, 0.0)
        return {group: round(seconds, 2) for group, seconds in sorted(totals.items(), key=lambda item: -item[1]) if seconds > 0}
