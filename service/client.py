"""A small HTTP client for a running service (used by ``lateflow search --server URL``)."""
from __future__ import annotations

import os
from typing import Any, Mapping

import httpx

from service.auth import TOKEN_ENV


def search_remote(
    server: str,
    query: str,
    *,
    k: int = 10,
    candidates: int | None = None,
    scope: str | None = None,
    prf: Mapping[str, Any] | bool = False,
    filter: Mapping[str, Any] | None = None,
    token: str | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """``POST {server}/search`` and return the response (``index_id``, ``took_ms``, ``results``).

    Parameters
    ----------
    server
        Base URL, e.g. ``http://127.0.0.1:8000``.
    query, k, candidates, scope, prf, filter
        As in :meth:`lateflow.engine.LateIndex.search` (``prf``: True or a dict of PRF settings).
    token
        Bearer token; None reads ``$LATEFLOW_API_TOKEN`` (unset or empty: no header).
    timeout
        Seconds for the whole request.

    Raises
    ------
    RuntimeError
        The server cannot be reached, or it answered with an error (its code and message are quoted).
    """
    token = token if token is not None else (os.environ.get(TOKEN_ENV, "").strip() or None)
    body: dict[str, Any] = {"query": query, "k": k, "prf": prf if isinstance(prf, bool) else dict(prf)}
    if candidates is not None:
        body["candidates"] = candidates
    if scope is not None:
        body["scope"] = scope
    if filter:
        body["filter"] = dict(filter)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = server.rstrip("/") + "/search"
    try:
        response = httpx.post(url, json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot reach {url}: {exc.__class__.__name__}: {exc}") from exc
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if response.status_code != 200 or not isinstance(payload, dict):
        error = payload.get("error", {}) if isinstance(payload, dict) else {}
        reason = f"{error.get('code')}: {error.get('message')}" if error else response.text[:200]
        raise RuntimeError(f"{url} answered {response.status_code} ({reason})")
    return payload
