"""Benchmarks: speed and quality measured side by side in one run (never timed assertions in tests)."""
from __future__ import annotations

from pathlib import Path


def print_and_save(text: str, report: dict, out: Path | None) -> None:
    """Print a benchmark's Markdown table; with ``out``, also write it (.md) and the raw numbers (.json)."""
    from storage.atomic import atomic_path, write_json

    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
        write_json(report, out.with_suffix(".json"))
