"""Request limits of the service: sizes, ranges, body bytes, and how many searches run at once.

Every limit answers with a 4xx JSON error (see :mod:`service.errors`) rather than letting a large
request tie up the 2-core machines this runs on. Field limits (query length, ``k``, batch size, ...)
are enforced by the request models (:mod:`service.models`); the body size by
:class:`BodySizeLimit` before any JSON is parsed; concurrency by :class:`SearchGate`.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ServiceError, send_error


def _default_concurrency() -> int:
    # one search per core: more at once only makes them contend for the cores and stretches every
    # latency (STACK.md: a 25 ms numpy call took 5 s under thread contention); the rest wait in line
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.

    Parameters
    ----------
    max_query_chars
        Longest query text, in characters (the encoder reads at most its first 128 tokens anyway).
    max_k
        Largest ``k`` (documents returned per query).
    max_candidates
        Largest ``candidates`` (ANN chunks reranked per query).
    max_batch
        Most queries in one ``POST /search/batch``.
    max_body_bytes
        Largest request body; larger ones get 413 before they are parsed.
    max_filter_fields
        Most fields in one metadata filter.
    max_filter_values
        Most values in one filter field's "any of" list.
    max_concurrent_searches
        Searches computed at once (default: one per CPU core); more requests wait their turn.
    queue_timeout_seconds
        How long a request waits for its turn before a 503 ``busy`` answer.
    """

    max_query_chars: int = 1000
    max_k: int = 100
    max_candidates: int = 2000
    max_batch: int = 32
    max_body_bytes: int = 256 * 1024
    max_filter_fields: int = 16
    max_filter_values: int = 100
    max_concurrent_searches: int = field(default_factory=_default_concurrency)
    queue_timeout_seconds: float = 30.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"limit {name} must be positive, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes``, by ``Content-Length`` or while streaming.

    A declared ``Content-Length`` over the limit is refused before a byte is read; a chunked body is
    counted as it arrives and refused once it passes the limit, so neither form can make the server
    buffer more than ``max_bytes``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = value
                break
        if declared is not None:
            if not declared.strip().isdigit():
                await send_error(scope, receive, send, 400, "bad_request", "Content-Length must be a non-negative integer")
                return
            if int(declared) > self.max_bytes:
                await send_error(scope, receive, send, 413, "body_too_large", self._message(int(declared)))
                return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises an HTTPException raised while it reads the body, so this
                    # reaches the JSON error handlers as a 413
                    raise HTTPException(413, self._message(received, streamed=True))
            return message

        await self.app(scope, counted_receive, send)

    def _message(self, size: int, streamed: bool = False) -> str:
        told = "more than " if streamed else ""
        return f"request body of {told}{size} bytes exceeds the limit of {self.max_bytes} bytes"


class SearchGate:
    """At most ``slots`` searches at once; a request waits up to ``timeout`` seconds for a slot.

    Used from the thread pool that runs the (synchronous, CPU-bound) search endpoints, so a
    blocking semaphore is right here; the event loop, and with it ``/health``, never waits on it.
    """

    def __init__(self, slots: int, timeout: float) -> None:
        self._semaphore = threading.BoundedSemaphore(slots)
        self.slots, self.timeout = slots, timeout

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one search slot for the block; raise a 503 ``busy`` :class:`ServiceError` on timeout."""
        if not self._semaphore.acquire(timeout=self.timeout):
            raise ServiceError(
                503,
                "busy",
                f"all {self.slots} search slots stayed busy for {self.timeout:g} s; retry later",
                headers={"Retry-After": "1"},
            )
        try:
            yield
        finally:
            self._semaphore.release()
