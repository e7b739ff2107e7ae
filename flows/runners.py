"""Task runners for the index flow: the default (in-process) runner, or Dask for scale-out.

``--runner dask`` without an address starts a ``distributed.LocalCluster`` for the run (one worker
process per core by default, one thread each, the dashboard on a free port) and closes it at the
end; with ``--dask-address tcp://host:8786`` the flow submits its per-segment tasks to that existing
cluster. Workers of a remote cluster need the same Python environment (lateflow, torch, the model)
and must reach the shard cache: the index folder's ``.cache`` on a shared mount, or an object-store
URL given with ``--cache``.

A LocalCluster starts worker *processes*; a script that calls the flow with it must guard its entry
point with ``if __name__ == "__main__":`` (the ``lateflow`` command does).
"""
from __future__ import annotations

from typing import Any

RUNNERS = ("default", "dask")


def make_task_runner(kind: str = "default", *, dask_address: str | None = None, dask_workers: int | None = None) -> Any:
    """A Prefect task runner: None for ``default`` (keep the flow's own), else a ``DaskTaskRunner``.

    Examples
    --------
    >>> make_task_runner("default") is None
    True
    >>> type(make_task_runner("dask", dask_workers=2)).__name__
    'DaskTaskRunner'
    """
    if kind not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {kind!r}")
    if kind == "default":
        if dask_address:
            raise ValueError("--dask-address needs --runner dask")
        return None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:  # pragma: no cover - prefect-dask is a dependency
        raise RuntimeError("--runner dask needs the prefect-dask package (pip install prefect-dask)") from exc
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    import logging
    import os

    # a LocalCluster logs every worker start and stop at INFO (and a harmless traceback when it
    # closes its comms at the end); keep the run's output to what matters unless asked otherwise
    if logging.getLogger("distributed").getEffectiveLevel() < logging.WARNING:
        logging.getLogger("distributed").setLevel(logging.WARNING)
    workers = dask_workers or max(1, os.cpu_count() or 1)
    # one thread per worker process: the encoder is the work, and it scales with processes; the
    # dashboard on a free port so two runs (or a test beside a service) never fight over :8787
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0"})


def with_runner(flow: Any, kind: str = "default", *, dask_address: str | None = None, dask_workers: int | None = None) -> Any:
    """``flow`` itself for the default runner, else a copy of it on the chosen task runner."""
    runner = make_task_runner(kind, dask_address=dask_address, dask_workers=dask_workers)
    return flow if runner is None else flow.with_options(task_runner=runner)
