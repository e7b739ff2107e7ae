"""ranx scoring and paired significance tests against the reference system."""
from __future__ import annotations

import re
import warnings
from typing import Any

from numba.core.errors import NumbaTypeSafetyWarning
from ranx import Qrels, Run, compare, evaluate

# ranx's nDCG kernel casts uint64 -> int64 on rank positions (harmless at our depths); numba warns each call
warnings.filterwarnings("ignore", category=NumbaTypeSafetyWarning)

METRICS = ("ndcg@10", "recall@100", "map@100", "mrr@10")


def trec_safe_id(identifier: str) -> str:
    """An id fit for a whitespace-separated TREC file: whitespace and ``%`` percent-encoded.

    Examples
    --------
    >>> trec_safe_id("Geneva Durben"), trec_safe_id("doc-1")
    ('Geneva%20Durben', 'doc-1')
    """
    return re.sub(r"[\s%]", lambda m: f"%{ord(m.group()):02X}", identifier)


def to_qrels(qrels: dict[str, dict[str, int]]) -> Qrels:
    return Qrels({q: dict(v) for q, v in qrels.items()})


def to_run(run: dict[str, dict[str, float]], name: str) -> Run:
    # ranx rejects a query with no result; an empty ranking scores 0 for it anyway
    return Run({q: (v if v else {"__none__": 0.0}) for q, v in run.items()}, name=name)


def score_run(qrels: Qrels, run: Run, metrics: tuple[str, ...] = METRICS) -> dict[str, float]:
    """Mean of each metric over the judged queries.

    Examples
    --------
    >>> q = to_qrels({"q1": {"d1": 1}, "q2": {"d2": 1}})
    >>> r = to_run({"q1": {"d1": 2.0, "d3": 1.0}, "q2": {"d3": 2.0, "d2": 1.0}}, "x")
    >>> score_run(q, r, ("mrr@10",))
    {'mrr@10': 0.75}
    """
    result = evaluate(qrels, run, list(metrics), make_comparable=True)
    if isinstance(result, float):
        result = {metrics[0]: result}
    return {m: round(float(v), 6) for m, v in result.items()}


def significance(qrels: Qrels, runs: dict[str, Run], reference: str, metrics: tuple[str, ...] = METRICS, alpha: float = 0.05) -> dict[str, Any]:
    """Paired t-test (ranx ``student``) of every system against ``reference``, Bonferroni-corrected.

    The correction multiplies each p-value by the number of systems compared with the reference
    (one family per metric). Returns ``{system: {metric: {"p_value", "p_bonferroni", "significant"}}}``.
    """
    others = [name for name in runs if name != reference]
    if reference not in runs or not others:
        return {}
    report = compare(qrels, [runs[reference]] + [runs[n] for n in others], metrics=list(metrics), stat_test="student", max_p=alpha, make_comparable=True)
    m = len(others)
    out: dict[str, Any] = {}
    for name in others:
        pair = report.comparisons[frozenset({reference, name})]
        out[name] = {}
        for metric in metrics:
            p = float(pair[metric]["p_value"])
            p_adj = min(1.0, p * m)
            out[name][metric] = {"p_value": round(p, 6), "p_bonferroni": round(p_adj, 6), "significant": bool(p_adj < alpha)}
    return {"test": "paired Student's t-test (ranx)", "reference": reference, "alpha": alpha, "correction": f"Bonferroni (x{m})", "systems": out}
