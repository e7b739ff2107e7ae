"""``lateflow demo``: index the bundled LIMIT-small corpus, show searches, then evaluate it."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_QUERIES = ["Who likes Joshua Trees?", "Who likes Slide Rules and Quokkas?", "Who likes Disco Music?"]


def bundled_dataset(name: str = "limit-small") -> Path:
    """Folder of a dataset shipped inside the package (BEIR layout)."""
    return Path(str(resources.files("evaluation") / "data" / name))


def run_demo(workdir: Path) -> int:
    """Index, search and (when the evaluation flow is present) evaluate LIMIT-small under ``workdir``."""
    from flows.index import IndexConfig, index_flow
    from lateflow.cli import print_hits
    from lateflow.engine import LateIndex

    dataset = bundled_dataset()
    index_dir = workdir / "index"
    print(f"lateflow demo: indexing {dataset} (LIMIT-small, CC BY 4.0, Google DeepMind) into {index_dir}")
    manifest = index_flow(str(dataset), str(index_dir), IndexConfig())
    counts = manifest["counts"]
    print(f"  {counts['docs']} documents, {counts['chunks']} chunks, {counts['tokens']} tokens, FDE dim {counts['fde_dim']}, {manifest['build_seconds']:.1f} s")
    index = LateIndex.open(index_dir)
    for query in DEMO_QUERIES:
        print(f"\nquery: {query}")
        print_hits(index.search(query, k=3), as_json=False)
    return 0
