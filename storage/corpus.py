"""Read a corpus (BEIR folder, ``corpus.jsonl`` or Parquet) into a validated Arrow table.

Policy for bad input, chosen so that no accepted document is ever lost silently:

* a malformed JSON line, bytes that are not UTF-8, a missing/empty ``_id``, a duplicate ``_id`` or a
  ``title``/``text`` that is not a string is an **error** naming the file and line (or Parquet row).
  With ``on_error="skip"`` such a record is instead left out and recorded in the rejected table with
  its reason, file and line;
* a document whose title and text are both empty (or whitespace) is always **rejected** (it has
  nothing to retrieve) and recorded in the rejected table, never silently dropped;
* an integer ``_id`` is accepted and turned into its string (BEIR ids are strings);
* fields other than ``_id``, ``title`` and ``text`` are kept as a JSON ``metadata`` object.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from storage import fs
from storage.hashing import sha256_file, sha256_text
from storage.schemas import DOCS, REJECTED

OnError = Literal["raise", "skip"]


class CorpusError(ValueError):
    """A corpus record that cannot be accepted; the message names the file and line or row."""


@dataclass
class Corpus:
    """Accepted documents (schema :data:`storage.schemas.DOCS`) and rejected records."""

    docs: pa.Table
    rejected: pa.Table
    source: str
    file_sha256: str = ""

    def __len__(self) -> int:
        return self.docs.num_rows


# formats that are easy to pass by mistake and would otherwise fail as "malformed JSON" on line 1
UNSUPPORTED_SUFFIXES = (".csv", ".tsv", ".gz", ".zip", ".bz2", ".xz", ".zst", ".xlsx")


def resolve_corpus_path(path: str | os.PathLike) -> Path:
    """Return the corpus file for a BEIR folder, a ``.jsonl`` file or a ``.parquet`` file."""
    path = Path(path)
    if path.is_dir():
        for name in ("corpus.jsonl", "corpus.parquet"):
            if (path / name).is_file():
                return path / name
        raise CorpusError(f"{path}: no corpus.jsonl or corpus.parquet in this folder (BEIR layout expected)")
    if not path.is_file():
        raise CorpusError(f"{path}: no such file or folder")
    return path


def full_text(title: str, text: str) -> str:
    """The text lateflow indexes for a document: the title, a newline, then the body.

    Examples
    --------
    >>> full_text("Title", "Body.")
    'Title\\nBody.'
    >>> full_text("", "Body.")
    'Body.'
    """
    title, text = title.strip(), text.strip()
    if title and text:
        return f"{title}\n{text}"
    return title or text


def utf8_codec(line_no: int) -> str:
    """The codec of a text file's line: ``utf-8-sig`` for line 1, which drops the byte-order mark
    Windows tools and spreadsheet exports put there (a BOM elsewhere is content, never stripped).

    Examples
    --------
    >>> b"\\xef\\xbb\\xbf{}".decode(utf8_codec(1)), b"{}".decode(utf8_codec(1)), utf8_codec(2)
    ('{}', '{}', 'utf-8')
    """
    return "utf-8-sig" if line_no == 1 else "utf-8"


def _records_jsonl(path: Path, name: str) -> Iterator[tuple[int, dict[str, Any] | CorpusError]]:
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode(utf8_codec(line_no))
            except UnicodeDecodeError as exc:
                yield line_no, CorpusError(
                    f"{name}:{line_no}: bytes are not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 4]!r})"
                )
                continue
            if not line.strip():
                continue  # blank lines carry no record
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_no, CorpusError(f"{name}:{line_no}: malformed JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(record, dict):
                yield line_no, CorpusError(f"{name}:{line_no}: expected a JSON object, got {type(record).__name__}")
                continue
            yield line_no, record


def _records_parquet(path: Path, name: str) -> Iterator[tuple[int, dict[str, Any] | CorpusError]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorpusError(f"{name}: not a readable Parquet file ({exc})") from exc
    for row_no, record in enumerate(table.to_pylist(), start=1):
        yield row_no, record


def _validate(record: dict[str, Any], where: str) -> tuple[str, str, str, dict[str, Any]]:
    doc_id = record.get("_id", record.get("doc_id"))
    if doc_id is None:
        raise CorpusError(f"{where}: missing field '_id'")
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise CorpusError(f"{where}: field '_id' must be a string, got {type(doc_id).__name__}")
    doc_id = str(doc_id)
    if not doc_id.strip():
        raise CorpusError(f"{where}: field '_id' is empty")
    fields = {}
    for name in ("title", "text"):
        value = record.get(name)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise CorpusError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
        fields[name] = value
    metadata = {k: v for k, v in record.items() if k not in ("_id", "doc_id", "title", "text")}
    return doc_id, fields["title"], fields["text"], metadata


def read_corpus(path: str | os.PathLike, *, on_error: OnError = "raise") -> Corpus:
    """Read and validate a corpus; see the module docstring for the bad-input policy.

    Parameters
    ----------
    path
        A BEIR folder (holding ``corpus.jsonl``), a ``.jsonl`` file or a ``.parquet`` file with
        columns ``_id`` (or ``doc_id``), ``title``, ``text`` and any metadata columns. A ``file://``
        URL, or any URL that :func:`storage.fs.resolve` opens (``s3://``, ``gs://``, fsspec schemes),
        works too: a remote file is copied to a local temporary file first.
    on_error
        ``"raise"`` (default) stops at the first bad record with a message naming file and line;
        ``"skip"`` records it in ``Corpus.rejected`` and goes on.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "corpus.jsonl"
    >>> _ = f.write_text('{"_id": "a", "title": "T", "text": "x", "year": 2020}\\n{"_id": "b", "text": " "}\\n')
    >>> corpus = read_corpus(f)
    >>> corpus.docs.column("doc_id").to_pylist(), corpus.rejected.column("reason").to_pylist()
    (['a'], ['empty document (no title or text)'])
    >>> corpus.docs.column("metadata").to_pylist()
    ['{"year": 2020}']
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if fs.is_local(path):
        file = resolve_corpus_path(fs.local_path(path))
        return _read_corpus_file(file, str(file), on_error)
    url = str(path).rstrip("/")
    if not url.endswith((".jsonl", ".parquet")):
        candidates = [fs.join(url, name) for name in ("corpus.jsonl", "corpus.parquet")]
        found = [c for c in candidates if fs.exists(c)]
        if not found:
            raise CorpusError(f"{url}: no corpus.jsonl or corpus.parquet there (BEIR layout expected)")
        url = found[0]
    elif not fs.exists(url):
        raise CorpusError(f"{url}: no such file")
    with tempfile.TemporaryDirectory(prefix="lateflow-corpus-") as tmp:
        return _read_corpus_file(fs.fetch(url, tmp), url, on_error)


def _rejected_id(record: object) -> str | None:
    """The ``_id`` a rejected record gave, as text (``1`` -> ``"1"``); None when it gave none or a list/object.

    Examples
    --------
    >>> _rejected_id({"_id": "d1"}), _rejected_id({"_id": 7}), _rejected_id({"_id": ["x"]}), _rejected_id("not a record")
    ('d1', '7', None, None)
    """
    value = record.get("_id") if isinstance(record, dict) else None
    if isinstance(value, (str, int, float, bool)):
        return str(value)
    return None


def _read_corpus_file(file: Path, name: str, on_error: OnError) -> Corpus:
    """Parse a local corpus file; ``name`` (its path or URL) is what messages and records cite."""
    is_parquet = file.suffix == ".parquet"
    if not is_parquet and file.suffix.lower() in UNSUPPORTED_SUFFIXES:
        raise CorpusError(f"{name}: unsupported corpus format ({file.suffix}): use JSON Lines (.jsonl, one document per line) or .parquet")
    records = _records_parquet(file, name) if is_parquet else _records_jsonl(file, name)
    unit = "row" if is_parquet else "line"
    docs: dict[str, list] = {name: [] for name in DOCS.names}
    rejected: dict[str, list] = {name: [] for name in REJECTED.names}
    first_seen: dict[str, int] = {}

    def reject(doc_id: str | None, line: int, reason: str) -> None:
        rejected["doc_id"].append(doc_id)
        rejected["source"].append(name)
        rejected["line"].append(line)
        rejected["reason"].append(reason)

    for line_no, record in records:
        where = f"{name}:{line_no}" if not is_parquet else f"{name}: {unit} {line_no}"
        try:
            if isinstance(record, CorpusError):
                raise record
            doc_id, title, text, metadata = _validate(record, where)
            if doc_id in first_seen:
                raise CorpusError(f"{where}: duplicate _id {doc_id!r} (first seen at {unit} {first_seen[doc_id]})")
        except CorpusError as exc:
            if on_error == "raise":
                raise
            reject(_rejected_id(record), line_no, str(exc))
            continue
        first_seen[doc_id] = line_no
        body = full_text(title, text)
        if not body:
            reject(doc_id, line_no, "empty document (no title or text)")
            continue
        docs["doc_id"].append(doc_id)
        docs["title"].append(title)
        docs["text"].append(text)
        docs["metadata"].append(json.dumps(metadata, ensure_ascii=False, sort_keys=True, default=str))
        docs["content_hash"].append(sha256_text(body))
    if not docs["doc_id"]:
        raise CorpusError(f"{name}: the corpus has no usable document ({len(rejected['reason'])} rejected)")
    return Corpus(
        docs=pa.Table.from_pydict(docs, schema=DOCS),
        rejected=pa.Table.from_pydict(rejected, schema=REJECTED),
        source=name,
        file_sha256=sha256_file(file),
    )
