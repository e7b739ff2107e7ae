"""The swappable current index: load a new version beside the old one, then swap one reference.

A request reads :attr:`IndexHolder.current` once, at its start, and uses that snapshot to the end,
so requests in flight finish on the version they started on while new ones get the new version;
the old :class:`~lateflow.engine.LateIndex` is freed when its last request lets go of it.

A new version is picked up by :meth:`IndexHolder.reload` (the ``POST /reload`` endpoint) or by the
watcher thread, which polls ``manifest.json``'s ``index_id`` every ``watch_seconds``. The manifest is
written last and atomically by the index flow, so a changed id means a complete new version. The
served path may be a folder rebuilt in place or a symlink re-pointed (``ln -sfn v2 current``) to a
new folder. A reload that fails (say, :class:`storage.manifest.IndexFormatError`) leaves the old
version serving; the failure is logged and reported by ``/reload`` and ``/ready``. Old and new
versions are in memory together during a swap.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from storage.manifest import MANIFEST, IndexFormatError

logger = logging.getLogger("lateflow.service")

WARM_UP_QUERY = "warm up the encoder"


class IndexChangedWhileLoading(IndexFormatError):
    """The manifest changed while the artifacts were read: the loaded data may mix two versions."""


@dataclass(frozen=True)
class LoadedIndex:
    """One index version as served: the loaded index and facts about its loading."""

    index: Any  # lateflow.engine.LateIndex (imported lazily: torch is heavy)
    index_id: str
    path: str
    loaded_at: str
    load_seconds: float


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: ``swapped``, ``unchanged`` (same index id) or ``failed`` (old one kept)."""

    status: str
    trigger: str
    index_id: str | None
    previous_index_id: str | None
    load_seconds: float
    error: str | None = None
    at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def manifest_index_id(path: str | os.PathLike) -> str | None:
    """The ``index_id`` in ``path/manifest.json``, or None if it cannot be read (cheap: no artifact is touched)."""
    try:
        value = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8")).get("index_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def disk_signature(path: str | os.PathLike) -> tuple | None:
    """What the version on disk looks like: manifest id plus size and mtime of every file it lists.

    A reload that failed is retried by the watcher only when this changes, so a broken version is
    not reloaded every poll, yet one whose files were still being copied is retried once they land.
    """
    root = Path(path)
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        names = [MANIFEST, *sorted(manifest.get("files", {}))]
    except (OSError, ValueError, AttributeError):
        return None
    facts = []
    for name in names:
        try:
            stat = (root / name).stat()
            facts.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
        except OSError:
            facts.append((name, None, None, None))
    return (manifest.get("index_id"), tuple(facts))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def open_late_index(path: str | os.PathLike, *, device: str | None = None, verify: bool = False) -> Any:
    """Open an index and warm it up (encoder loaded, one search run) so its first request is fast."""
    from lateflow.engine import LateIndex

    index = LateIndex.open(path, device=device, verify=verify)
    index.search(WARM_UP_QUERY, k=1)
    return index


