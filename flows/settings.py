"""Process-wide settings that make Prefect quiet, offline and quick to start (see STACK.md)."""
from __future__ import annotations

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
