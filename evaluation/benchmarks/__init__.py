"""Benchmarks: speed and quality measured side by side in one run (never timed assertions in tests)."""
from __future__ import annotations

import argparse
from pathlib import Path


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
