"""``manifest.json``: what an index folder holds and how it was made.

The manifest is written last, atomically, after every artifact it lists; it records each file's
size and sha256, so opening an index can tell a missing, truncated or foreign file at once.

Versioned layout. ``lateflow index`` writes each build into ``INDEX/versions/<version>/`` (a complete
index folder with its own manifest) and then atomically replaces ``INDEX/manifest.json`` with a
*pointer manifest*: a copy of that version's manifest with ``format_version`` 2, ``"current":
"versions/<version>"``, and its ``files`` named relative to ``INDEX``. Readers therefore see the old
version or the complete new one, never a half-written one; a reader that only wants ``index_id``
(a watcher) reads ``INDEX/manifest.json`` as before. :func:`resolve_index_dir` is the one place that
turns an index folder into the folder holding the artifacts; :func:`read_manifest` and
``LateIndex.open`` use it, and a folder written before versions existed (artifacts beside a format 1
``manifest.json``) still opens.
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
FORMAT_VERSION = 3  # 3: token embeddings as float16 bytes per chunk (1: nested float16 lists, still read)
READABLE_FORMAT_VERSIONS = (1, FORMAT_VERSION)
POINTER_FORMAT_VERSION = 2  # INDEX/manifest.json naming the current version folder
MANIFEST = "manifest.json"
VERSIONS_DIR = "versions"


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


# sections of a version manifest, and the keys in them, that LateIndex and the service read
REQUIRED_SECTIONS = {"model": ("path", "dim"), "encoding": ("precision",), "fde": ("dim",), "ann": ("kind",), "files": ()}


def _load(path: Path, index_dir: Path) -> dict[str, Any]:
    """Parse a manifest file and check its format fields (not its files)."""
    if index_dir.is_file():
        raise IndexFormatError(f"{index_dir}: a file, not an index folder (give the folder `lateflow index --index` wrote)")
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
    if version not in (*READABLE_FORMAT_VERSIONS, POINTER_FORMAT_VERSION):
        raise IndexFormatError(
            f"{path}: index format version {version} is not supported by this lateflow (expects {FORMAT_VERSION}); rebuild the index"
        )
    if version == POINTER_FORMAT_VERSION and not isinstance(manifest.get("current"), str):
        raise IndexFormatError(f"{path}: a version pointer without a 'current' version folder")
    return manifest


def resolve_index_dir(index_dir: str | os.PathLike) -> Path:
    """The folder that holds the artifacts of the index in ``index_dir``.

    For a versioned index (see the module docstring) that is ``INDEX/versions/<current version>``;
    for a plain index folder (a version folder itself, or one written before versions existed) it is
    ``index_dir`` itself. Raises :class:`IndexFormatError` when there is no readable manifest.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from storage.atomic import write_json
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "versions" / "v1").mkdir(parents=True)
    >>> _ = write_json({"format": FORMAT, "format_version": 2, "current": "versions/v1"}, root / MANIFEST)
    >>> resolve_index_dir(root) == root / "versions" / "v1"
    True
    """
    index_dir = Path(index_dir)
    manifest = _load(index_dir / MANIFEST, index_dir)
    if manifest["format_version"] != POINTER_FORMAT_VERSION:
        return index_dir
    current = Path(manifest["current"])
    if current.is_absolute() or ".." in current.parts:
        raise IndexFormatError(f"{index_dir / MANIFEST}: 'current' must be a folder inside the index, got {manifest['current']!r}")
    if not (index_dir / current).is_dir():
        raise IndexFormatError(f"{index_dir / current}: the current version named by {index_dir / MANIFEST} is missing")
    return index_dir / current


def read_manifest(index_dir: str | os.PathLike, *, verify_hashes: bool = False) -> dict[str, Any]:
    """Read and check the manifest of an index and the files it lists; raise :class:`IndexFormatError` naming the culprit.

    ``index_dir`` may be a versioned index folder (the current version's manifest is returned, see
    :func:`resolve_index_dir`) or a plain one.
    """
    index_dir = Path(index_dir)
    folder = resolve_index_dir(index_dir)
    path = folder / MANIFEST
    manifest = _load(path, folder)
    if manifest["format_version"] not in READABLE_FORMAT_VERSIONS:
        raise IndexFormatError(f"{path}: an index folder must hold a format {' or '.join(map(str, READABLE_FORMAT_VERSIONS))} manifest")
    # what opening an index reads: a hand-edited manifest without one of them raised a bare KeyError
    for section, keys in REQUIRED_SECTIONS.items():
        if not isinstance(manifest.get(section), dict):
            raise IndexFormatError(f"{path}: no '{section}' section (the manifest was edited or damaged; rebuild the index)")
        missing = [key for key in keys if key not in manifest[section]]
        if missing:
            raise IndexFormatError(f"{path}: '{section}' lacks {missing} (the manifest was edited or damaged; rebuild the index)")
    if not isinstance(manifest.get("index_id"), str):
        raise IndexFormatError(f"{path}: no 'index_id' (the manifest was edited or damaged; rebuild the index)")
    for name, facts in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise IndexFormatError(f"{file}: missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != facts["bytes"]:
            raise IndexFormatError(f"{file}: {size} bytes, the manifest says {facts['bytes']} (truncated or replaced)")
        if verify_hashes and sha256_file(file) != facts["sha256"]:
            raise IndexFormatError(f"{file}: content hash differs from the manifest (corrupted or replaced)")
    return manifest


def write_pointer(index_dir: Path, version_dir: Path, manifest: dict[str, Any], previous: list[str]) -> dict[str, Any]:
    """Make ``version_dir`` (a complete version inside ``index_dir``) current: atomically replace ``INDEX/manifest.json``.

    ``manifest`` is the version's own manifest; ``previous`` lists older versions still kept (most
    recent first). Returns the pointer manifest.
    """
    relative = version_dir.relative_to(index_dir).as_posix()
    pointer = {
        **manifest,
        "format_version": POINTER_FORMAT_VERSION,
        "current": relative,
        "previous_versions": previous,
        # relative to INDEX, so tools that stat the listed files (watchers) find them
        "files": {f"{relative}/{name}": facts for name, facts in manifest.get("files", {}).items()},
    }
    write_json(pointer, index_dir / MANIFEST)
    return pointer
