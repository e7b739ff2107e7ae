"""BEIR-layout evaluation datasets: queries and qrels, validated.

Layout: ``corpus.jsonl``, ``queries.jsonl`` (``_id``, ``text``) and ``qrels/<split>.tsv``
(``query-id<TAB>corpus-id<TAB>score`` with a header line). SciFact-style folders that keep a split in
``<split>/qrels.tsv`` (+ ``<split>/queries.jsonl``) are read too.

Policy for bad qrels (each case is counted and reported in ``report.json`` under ``dataset_issues``):

* a qrels line naming a document that is not in the corpus: dropped (it can never be retrieved;
  keeping it would only lower every system equally) and counted;
* a qrels line naming a query that is not in the queries file: dropped and counted;
* the same (query, document) pair twice: an error if the scores differ, otherwise counted and kept once;
* a malformed line (not three fields, a non-integer score): an error naming file and line;
* a query with no token the model keeps (only emoji, say): evaluated as an empty ranking (0 on
  every metric) and counted as ``queries_without_readable_tokens`` (``flows/evaluate.py``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from storage.corpus import CorpusError, resolve_corpus_path, utf8_codec


class DatasetError(ValueError):
    """A dataset that cannot be evaluated; the message names the file and line."""


@dataclass
class EvalDataset:
    """Queries with at least one judgment in the split, and their qrels."""

    name: str
    root: Path
    split: str
    corpus_path: Path
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    issues: dict[str, int] = field(default_factory=dict)


def _split_files(root: Path, split: str) -> tuple[Path, Path]:
    candidates = [(root / "qrels" / f"{split}.tsv", root / "queries.jsonl"), (root / split / "qrels.tsv", root / split / "queries.jsonl")]
    for qrels, queries in candidates:
        if qrels.is_file():
            if not queries.is_file():
                queries = root / "queries.jsonl"
            return qrels, queries
    available = sorted({p.stem for p in (root / "qrels").glob("*.tsv")} | {p.parent.name for p in root.glob("*/qrels.tsv")})
    raise DatasetError(f"{root}: no qrels for split {split!r} (looked for qrels/{split}.tsv and {split}/qrels.tsv); available splits: {available or 'none'}")


def read_queries(path: Path) -> dict[str, str]:
    """``_id -> text`` from a queries.jsonl, with errors naming file and line."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing queries file")
    queries: dict[str, str] = {}
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode(utf8_codec(line_no))
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{path}:{line_no}: bytes are not valid UTF-8") from exc
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{line_no}: malformed JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or "_id" not in record or not isinstance(record.get("text"), str):
                raise DatasetError(f"{path}:{line_no}: a query needs '_id' and a string 'text'")
            qid = str(record["_id"])
            if qid in queries:
                raise DatasetError(f"{path}:{line_no}: duplicate query _id {qid!r}")
            queries[qid] = record["text"]
    return queries


def read_qrels(path: Path) -> tuple[dict[str, dict[str, int]], int]:
    """Qrels as ``{query: {doc: score}}`` and the number of duplicate lines (identical scores)."""
    qrels: dict[str, dict[str, int]] = {}
    duplicates = 0
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode(utf8_codec(line_no)).rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{path}:{line_no}: bytes are not valid UTF-8") from exc
            if not line.strip():
                continue
            parts = line.split("\t")
            if line_no == 1 and parts[0] in ("query-id", "query_id", "qid"):
                continue
            if len(parts) == 4:  # TREC qrels: qid 0 docid score
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3:
                raise DatasetError(f"{path}:{line_no}: expected 3 tab-separated fields (query-id, corpus-id, score), got {len(parts)}")
            qid, did, score_text = parts
            try:
                score = int(score_text)
            except ValueError as exc:
                raise DatasetError(f"{path}:{line_no}: score {score_text!r} is not an integer") from exc
            previous = qrels.setdefault(qid, {}).get(did)
            if previous is not None:
                if previous != score:
                    raise DatasetError(f"{path}:{line_no}: ({qid}, {did}) judged twice with different scores ({previous} and {score})")
                duplicates += 1
            qrels[qid][did] = score
    return qrels, duplicates