class IndexHolder:
    """Holds the current :class:`LoadedIndex` of one index path and swaps it atomically.

    Parameters
    ----------
    path
        The index folder (or a symlink to one) to serve.
    device
        Encoder device (None: cuda when present, else cpu).
    verify
        Check every artifact's sha256 when loading (reads every byte; slower, safer).
    watch_seconds
        Poll the manifest this often for a new version; None or 0 disables the watcher.
    opener
        ``opener(path) -> LateIndex``; the default opens and warms up (see :func:`open_late_index`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str | None = None,
        verify: bool = False,
        watch_seconds: float | None = 5.0,
        opener: Callable[[str], Any] | None = None,
    ) -> None:
        self.path = str(path)
        self.watch_seconds = watch_seconds if watch_seconds else None
        self._opener = opener or (lambda p: open_late_index(p, device=device, verify=verify))
        self._current: LoadedIndex | None = None
        self._swap_lock = threading.Lock()  # guards the reference (and last_* facts) as one unit
        self._reload_lock = threading.Lock()  # one load at a time: two versions in memory, not three
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed_signature: tuple | None = None  # a broken version is not retried every poll
        self.last_reload: ReloadResult | None = None
        self.last_error: str | None = None

    # -- reading -------------------------------------------------------------------------------
    @property
    def current(self) -> LoadedIndex | None:
        """The version to use for one request (read it once per request)."""
        return self._current

    # -- loading -------------------------------------------------------------------------------
    def load(self) -> LoadedIndex:
        """Load the index now (first load); raise the loader's error if it fails. Used to fail fast."""
        self.reload(trigger="startup", raise_errors=True)
        current = self._current
        if current is None:  # unreachable: a failed first load raised above
            raise RuntimeError(f"{self.path}: no index loaded")
        return current

    def reload(self, trigger: str = "manual", *, raise_errors: bool = False) -> ReloadResult:
        """Load the version on disk beside the current one and swap it in if its id differs.

        Parameters
        ----------
        trigger
            Who asked: ``manual`` (the endpoint), ``watch``, ``startup``; reported and logged.
        raise_errors
            Re-raise a loading error instead of returning a ``failed`` result.
        """
        with self._reload_lock:
            previous = self._current
            previous_id = previous.index_id if previous else None
            started = time.perf_counter()
            if previous is not None and manifest_index_id(self.path) == previous_id:
                self._back_to_serving_version()
                return self._finish(ReloadResult("unchanged", trigger, previous_id, previous_id, 0.0, at=_now()))
            try:
                index = self._load_consistent()
            except Exception as exc:  # a reload must never take the service down, whatever the loader raised
                seconds = time.perf_counter() - started
                # a version caught mid-write is worth another try; a broken one is not, until it changes
                self._failed_signature = None if isinstance(exc, IndexChangedWhileLoading) else disk_signature(self.path)
                message = f"{type(exc).__name__}: {exc}"
                serving = f"still serving {previous_id}" if previous_id else "no index loaded"
                logger.error(
                    "index load (%s) of %s failed after %.1f s, %s: %s", trigger, self.path, seconds, serving, message,
                    # a traceback only for the unexpected: a broken or missing index is explained by its message
                    exc_info=not isinstance(exc, (IndexFormatError, OSError, ValueError)),
                )
                with self._swap_lock:
                    self.last_error = message
                result = self._finish(ReloadResult("failed", trigger, previous_id, previous_id, round(seconds, 3), message, _now()))
                if raise_errors:
                    raise
                return result
            seconds = time.perf_counter() - started
            if previous is not None and index.index_id == previous_id:
                self._back_to_serving_version()
                return self._finish(ReloadResult("unchanged", trigger, previous_id, previous_id, round(seconds, 3), at=_now()))
            loaded = LoadedIndex(index, index.index_id, self.path, _now(), round(seconds, 3))
            with self._swap_lock:
                self._current = loaded
                self._failed_signature = None
                self.last_error = None
            logger.info("index %s swapped in (%s, was %s) from %s, loaded in %.2f s", loaded.index_id, trigger, previous_id, self.path, seconds)
            return self._finish(ReloadResult("swapped", trigger, loaded.index_id, previous_id, loaded.load_seconds, at=loaded.loaded_at))

    def _back_to_serving_version(self) -> None:
        """The folder names the version being served again: an earlier failure is no longer current.

        Without this, ``/ready`` kept reporting the error of a version that had gone away, and
        monitoring kept alerting.
        """
        with self._swap_lock:
            self.last_error = None
            self._failed_signature = None

    def _load_consistent(self, attempts: int = 3) -> Any:
        """Open the index; if the manifest changed meanwhile (a new version landed), open it again."""
        for _ in range(attempts):
            index = self._opener(self.path)
            on_disk = manifest_index_id(self.path)
            if on_disk == index.index_id:
                return index
        # still moving after several tries: what we read may mix versions of a folder rebuilt in place
        raise IndexChangedWhileLoading(f"{Path(self.path) / MANIFEST}: the index kept changing while loading ({index.index_id} -> {on_disk}); retry")

    def _finish(self, result: ReloadResult) -> ReloadResult:
        with self._swap_lock:
            self.last_reload = result
        return result

    # -- background ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background thread: the first load if none happened yet, then the manifest watcher."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lateflow-index-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background thread (a load in progress finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        if self._current is None:
            self.reload(trigger="startup")
        if self.watch_seconds is None:
            return
        while not self._stop.wait(self.watch_seconds):
            on_disk = manifest_index_id(self.path)
            current = self._current
            if on_disk is None:
                continue  # unreadable right now (mid-replacement)
            if current is not None and on_disk == current.index_id:
                if self.last_error is not None:
                    self._back_to_serving_version()
                continue  # nothing new
            if self._failed_signature is not None and disk_signature(self.path) == self._failed_signature:
                continue  # this exact state failed to load already: wait until it changes
            self.reload(trigger="watch")

    def status(self) -> dict[str, Any]:
        """Facts for ``/ready`` and logs."""
        with self._swap_lock:
            current, last, error = self._current, self.last_reload, self.last_error
        return {
            "index_id": current.index_id if current else None,
            "index_path": self.path,
            "loaded_at": current.loaded_at if current else None,
            "watch_seconds": self.watch_seconds,
            "last_reload": last.to_dict() if last else None,
            "last_error": error,
        }
