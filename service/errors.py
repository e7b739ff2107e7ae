"""One JSON error shape for every failure: ``{"error": {"code": ..., "message": ...}}``.

Clients branch on ``code`` (stable, snake_case) and show ``message`` (human, may change). Validation
errors also carry ``details`` (field path, message, pydantic type) but never the rejected input, so
that a long or sensitive query is not echoed back.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

logger = logging.getLogger("lateflow.service")

# pydantic error types that mean "a documented limit was exceeded", as opposed to a wrong shape
LIMIT_ERROR_TYPES = frozenset(
    {"string_too_long", "string_too_short", "too_long", "too_short", "greater_than", "greater_than_equal", "less_than", "less_than_equal"}
)

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


class ServiceError(Exception):
    """An error with an HTTP status, a stable code and a message; ``extra`` fields join the error object.

    Parameters
    ----------
    status
        HTTP status code.
    code
        Stable machine-readable code, e.g. ``"not_ready"``.
    message
        Human-readable explanation.
    extra
        More JSON fields for the error object (e.g. the index still being served).
    headers
        Response headers (e.g. ``Retry-After``).
    """

    def __init__(self, status: int, code: str, message: str, *, extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.extra = extra or {}
        self.headers = headers or {}


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON body of an error response.

    Examples
    --------
    >>> error_body("not_found", "no route GET /x")
    {'error': {'code': 'not_found', 'message': 'no route GET /x'}}
    """
    return {"error": {"code": code, "message": message, **extra}}


def error_response(status: int, code: str, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """A :class:`JSONResponse` carrying :func:`error_body`."""
    return JSONResponse(error_body(code, message, **extra), status_code=status, headers=headers)


async def send_error(scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer from a pure ASGI middleware (auth, body size) with the same JSON error shape."""
    await error_response(status, code, message, headers=headers)(scope, receive, send)


def _where(loc: Iterable[Any]) -> str:
    """``("body", "queries", 2, "k")`` -> ``"queries[2].k"``; the bare body is "request body"."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "request body"


def describe_validation(errors: list[dict[str, Any]]) -> tuple[int, str, str, list[dict[str, Any]]]:
    """Status, code, one-line message and input-free details for pydantic/FastAPI validation errors.

    Examples
    --------
    >>> describe_validation([{"type": "less_than_equal", "loc": ("body", "k"), "msg": "Input should be less than or equal to 100"}])[:3]
    (422, 'limit_exceeded', 'k: Input should be less than or equal to 100')
    >>> describe_validation([{"type": "json_invalid", "loc": ("body", 9), "msg": "JSON decode error", "ctx": {"error": "Expecting value"}}])[:3]
    (400, 'malformed_json', 'malformed JSON body: Expecting value at character 9')
    """
    for err in errors:
        if err.get("type") == "json_invalid":
            loc = list(err.get("loc", ()))
            position = f" at character {loc[1]}" if len(loc) > 1 else ""
            reason = (err.get("ctx") or {}).get("error", err.get("msg", "not valid JSON"))
            return 400, "malformed_json", f"malformed JSON body: {reason}{position}", []
    details = [{"loc": [p for p in err.get("loc", ()) if p != "body"], "msg": err.get("msg", ""), "type": err.get("type", "")} for err in errors]
    message = "; ".join(f"{_where(err.get('loc', ()))}: {err.get('msg', '')}" for err in errors[:5])
    if len(errors) > 5:
        message += f"; and {len(errors) - 5} more"
    limit = bool(errors) and all(err.get("type") in LIMIT_ERROR_TYPES for err in errors)
    return 422, "limit_exceeded" if limit else "invalid_request", message, details


def install_error_handlers(app: FastAPI) -> None:
    """Route every error FastAPI/Starlette can raise through the JSON error shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        content_type = request.headers.get("content-type", "")
        if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") == "model_attributes_type" for e in errors) and "json" not in content_type:
            # e.g. `curl -d` sends form encoding: the JSON body was never parsed, say so plainly
            got = f" (got {content_type!r})" if content_type else " (none was sent)"
            return error_response(415, "unsupported_media_type", f"send the body as JSON with 'Content-Type: application/json'{got}")
        status, code, message, details = describe_validation(errors)
        extra = {"details": details} if details else {}
        return error_response(status, code, message, **extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the log (Starlette re-raises to the server); the client gets no internals
        logger.error("unhandled error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return error_response(500, "internal_error", "internal server error; see the service log")
