"""Index versions: ``INDEX/versions/<version>/`` folders, the switch to a new one, and pruning.

Each build writes a new version folder; :func:`storage.manifest.write_pointer` makes it current in one
atomic rename once its manifest is written. The previous version is kept (a reader that resolved it
just before the switch can still load it); older ones, and folders that a killed build left without
a manifest, are removed by :func:`prune_versions` while the run lock is held.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from storage.manifest import FORMAT_VERSION, MANIFEST, POINTER_FORMAT_VERSION, VERSIONS_DIR, IndexFormatError, read_manifest

LEGACY_FILES = ("docs.parquet", "chunks.parquet", "tokens.parquet", "fde.parquet", "ann.faiss", "rejected.parquet", "idf.parquet")


def new_version_dir(index_dir: Path, build_key: str) -> Path:
    """A fresh, not yet existing version folder name: UTC time then the build key (sorts by time).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> new_version_dir(pathlib.Path(tempfile.mkdtemp()), "abcdef1234567890").name[-9:]
    '-abcdef12'
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = index_dir / VERSIONS_DIR / f"{stamp}-{build_key[:8]}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}.{n}")
    return candidate


def pointer(index_dir: Path) -> dict[str, Any] | None:
    """The raw top-level manifest of ``index_dir`` (pointer or legacy), or None if unreadable."""
    try:
        value = json.loads((index_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def current_version(index_dir: Path) -> str | None:
    """Name of the current version folder, or None (no index yet, or a legacy unversioned one)."""
    top = pointer(index_dir)
    if top is None or top.get("format_version") != POINTER_FORMAT_VERSION:
        return None
    return Path(top["current"]).name


def complete_versions(index_dir: Path) -> dict[str, dict[str, Any]]:
    """Version name -> manifest of every version folder whose manifest and files check out."""
    out = {}
    root = index_dir / VERSIONS_DIR
    if not root.is_dir():
        return out
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or not (folder / MANIFEST).is_file():
            continue
        try:
            manifest = read_manifest(folder)
        except IndexFormatError:
            continue
        if manifest.get("format_version") == FORMAT_VERSION:
            out[folder.name] = manifest
    return out


def prune_versions(index_dir: Path, keep: list[str]) -> list[str]:
    """Remove every version folder not named in ``keep``; return the removed names."""
    removed = []
    root = index_dir / VERSIONS_DIR
    if not root.is_dir():
        return removed
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def remove_incomplete_versions(index_dir: Path) -> list[str]:
    """Remove version folders that have no manifest (a killed or failed assembly); only call while holding the run lock."""
    root = index_dir / VERSIONS_DIR
    if not root.is_dir():
        return []
    incomplete = [folder for folder in sorted(root.iterdir()) if folder.is_dir() and not (folder / MANIFEST).exists()]
    for folder in incomplete:
        shutil.rmtree(folder, ignore_errors=True)
    return [folder.name for folder in incomplete]


def remove_legacy_artifacts(index_dir: Path) -> None:
    """Delete artifacts that a build from before versions left beside ``INDEX/manifest.json``."""
    for name in LEGACY_FILES:
        (index_dir / name).unlink(missing_ok=True)


def remove_temporaries(folder: Path) -> None:
    """Delete ``.*.tmp`` files that a killed writer left (only call while holding the run lock)."""
    if folder.is_dir():
        for path in folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)
