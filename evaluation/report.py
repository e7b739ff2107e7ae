"""``report.md``: the human-readable side of ``report.json``."""
from __future__ import annotations

from typing import Any

from evaluation.scoring import METRICS

LABELS = {"ndcg@10": "nDCG@10", "recall@100": "R@100", "map@100": "MAP@100", "mrr@10": "MRR@10"}


def render_table(report: dict[str, Any]) -> str:
    """Systems x metrics as a Markdown table; a dagger marks a significant difference from the reference."""
    sig = report.get("significance", {})
    ref = sig.get("reference")
    header = "| system | " + " | ".join(LABELS[m] for m in METRICS) + " | p50 ms | p95 ms |"
    lines = [header, "|" + "---|" * (len(METRICS) + 3)]
    for name, facts in report["systems"].items():
        cells = []
        for metric in METRICS:
            mark = ""
            test = sig.get("systems", {}).get(name, {}).get(metric)
            if test and test["significant"]:
                mark = " †"
            cells.append(f"{facts[metric]:.4f}{mark}")
        lat = facts["latency_ms"]
        label = f"**{name}**" if name == ref else name
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {lat['p50']:.1f} | {lat['p95']:.1f} |")
    return "\n".join(lines)


def _sampled(report: dict[str, Any]) -> str:
    total = report.get("dataset_issues", {}).get("queries_sampled_from")
    return f" (a fixed subset of {total}, by --max-queries)" if total else ""


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report.md text."""
    sig = report.get("significance", {})
    idx = report["index"]
    out = [
        f"# lateflow evaluation: {report['dataset']} ({report['split']})",
        "",
        f"{report['docs']} documents, {report['queries']} judged queries{_sampled(report)}. Machine: {report['machine_line']}.",
        "",
        render_table(report),
        "",
    ]
    if sig:
        out += [
            f"† = differs from **{sig['reference']}** at p < {sig['alpha']} after {sig['correction']} correction "
            f"({sig['test']}, paired over queries). p-values (Bonferroni-corrected):",
            "",
            "| system | " + " | ".join(LABELS[m] for m in METRICS) + " |",
            "|" + "---|" * (len(METRICS) + 1),
        ]
        for name, tests in sig["systems"].items():
            out.append(f"| {name} | " + " | ".join(f"{tests[m]['p_bonferroni']:.3g}" for m in METRICS) + " |")
        out.append("")
    prf = report.get("significance_prf", {})
    if prf:
        base = report["systems"][prf["reference"]]
        out += [f"ColBERT-PRF against **{prf['reference']}** (same first pass without feedback; {prf['test']}, {prf['correction']}):", ""]
        out += ["| system | " + " | ".join(f"{LABELS[m]} (delta, p)" for m in METRICS) + " |", "|" + "---|" * (len(METRICS) + 1)]
        for name, tests in prf["systems"].items():
            cells = [f"{report['systems'][name][m] - base[m]:+.4f}, {tests[m]['p_bonferroni']:.3g}{' †' if tests[m]['significant'] else ''}" for m in METRICS]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    ref = report["systems"].get("maxsim-exact")
    if ref and "fde-rerank" in report["systems"]:
        ratio = report["systems"]["fde-rerank"]["ndcg@10"] / ref["ndcg@10"] if ref["ndcg@10"] else float("nan")
        speed = ref["latency_ms"]["p50"] / max(report["systems"]["fde-rerank"]["latency_ms"]["p50"], 1e-9)
        out += [f"fde-rerank reaches {ratio:.2%} of the brute-force ceiling's nDCG@10 at {speed:.1f}x lower p50 latency.", ""]
    curve = report.get("fde_recall_curve")
    if curve:
        pts = ", ".join(f"{n}: {r:.3f}" for n, r in zip(curve["candidates"], curve["recall"]))
        out += [f"Recall of the exact MaxSim top-10 among the FDE ANN's top-N chunks (N: recall): {pts}.", ""]
    out += [
        "## Index",
        "",
        f"- model: `{idx['model']}`; FDE dim {idx['fde_dim']}; {idx['chunks']} chunks; {idx['tokens']} tokens; "
        f"{idx['bytes_on_disk'] / 2**20:.1f} MiB on disk; built in {idx['build_seconds']:.1f} s",
        f"- settings: {report['settings']}",
    ]
    issues = report.get("dataset_issues", {})
    if any(issues.values()):
        out.append(f"- dataset issues (handled as documented in evaluation/datasets.py): {issues}")
    out += [
        f"- evaluation took {report['evaluation_seconds']:.1f} s",
        "",
        "## Reproduce",
        "",
        f"```\n{report['command']}\n```",
        "",
        "Plots: `plots/fde_recall.png`, `plots/quality_latency.png`. Runs: `runs/<system>.trec` and `.parquet`.",
        "",
    ]
    return "\n".join(out)
