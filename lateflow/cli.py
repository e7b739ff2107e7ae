"""The ``lateflow`` command line: ``index``, ``search``, ``demo`` (more subcommands join as they land)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from flows.settings import apply_quiet_defaults

apply_quiet_defaults()


def _add_index_options(p: argparse.ArgumentParser) -> None:
    from flows.index import FDEParams, IndexConfig
    from tasks.ann import ANN_KINDS
    from tasks.chunk import ChunkConfig

    d, c, f = IndexConfig(), ChunkConfig(), FDEParams()
    g = p.add_argument_group("model and chunking")
    g.add_argument("--model", default=None, help="local Hugging Face checkpoint folder (default: the bundled all-MiniLM-L6-v2)")
    g.add_argument("--window", type=int, default=c.window, help=f"chunk window in model tokens (default {c.window})")
    g.add_argument("--overlap", type=int, default=c.overlap, help=f"tokens shared by consecutive chunks (default {c.overlap})")
    g.add_argument("--precision", choices=["fp32", "bf16", "int8"], default=d.precision, help=f"encoder precision (default {d.precision})")
    g.add_argument("--keep-punctuation", action="store_true", help="keep punctuation tokens of documents (dropped by default)")
    g.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help=f"padded tokens per encoder batch (default {d.batch_tokens})")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    g = p.add_argument_group("MUVERA FDE")
    g.add_argument("--fde-reps", type=int, default=f.repetitions, help=f"repetitions R (default {f.repetitions})")
    g.add_argument("--fde-bits", type=int, default=f.simhash_bits, help=f"SimHash bits k_sim; 2^k partitions (default {f.simhash_bits})")
    g.add_argument("--fde-proj", type=int, default=f.projection_dim, help=f"inner projection dim d_proj; 0 = none (default {f.projection_dim})")
    g.add_argument("--fde-final-dim", type=int, default=0, help="final count-sketch projection dim; 0 = none (default)")
    g.add_argument("--fde-seed", type=int, default=f.seed, help=f"seed of the random SimHash/projections (default {f.seed})")
    g = p.add_argument_group("ANN and run")
    g.add_argument("--ann", choices=ANN_KINDS, default="auto", help="FAISS index: flat, hnsw, ivfpq, or auto (flat below 50k chunks)")
    g.add_argument("--shard-size", type=int, default=d.shard_size, help=f"documents per task shard (default {d.shard_size})")
    g.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="bad corpus records: stop (default) or skip and record in rejected.parquet")


def _add_prf_options(p: argparse.ArgumentParser, with_switch: bool) -> None:
    from tasks.prf import PRF_MODES, PRFConfig

    d = PRFConfig()
    g = p.add_argument_group("ColBERT-PRF (pseudo-relevance feedback)")
    if with_switch:
        g.add_argument("--prf", action="store_true", help="expand the query with ColBERT-PRF before the final ranking")
        g.add_argument("--prf-mode", choices=PRF_MODES, default=d.mode, help=f"rerank the first pass, or retrieve again with the expanded query (default {d.mode})")
    g.add_argument("--prf-fb-docs", type=int, default=d.fb_docs, help=f"feedback documents (default {d.fb_docs})")
    g.add_argument("--prf-k", type=int, default=d.k, help=f"k-means clusters; must exceed --prf-fb-embs (default {d.k})")
    g.add_argument("--prf-fb-embs", type=int, default=d.fb_embs, help=f"expansion embeddings kept (default {d.fb_embs})")
    g.add_argument("--prf-beta", type=float, default=d.beta, help=f"weight of expansion embeddings, times IDF (default {d.beta})")


def prf_config_from_args(args: argparse.Namespace):
    """PRFConfig from the options of :func:`_add_prf_options` (mode defaults to rerank)."""
    from tasks.prf import PRFConfig

    return PRFConfig(fb_docs=args.prf_fb_docs, k=args.prf_k, fb_embs=args.prf_fb_embs, beta=args.prf_beta, mode=getattr(args, "prf_mode", "rerank"))


def index_config_from_args(args: argparse.Namespace):
    """Build an IndexConfig from the options added by :func:`_add_index_options`."""
    from flows.index import FDEParams, IndexConfig
    from tasks.ann import ANNConfig
    from tasks.chunk import ChunkConfig

    return IndexConfig(
        model=args.model,
        chunk=ChunkConfig(window=args.window, overlap=args.overlap),
        precision=args.precision,
        drop_punctuation=not args.keep_punctuation,
        batch_tokens=args.batch_tokens,
        fde=FDEParams(
            repetitions=args.fde_reps,
            simhash_bits=args.fde_bits,
            projection_dim=args.fde_proj or None,
            final_dim=args.fde_final_dim or None,
            seed=args.fde_seed,
        ),
        ann=ANNConfig(kind=args.ann),
        shard_size=args.shard_size,
        device=args.device,
        on_error=args.on_error,
    )


def cmd_index(args: argparse.Namespace) -> int:
    from flows.index import index_flow

    manifest = index_flow(str(args.corpus), str(args.index), index_config_from_args(args))
    counts = manifest["counts"]
    print(
        f"indexed {counts['docs']} documents as {counts['chunks']} chunks / {counts['tokens']} tokens "
        f"into {args.index} in {manifest['build_seconds']:.1f} s (FDE dim {counts['fde_dim']}, ANN {manifest['ann']['kind']})"
    )
    if counts["rejected"]:
        print(f"{counts['rejected']} records rejected: see {Path(args.index) / 'rejected.parquet'}")
    return 0


def print_hits(hits, as_json: bool) -> None:
    if as_json:
        print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=2))
        return
    for h in hits:
        snippet = " ".join(h.text.split())
        snippet = snippet if len(snippet) <= 160 else snippet[:157] + "..."
        print(f"{h.rank:>3}. {h.doc_id}  score {h.score:.3f}  chars {h.char_start}-{h.char_end}")
        print(f"     {snippet}")


def cmd_search(args: argparse.Namespace) -> int:
    from lateflow.engine import LateIndex

    prf = prf_config_from_args(args) if args.prf else None
    index = LateIndex.open(args.index, device=args.device)
    print_hits(index.search(args.query, k=args.k, candidates=args.candidates, prf=prf), args.json)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from evaluation.report import render_table
    from flows.evaluate import evaluate_flow

    command = " ".join(["lateflow", "evaluate", *map(str, sys.argv[2:])]) if sys.argv[1:2] == ["evaluate"] else None
    report = evaluate_flow(
        str(args.dataset),
        str(args.out),
        split=args.split,
        systems=args.systems,
        index_dir=str(args.index) if args.index else None,
        config=index_config_from_args(args),
        candidates=args.candidates,
        prf=prf_config_from_args(args),
        command=command,
    )
    print(f"\n{report['dataset']} ({report['split']}): {report['docs']} docs, {report['queries']} queries, {report['evaluation_seconds']:.0f} s\n")
    print(render_table(report))
    print(f"\nreport: {Path(args.out) / 'report.md'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from evaluation.demo import run_demo

    return run_demo(Path(args.workdir))


def _system_names() -> tuple[str, ...]:
    from evaluation.systems import ALL_SYSTEMS

    return ALL_SYSTEMS


def build_parser() -> argparse.ArgumentParser:
    from lateflow.engine import DEFAULT_CANDIDATES

    parser = argparse.ArgumentParser(prog="lateflow", description="Multi-vector retrieval: MUVERA FDE + FAISS + exact MaxSim, as Prefect flows.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("index", help="build or update an index from a corpus", description="Index a corpus: chunk, encode, FDE, ANN (a Prefect flow).")
    p.add_argument("corpus", type=Path, help="BEIR folder, corpus.jsonl or .parquet (columns _id, title, text, metadata...)")
    p.add_argument("--index", type=Path, required=True, help="index folder to write")
    _add_index_options(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="query an index", description="Search an index in-process and print the top documents.")
    p.add_argument("query", help="query text")
    p.add_argument("--index", type=Path, required=True, help="index folder built by `lateflow index`")
    p.add_argument("-k", type=int, default=10, help="documents to return (default 10)")
    p.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help=f"ANN chunk candidates to rerank (default {DEFAULT_CANDIDATES})")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    _add_prf_options(p, with_switch=True)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("evaluate", help="score systems on a BEIR dataset with ranx", description="Evaluate lateflow and baselines on a BEIR-layout dataset (a Prefect flow); writes report.json, report.md, runs and plots.")
    p.add_argument("dataset", type=Path, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--split", default="test", help="qrels split (default test)")
    p.add_argument("--systems", nargs="+", default=None, metavar="NAME", help="systems to run (default: all): " + ", ".join(_system_names()))
    p.add_argument("--index", type=Path, default=None, help="index folder to build or reuse (default OUT/index)")
    p.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help=f"ANN chunk candidates for fde-rerank (default {DEFAULT_CANDIDATES})")
    _add_index_options(p)
    _add_prf_options(p, with_switch=False)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="index and query the small dataset shipped with lateflow", description="Index the bundled LIMIT-small corpus, run sample searches and an evaluation.")
    p.add_argument("--workdir", default="lateflow-demo", help="folder for the demo's index and reports (default ./lateflow-demo)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as exc:
        # user-facing failures (bad input, missing index, offline model) get one clear line, not a traceback
        print(f"lateflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
