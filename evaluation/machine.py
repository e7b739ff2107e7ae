"""A description of the machine a measurement ran on, for reports."""
from __future__ import annotations

import os
import platform


def describe_machine() -> dict[str, object]:
    """Cores, memory, CPU model, threads used by torch, and whether a GPU is visible."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def machine_line(info: dict[str, object] | None = None) -> str:
    """One line for a report header."""
    info = info or describe_machine()
    gpu = info["gpu"] or "no GPU"
    return f"{info['cores']} cores ({info['cpu']}), {info['memory_gib']} GiB RAM, {gpu}, torch threads {info['torch_threads']}, Python {info['python']}"
