"""lateflow: multi-vector (late-interaction) retrieval with MUVERA FDEs, FAISS and ColBERT-PRF.

The Python API for applications::

    from lateflow import LateIndex
    index = LateIndex.open("idx/scifact")
    for hit in index.search("How do statins affect cholesterol?", k=5):
        print(hit.doc_id, hit.score, hit.text)
"""
from lateflow.engine import LateIndex, SearchHit

__all__ = ["LateIndex", "SearchHit"]
