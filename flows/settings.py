"""Process-wide settings that make Prefect quiet, offline and quick to start (see STACK.md)."""
from __future__ import annotations

import logging
import os

QUIET_PREFECT_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
    # the default 20 s ran out once under load on a 2-core machine
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # the heartbeat thread costs ~1 s per flow call and is not needed for local runs
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_quiet_defaults() -> None:
    """Set the variables above unless the user already set them (their choice wins)."""
    for key, value in QUIET_PREFECT_ENV.items():
        if value == "":
            continue
        os.environ.setdefault(key, value)


# what identifies the temporary API server Prefect starts for a process that runs flows without
# PREFECT_API_URL (prefect.server.api.server.SubprocessASGIServer)
_EPHEMERAL_SERVER_APP = "prefect.server.api.server:create_app"


def reap_orphaned_ephemeral_servers(prefect_home: str | None = None) -> list[int]:
    """Stop the temporary Prefect API servers that killed runs left behind; return their pids.

    Prefect stops that server when the process that started it exits, but a process killed with
    SIGKILL (``kill -9``, the OOM killer) cannot, and its server then runs on, ~220 MB, serving no one:
    only the dead process knew its port. A process is stopped (SIGTERM) only if all of these hold:
    it is this user's, its parent is init (the dead parent's orphans are re-parented there), its
    command line runs ``prefect.server.api.server:create_app``, its environment marks it as an
    ephemeral server, and it uses the same ``PREFECT_HOME`` (``prefect_home``, default this
    process's). Linux only (``/proc``); elsewhere it does nothing.
    """
    import signal

    proc = "/proc"
    if not os.path.isdir(proc):
        return []
    home = prefect_home if prefect_home is not None else os.environ.get("PREFECT_HOME")
    reaped = []
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            if os.stat(f"{proc}/{pid}").st_uid != os.getuid():
                continue
            with open(f"{proc}/{pid}/stat", "rb") as handle:
                parent = int(handle.read().rsplit(b")", 1)[1].split()[1])
            with open(f"{proc}/{pid}/cmdline", "rb") as handle:
                command = handle.read().split(b"\0")
            with open(f"{proc}/{pid}/environ", "rb") as handle:
                environ = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
        their_home = environ.get(b"PREFECT_HOME")
        if (
            parent == 1
            and _EPHEMERAL_SERVER_APP.encode() in command
            and environ.get(b"PREFECT__SERVER_EPHEMERAL") == b"1"
            and (their_home.decode(errors="replace") if their_home is not None else None) == home
        ):
            try:
                os.kill(pid, signal.SIGTERM)
                reaped.append(pid)
            except OSError:
                pass
    return reaped


class InputErrorsWithoutTraceback(logging.Filter):
    """Drop the traceback from Prefect's run-failure records when the cause is bad input.

    A task or flow that fails logs the exception with its traceback (~70 lines for a malformed
    corpus line, twice: task and flow); the CLI then prints the error's one line. For errors whose
    message already names the file, line or field (bad corpus or dataset, a damaged or locked
    index) the traceback says nothing more, so only the record's message is kept. Any other
    exception, a bug, keeps its traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from evaluation.datasets import DatasetError
        from storage.corpus import CorpusError
        from storage.lock import IndexLockedError
        from storage.manifest import IndexFormatError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (CorpusError, DatasetError, IndexFormatError, IndexLockedError)):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_input_error_tracebacks() -> None:
    """Install :class:`InputErrorsWithoutTraceback` on Prefect's flow- and task-run loggers (once)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, InputErrorsWithoutTraceback) for f in logger.filters):
            logger.addFilter(InputErrorsWithoutTraceback())
