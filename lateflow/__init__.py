"""lateflow: multi-vector (late-interaction) retrieval with MUVERA FDEs, FAISS and ColBERT-PRF.

The Python API for applications::

    from lateflow import LateIndex
    index = LateIndex.open("idx/scifact")
    for hit in index.search("How do statins affect cholesterol?", k=5):
        print(hit.doc_id, hit.score, hit.text)
"""
from __future__ import annotations

from typing import Any

__all__ = ["LateIndex", "SearchHit"]


def __getattr__(name: str) -> Any:
    # imported lazily so that `lateflow --help` does not pay for torch and transformers
    if name in __all__:
        from lateflow import engine

        return getattr(engine, name)
    raise AttributeError(name)
