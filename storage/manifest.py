"""``manifest.json``: what an index folder holds and how it was made.

The manifest is written last, atomically, after every artifact it lists; it records each file's
size and sha256, so opening an index can tell a missing, truncated or foreign file at once.
"""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from storage.atomic import write_json
from storage.hashing import sha256_file, sha256_text

FORMAT = "lateflow-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class IndexFormatError(RuntimeError):
    """An index folder that cannot be opened; the message names the file and what is wrong with it."""


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes the artifacts."""
    versions = {"python": platform.python_version()}
    for name in ("lateflow", "torch", "transformers", "faiss-cpu", "faiss-gpu", "pyarrow", "numpy", "prefect", "ranx"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def describe_file(path: Path) -> dict[str, Any]:
    """Size and sha256 of an artifact, as recorded in the manifest."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(index_dir: Path, body: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """Describe ``files`` (relative to ``index_dir``), add format fields, and write the manifest atomically."""
    described = {name: describe_file(index_dir / name) for name in files}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **body, "files": described}
    # the id changes whenever any artifact does; services report it to tell index versions apart
    manifest["index_id"] = sha256_text(json.dumps(sorted((k, v["sha256"]) for k, v in described.items())))[:16]
    write_json(manifest, index_dir / MANIFEST)
    return manifest


def read_manifest(index_dir: str | os.PathLike, *, verify_hashes: bool = False) -> dict[str, Any]:
    """Read and check a manifest and the files it lists; raise :class:`IndexFormatError` naming the culprit."""
    index_dir = Path(index_dir)
    path = index_dir / MANIFEST
    if not index_dir.is_dir():
        raise IndexFormatError(f"{index_dir}: no such index folder (build one with `lateflow index`)")
    if not path.is_file():
        raise IndexFormatError(f"{path}: missing; {index_dir} is not a complete lateflow index (was the build interrupted?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{path}: not a lateflow index manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: index format version {version} is not supported by this lateflow (expects {FORMAT_VERSION}); rebuild the index"
        )
    for name, facts in manifest.get("files", {}).items():
        file = index_dir / name
        if not file.is_file():
            raise IndexFormatError(f"{file}: missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != facts["bytes"]:
            raise IndexFormatError(f"{file}: {size} bytes, the manifest says {facts['bytes']} (truncated or replaced)")
        if verify_hashes and sha256_file(file) != facts["sha256"]:
            raise IndexFormatError(f"{file}: content hash differs from the manifest (corrupted or replaced)")
    return manifest
