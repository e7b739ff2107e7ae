"""Benchmarks: speed and quality measured side by side in one run (never timed assertions in tests)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable


def tuning_parser(doc: str) -> argparse.ArgumentParser:
    """The options every tuning sweep shares: dataset, index, split (train by default), subset, output."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("dataset", help="BEIR-layout dataset folder")
    parser.add_argument("--index", required=True, help="index folder of the dataset's corpus (lateflow index)")
    parser.add_argument("--split", default="train", help="qrels split (default train: tune there, never on test)")
    parser.add_argument("--max-queries", type=int, default=None, help="a fixed subset of the split's queries (hash of their ids)")
    parser.add_argument("--out", type=Path, default=None, help="write the table (.md) and the raw numbers (.json) here")
    return parser


def print_and_save(text: str, report: dict, out: Path | None) -> None:
    """Print a benchmark's Markdown table; with ``out``, also write it (.md) and the raw numbers (.json)."""
    from storage.atomic import atomic_path, write_json

    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
        write_json(report, out.with_suffix(".json"))


def run_in_fresh_process(module: str, args: list[str]) -> dict[str, Any]:
    """Run ``python -m module *args`` offline and return the JSON object its last stdout line prints.

    For measurements that must start from a clean process (a peak resident memory, say); a failing
    child raises with the end of its stderr.
    """
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"python -m {module} {' '.join(args)} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fresh_process_report(
    module: str,
    children: Iterable[tuple[str, str]],
    report_lines: Callable[[list[dict[str, Any]], str], list[str]],
    out: Path | None,
    progress: Callable[[dict[str, Any]], str],
) -> list[dict[str, Any]]:
    """Measure each ``(a, b)`` by ``python -m module x --child a b`` in its own process, then report them.

    The module's ``main`` answers ``--child`` with one JSON row; the rows, the machine and the
    Markdown of ``report_lines(rows, machine line)`` go to :func:`print_and_save`.
    """
    from evaluation.machine import describe_machine, machine_line

    rows = []
    for a, b in children:
        rows.append(run_in_fresh_process(module, ["x", "--child", a, b]))
        print(f"  {a} ({b}): {progress(rows[-1])}", flush=True)
    machine = describe_machine()
    print_and_save("\n".join(report_lines(rows, machine_line(machine))), {"machine": machine, "rows": rows}, out)
    return rows
