"""PNG plots of an evaluation (matplotlib, headless Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_fde_recall(curve: dict[str, Any], path: Path, title: str) -> Path:
    """Recall of the exact MaxSim top-10 among the documents of the FDE ANN's top-N chunks, vs N."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(curve["candidates"], curve["recall"], marker="o")
    for level in (0.8, 0.9, 0.95):
        ax.axhline(level, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("ANN candidates (chunks)")
    ax.set_ylabel("recall of exact MaxSim top-10")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_quality_latency(systems: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """nDCG@10 against p50 query latency, one point per system."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, facts in systems.items():
        x, y = max(facts["latency_ms"]["p50"], 1e-3), facts["ndcg@10"]
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("p50 query latency, ms (encode included, log scale)")
    ax.set_ylabel("nDCG@10")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
