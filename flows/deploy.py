"""``lateflow deploy``: serve the index flow as a scheduled Prefect deployment.

``flow.serve`` registers a deployment of the index flow with a cron schedule on the Prefect server
named by ``PREFECT_API_URL`` and then runs its scheduled (and manually triggered) runs in this
process until it is stopped, as Prefect intends: keep it running under systemd, tmux or a container.
Cron schedules need a real server (``prefect server start``); Prefect's ephemeral in-process server
cannot schedule runs, so we refuse to start without ``PREFECT_API_URL``.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from flows.index import IndexConfig, index_flow
from flows.runners import with_runner
from storage import fs

DEFAULT_DEPLOYMENT = "scheduled"


def deployment_parameters(corpus: str, index_dir: str, config: IndexConfig, cache: str | None = None, keep_versions: int = 2) -> dict[str, Any]:
    """The index flow's parameters as stored in the deployment (JSON; local paths made absolute).

    Examples
    --------
    >>> p = deployment_parameters("file:///data/corpus.jsonl", "/srv/idx", IndexConfig())
    >>> p["corpus"], p["index_dir"], p["config"]["chunk"]["window"]
    ('/data/corpus.jsonl', '/srv/idx', 256)
    """
    def absolute(path: str) -> str:
        return str(fs.local_path(path).resolve()) if fs.is_local(path) else path

    return {
        "corpus": absolute(corpus),
        "index_dir": absolute(index_dir),
        "config": asdict(config),
        "cache": absolute(cache) if cache else None,
        "keep_versions": keep_versions,
    }


def serve_index(
    corpus: str,
    index_dir: str,
    config: IndexConfig,
    *,
    cron: str,
    name: str = DEFAULT_DEPLOYMENT,
    runner: str = "default",
    dask_address: str | None = None,
    cache: str | None = None,
    keep_versions: int = 2,
) -> None:
    """Register deployment ``index/<name>`` with schedule ``cron`` and serve its runs (blocks until stopped).

    One run at a time (``limit=1``): a run that outlasts the schedule's interval delays the next one
    instead of colliding with it on the index lock.
    """
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise RuntimeError(
            "PREFECT_API_URL is not set: cron schedules need a Prefect server. Start one with "
            "`prefect server start --host 127.0.0.1 --analytics-off`, then "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` and run `lateflow deploy` again"
        )
    flow = with_runner(index_flow, runner, dask_address=dask_address)
    flow.serve(
        name=name,
        cron=cron,
        parameters=deployment_parameters(corpus, index_dir, config, cache, keep_versions),
        description=f"Incremental lateflow index of {corpus} into {index_dir} ({runner} task runner)",
        tags=["lateflow"],
        limit=1,
    )
