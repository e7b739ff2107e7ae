"""Running the service with uvicorn: in the foreground (``lateflow serve``) or in a background thread.

One process serves one index in memory; uvicorn workers would each hold a copy, so scale with
threads (the search thread pool) and with machines, not workers.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import uvicorn

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "info") -> None:
    """Send the service's own log lines (reloads, failures) to stderr, beside uvicorn's."""
    logger = logging.getLogger("lateflow.service")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Serve ``app`` until SIGINT/SIGTERM; requests in flight get up to 10 s to finish."""
    configure_logging(log_level)
    # the access log has the request line and status only: no headers, so never the token
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, server_header=False, timeout_graceful_shutdown=10)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on Ctrl-C, then re-raises it; a requested stop is a clean exit
        pass


class ServerThread:
    """Run an app with uvicorn in a background thread on a loopback port; a context manager.

    Parameters
    ----------
    app
        The ASGI app.
    host
        Address to bind (loopback by default).
    port
        Port; 0 picks a free one (see :attr:`url`).
    startup_timeout
        Seconds to wait for uvicorn to start (lifespan included).

    Examples
    --------
    ::

        with ServerThread(create_app("idx/scifact")) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, startup_timeout: float = 60.0) -> None:
        self.app, self.host, self.port = app, host, port
        self.startup_timeout = startup_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        # bind first, so the port is known (and ours) before uvicorn starts
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        # log_config=None: leave the host process's logging as it is
        config = uvicorn.Config(self.app, log_config=None, log_level="warning", server_header=False, timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="lateflow-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"uvicorn did not start on {self.url} within {self.startup_timeout:g} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
