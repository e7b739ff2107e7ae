"""Optional bearer-token auth for the service.

The token comes from ``LATEFLOW_API_TOKEN`` or a file (``--token-file``), never from a command-line
value (which ``ps`` would show to every user of the machine). When a token is set, every path but
``/health`` needs ``Authorization: Bearer <token>``; the docs too, since they describe the API. The
token is compared in constant time and is never logged, echoed or put in an error message.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import send_error

TOKEN_ENV = "LATEFLOW_API_TOKEN"
OPEN_PATHS = frozenset({"/health"})


def resolve_token(token_file: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The API token: the file's content if ``token_file`` is given, else ``$LATEFLOW_API_TOKEN``, else None.

    Surrounding whitespace (a trailing newline) is dropped. An empty variable means no auth; an
    empty or unreadable file is an error, since asking for a token file and getting no auth would
    silently expose the service.

    Examples
    --------
    >>> resolve_token(environ={"LATEFLOW_API_TOKEN": " s3cret\\n"})
    's3cret'
    >>> resolve_token(environ={}) is None
    True
    """
    if token_file is not None:
        path = Path(token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the token file ({exc.__class__.__name__})") from exc
        if not token:
            raise ValueError(f"{path}: the token file is empty")
        return token
    environ = os.environ if environ is None else environ
    return environ.get(TOKEN_ENV, "").strip() or None


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None.

    Examples
    --------
    >>> bearer_token([(b"authorization", b"bearer abc")])
    b'abc'
    >>> bearer_token([(b"authorization", b"Basic abc")]) is None
    True
    """
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


class BearerAuth:
    """ASGI middleware: 401 JSON error for requests without the right bearer token.

    Parameters
    ----------
    app
        The wrapped application.
    token
        The expected token.
    open_paths
        Paths answered without a token (liveness probes carry no secrets).
    """

    def __init__(self, app: ASGIApp, token: str, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        if not token:
            raise ValueError("BearerAuth needs a non-empty token")
        self.app = app
        self._expected = token.encode("utf-8")
        self.open_paths = open_paths

    def __repr__(self) -> str:  # never show the token, even in a debugger or a log of the app stack
        return f"BearerAuth(open_paths={sorted(self.open_paths)})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = bearer_token(scope["headers"])
        # compare_digest: the time taken does not reveal how many leading bytes were right
        if given is None or not hmac.compare_digest(given, self._expected):
            message = "missing bearer token" if given is None else "invalid bearer token"
            await send_error(
                scope, receive, send, 401, "unauthorized", f"{message}: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="lateflow"'},
            )
            return
        await self.app(scope, receive, send)
