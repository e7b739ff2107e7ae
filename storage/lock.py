"""The run lock of an index folder: one ``lateflow index`` run at a time per folder.

The lock is an ``fcntl.flock`` on ``INDEX/.lock``. The kernel releases it when the holding process
ends in any way, SIGKILL included, so a crashed run never leaves a lock behind that would block the
re-run that resumes it. The file also records who holds it (pid, host, start time), so a second run
fails at once with a message naming the holder. On NFS, Linux emulates ``flock`` with POSIX byte-range
locks, which work across clients on NFSv4 (and on NFSv3 with a lock manager).

Examples
--------
>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> with IndexLock(folder):
...     try:
...         IndexLock(folder).acquire()
...     except IndexLockedError as exc:
...         print(str(exc).split(" is locked")[0] == f"index folder {folder}")
True
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"


class IndexLockedError(RuntimeError):
    """Another run holds the index folder's lock."""


class IndexLock:
    """Exclusive, non-blocking lock of an index folder (a context manager).

    Parameters
    ----------
    index_dir
        The index folder; created if missing.
    """

    def __init__(self, index_dir: str | os.PathLike) -> None:
        self.index_dir = Path(index_dir)
        self.path = self.index_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "IndexLock":
        """Take the lock or raise :class:`IndexLockedError` naming the holder."""
        self.index_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            pid = holder.get("pid", "?")
            host = holder.get("host")
            since = holder.get("since", "an unknown time")
            where = f" on {host}" if host and host != socket.gethostname() else ""
            raise IndexLockedError(
                f"index folder {self.index_dir} is locked by pid {pid}{where} since {since} (another lateflow index run); "
                "wait for it to finish, or stop it and re-run (a killed run releases the lock and the re-run resumes it)"
            ) from None
        # we hold the lock: record who we are (read by a second run for its message)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Release the lock (the file stays: removing it could race with a run that just opened it)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "IndexLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode("utf-8")) if data else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}