def corpus_ids(corpus_path: Path) -> set[str]:
    """The id of every corpus record, by the index's rules (``_id`` or ``doc_id``; JSON Lines or Parquet).

    Nothing else is validated here: the index flow reports malformed records with their line
    numbers. The same rules matter: a judged document the index accepts but this missed would be
    dropped as unknown, and change every metric.
    """
    if corpus_path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(corpus_path).names
        column = "_id" if "_id" in names else "doc_id" if "doc_id" in names else None
        if column is None:
            raise DatasetError(f"{corpus_path}: no '_id' or 'doc_id' column")
        return {str(v) for v in pq.read_table(corpus_path, columns=[column]).column(column).to_pylist() if v is not None}
    ids = set()
    with open(corpus_path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if raw.strip():
                try:
                    record = json.loads(raw.decode(utf8_codec(line_no)))
                    doc_id = record.get("_id", record.get("doc_id"))
                except (ValueError, AttributeError):
                    continue  # the index flow reports malformed corpus lines with their line numbers
                if isinstance(doc_id, (str, int)) and not isinstance(doc_id, bool):
                    ids.add(str(doc_id))
    return ids


def load_dataset(root: str | os.PathLike, split: str = "test") -> EvalDataset:
    """Load and validate a BEIR-layout dataset folder for one split (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    try:
        corpus_path = resolve_corpus_path(root)  # corpus.jsonl or corpus.parquet, as `lateflow index` reads
    except CorpusError as exc:
        raise DatasetError(str(exc)) from exc
    qrels_path, queries_path = _split_files(root, split)
    queries = read_queries(queries_path)
    qrels, duplicates = read_qrels(qrels_path)
    docs = corpus_ids(corpus_path)
    unknown_queries = sum(len(v) for q, v in qrels.items() if q not in queries)
    qrels = {q: v for q, v in qrels.items() if q in queries}
    unknown_docs = 0
    for q in list(qrels):
        kept = {d: s for d, s in qrels[q].items() if d in docs}
        unknown_docs += len(qrels[q]) - len(kept)
        if any(s > 0 for s in kept.values()):
            qrels[q] = kept
        else:
            del qrels[q]
    if not qrels:
        raise DatasetError(f"{qrels_path}: no query of split {split!r} has a relevant document in the corpus")
    return EvalDataset(
        name=root.name,
        root=root,
        split=split,
        corpus_path=corpus_path,
        queries={q: queries[q] for q in qrels},
        qrels=qrels,
        issues={"qrels_unknown_documents": unknown_docs, "qrels_unknown_queries": unknown_queries, "qrels_duplicate_lines": duplicates},
    )


def subsample(dataset: EvalDataset, max_queries: int | None) -> EvalDataset:
    """At most ``max_queries`` of the dataset's queries, chosen by a stable hash of their ids.

    The choice depends only on the ids (not on file order or a global seed), so the same subset comes
    back on every machine and run; ``None`` or a number >= the query count returns the dataset as is.

    Examples
    --------
    >>> ds = EvalDataset("x", Path("."), "test", Path("c"), {str(i): "q" for i in range(10)}, {str(i): {"d": 1} for i in range(10)})
    >>> small = subsample(ds, 3)
    >>> len(small.queries), sorted(small.queries) == sorted(subsample(ds, 3).queries), small.issues["queries_sampled_from"]
    (3, True, 10)
    """
    if max_queries is None or max_queries >= len(dataset.queries):
        return dataset
    if max_queries < 1:
        raise ValueError(f"max_queries must be at least 1, got {max_queries}")
    chosen = sorted(dataset.queries, key=lambda q: hashlib.sha1(q.encode("utf-8")).hexdigest())[:max_queries]
    keep = set(chosen)
    return replace(
        dataset,
        queries={q: t for q, t in dataset.queries.items() if q in keep},
        qrels={q: r for q, r in dataset.qrels.items() if q in keep},
        issues={**dataset.issues, "queries_sampled_from": len(dataset.queries)},
    )
