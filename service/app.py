"""The FastAPI application: search, batch search, health, readiness, reload; docs at ``/docs``.

Searches are CPU-bound and run in FastAPI's thread pool (synchronous endpoints), at most
``limits.max_concurrent_searches`` at a time, so the event loop stays free and ``/health`` answers
while the cores are busy. Each request takes one snapshot of the current index version at its
start (see :mod:`service.holder`) and answers from it to the end, even if a reload swaps in a new
version meanwhile; the response names the ``index_id`` that answered.
"""
# no `from __future__ import annotations` here: FastAPI must see the request models, which are
# made per app inside create_app, as real objects in the endpoint signatures, not as strings
import os
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import anyio
from fastapi import FastAPI

from service.auth import BearerAuth
from service.errors import ServiceError, install_error_handlers
from service.holder import IndexHolder, LoadedIndex
from service.limits import BodySizeLimit, Limits, SearchGate
from service.models import BatchResponse, ErrorResponse, ReadyResponse, ReloadResponse, SearchResponse, request_models

ERRORS = {status: {"model": ErrorResponse} for status in (401, 413, 422, 503)}


def _ready_or_503(holder: IndexHolder) -> LoadedIndex:
    """The current index version, or a 503 ``not_ready`` error saying why there is none."""
    loaded = holder.current
    if loaded is None:
        reason = f"the index failed to load: {holder.last_error}" if holder.last_error else "the index is still loading"
        raise ServiceError(503, "not_ready", reason, headers={"Retry-After": "2"})
    return loaded


def _ranked_hits(index: Any, ranked: list[tuple[int, float, int]]) -> list[dict[str, Any]]:
    return [index.hit(d, s, c, r).to_dict() for r, (d, s, c) in enumerate(ranked, start=1)]


def create_app(
    index_path: str | os.PathLike,
    *,
    token: str | None = None,
    limits: Limits | None = None,
    watch_seconds: float | None = 5.0,
    device: str | None = None,
    verify: bool = False,
    preload: bool = False,
) -> FastAPI:
    """Build the service for one index path.

    Parameters
    ----------
    index_path
        Index folder, or a symlink to one (re-point it and reload to swap versions).
    token
        Bearer token required on every endpoint but ``/health``; None for no auth. Pass it in
        (e.g. from :func:`service.auth.resolve_token`): the factory reads no environment.
    limits
        Request limits (:class:`service.limits.Limits`; default values when None).
    watch_seconds
        Poll the manifest for a new version this often; None or 0 for explicit ``POST /reload`` only.
    device
        Encoder device (None: cuda when present, else cpu).
    verify
        Check every artifact's sha256 on each load.
    preload
        Load the index now and raise if that fails (the CLI does, to fail fast); otherwise it loads
        in the background at startup and ``/ready`` answers 503 until it is in.

    Returns
    -------
    FastAPI
        The app; ``app.state.holder`` is its :class:`service.holder.IndexHolder`.
    """
    limits = limits or Limits()
    holder = IndexHolder(index_path, device=device, verify=verify, watch_seconds=watch_seconds)
    if preload:
        holder.load()
    gate = SearchGate(limits.max_concurrent_searches, limits.queue_timeout_seconds)
    SearchRequest, BatchRequest = request_models(limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        holder.start()
        yield
        await anyio.to_thread.run_sync(holder.stop)

    app = FastAPI(
        title="lateflow",
        summary="Multi-vector retrieval: MUVERA FDE + FAISS candidates, exact MaxSim rerank, optional ColBERT-PRF.",
        description=(
            "Errors are JSON: `{\"error\": {\"code\": ..., \"message\": ...}}`. With a token configured, every "
            "endpoint but `/health` needs `Authorization: Bearer <token>`. Limits in force: "
            + ", ".join(f"{k}={v}" for k, v in limits.to_dict().items())
        ),
        version="1",
        lifespan=lifespan,
    )
    app.state.holder = holder
    app.state.limits = limits
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    if token:
        app.add_middleware(BearerAuth, token=token)  # added last = outermost: 401 before anything else

    @app.get("/health", summary="Liveness: the process answers (no auth, no index needed)")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: an index is loaded; its manifest id", response_model=ReadyResponse, responses=ERRORS)
    async def ready() -> dict[str, Any]:
        loaded = _ready_or_503(holder)
        return {
            "status": "ready",
            **holder.status(),
            # the snapshot's own facts, in case a swap happened between the two reads
            "index_id": loaded.index_id,
            "loaded_at": loaded.loaded_at,
            "documents": len(loaded.index),
            "chunks": int(loaded.index.tokens.n_chunks),
        }

    @app.post("/search", summary="Top-k documents for one query", response_model=SearchResponse, responses=ERRORS)
    def search(request: SearchRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        loaded = _ready_or_503(holder)
        prf = _prf_or_422(request)
        with gate.slot():
            started = time.perf_counter()
            try:
                hits = loaded.index.search(request.query, k=request.k, candidates=request.candidates, prf=prf, filter=request.filter, scope=request.scope)
            except ValueError as exc:  # e.g. a query with no token the model can read
                raise ServiceError(422, "invalid_query", str(exc)) from exc
            took = time.perf_counter() - started
        return {"index_id": loaded.index_id, "took_ms": round(took * 1000, 3), "results": [h.to_dict() for h in hits]}

    @app.post("/search/batch", summary="Many queries in one request, on one index version", response_model=BatchResponse, responses=ERRORS)
    def search_batch(request: BatchRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        loaded = _ready_or_503(holder)
        prfs = [_prf_or_422(q, where=f"queries[{i}].") for i, q in enumerate(request.queries)]
        index = loaded.index
        with gate.slot():
            started = time.perf_counter()
            encoded = _encode_batch(index, [q.query for q in request.queries])
            results = [
                _ranked_hits(index, index.rank(tokens, q.k, candidates=max(q.candidates, q.k), prf=prf, filter=q.filter, scope=q.scope))
                for q, tokens, prf in zip(request.queries, encoded, prfs)
            ]
            took = time.perf_counter() - started
        return {"index_id": loaded.index_id, "took_ms": round(took * 1000, 3), "results": results}

    @app.post(
        "/reload",
        summary="Load the index version now on disk and swap it in (in-flight requests finish on the old one)",
        response_model=ReloadResponse,
        responses={**ERRORS, 500: {"model": ErrorResponse}},
    )
    def reload() -> dict[str, Any]:
        result = holder.reload(trigger="manual")
        if result.status == "failed":
            raise ServiceError(
                500, "reload_failed", f"the new index version could not be loaded; still serving the old one: {result.error}",
                extra={"serving_index_id": result.index_id, "load_seconds": result.load_seconds},
            )
        return {k: v for k, v in result.to_dict().items() if k in ReloadResponse.model_fields}

    return app


def _prf_or_422(request: Any, where: str = "") -> Any:
    """The request's PRFConfig; inconsistent settings (k <= fb_embs) are a 422 naming the field."""
    try:
        return request.prf_config()
    except ValueError as exc:
        raise ServiceError(422, "invalid_request", f"{where}prf: {exc}") from exc


def _encode_batch(index: Any, queries: list[str]) -> list[Any]:
    """Encode the queries one by one; a query the model cannot read is a 422 naming its position."""
    from tasks.encode import UNREADABLE_QUERY

    encoded = index.encode_many(queries)
    for i, tokens in enumerate(encoded):
        if len(tokens.vectors) == 0:
            raise ServiceError(422, "invalid_query", f"queries[{i}]: {UNREADABLE_QUERY}")
    return encoded
