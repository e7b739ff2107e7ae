"""The ``lateflow`` command line: ``index``, ``search``, ``evaluate``, ``serve``, ``deploy`` and ``demo``."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

from flows.settings import apply_quiet_defaults, quiet_input_error_tracebacks, reap_orphaned_ephemeral_servers

apply_quiet_defaults()


def _add_index_options(p: argparse.ArgumentParser) -> None:
    from flows.index import FDEParams, IndexConfig
    from storage.token_codec import TOKEN_CODECS
    from tasks.ann import ANN_KINDS, HNSW_STORAGES, ANNConfig as _ANN
    from tasks.chunk import ChunkConfig
    from tasks.encode import PRECISION_CHOICES

    d, c, f = IndexConfig(), ChunkConfig(), FDEParams()
    g = p.add_argument_group("model and chunking")
    g.add_argument("--model", default=None, help="local Hugging Face checkpoint folder (default: the bundled all-MiniLM-L6-v2)")
    g.add_argument("--window", type=int, default=c.window, help=f"chunk window in model tokens (default {c.window})")
    g.add_argument("--overlap", type=int, default=c.overlap, help=f"tokens shared by consecutive chunks (default {c.overlap})")
    g.add_argument(
        "--precision", choices=PRECISION_CHOICES, default=d.precision,
        help="encoder precision: fp32, bf16 autocast, int8 dynamic quantisation (CPU), or auto = bf16 where the device computes "
        "bfloat16 natively (AVX-512 BF16 / AMX CPUs, Ampere+ GPUs), else fp32; an existing index keeps its precision under auto "
        f"(default {d.precision})",
    )
    g.add_argument("--keep-punctuation", action="store_true", help="keep punctuation tokens of documents (dropped by default)")
    g.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help=f"padded tokens per encoder batch (default {d.batch_tokens})")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    g.add_argument(
        "--token-codec", choices=TOKEN_CODECS, default=d.token_codec,
        help="number format of the stored token vectors: float16, int8 (a quarter of float32: no measurable nDCG@10 change) or "
        "int4 (an eighth: within noise on scifact and cranfield); vectors are decoded when the index loads, and changing it "
        f"re-encodes nothing (default {d.token_codec})",
    )
    g = p.add_argument_group("MUVERA FDE")
    g.add_argument("--fde-reps", type=int, default=f.repetitions, help=f"repetitions R (default {f.repetitions})")
    g.add_argument("--fde-bits", type=int, default=f.simhash_bits, help=f"SimHash bits k_sim; 2^k partitions (default {f.simhash_bits})")
    g.add_argument("--fde-proj", type=int, default=f.projection_dim, help=f"inner projection dim d_proj; 0 = none (default {f.projection_dim})")
    g.add_argument("--fde-final-dim", type=int, default=0, help="final count-sketch projection dim; 0 = none (default)")
    g.add_argument(
        "--fde-fill", action=argparse.BooleanOptionalAction, default=f.fill_empty_partitions,
        help=f"fill a document's empty SimHash partitions with its nearest token (MUVERA; default {'on' if f.fill_empty_partitions else 'off'})",
    )
    g.add_argument("--fde-seed", type=int, default=f.seed, help=f"seed of the random SimHash/projections (default {f.seed})")
    g = p.add_argument_group("ANN and run")
    g.add_argument("--ann", choices=ANN_KINDS, default="auto", help="FAISS index: flat, hnsw, ivfpq, or auto (flat below 5,000 chunks, else hnsw)")
    g.add_argument(
        "--hnsw-storage", choices=tuple(HNSW_STORAGES), default=_ANN.hnsw_storage,
        help=f"how HNSW holds the FDEs: sq8 (a quarter of float32), fp16 or flat float32 (default {_ANN.hnsw_storage})",
    )
    g.add_argument("--shard-size", type=int, default=d.shard_size, help=f"documents per task shard (default {d.shard_size})")
    g.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="bad corpus records: stop (default) or skip and record in rejected.parquet")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    from flows.runners import RUNNERS

    g = p.add_argument_group("where the work runs (scale-out)")
    g.add_argument("--runner", choices=RUNNERS, default="default", help="task runner: default (in this process) or dask (segments encoded in parallel on Dask workers)")
    g.add_argument("--dask-address", default=None, metavar="ADDR", help="scheduler of an existing Dask cluster, e.g. tcp://10.0.0.5:8786 (default with --runner dask: a LocalCluster, one worker per core)")
    g.add_argument("--dask-workers", type=int, default=None, metavar="N", help="workers of the LocalCluster (default: one per core)")
    g.add_argument("--cache", default=None, metavar="PATH_OR_URL", help="shard cache (default INDEX/.cache); a URL such as s3://bucket/lateflow-cache lets workers on other machines share it")
    g.add_argument("--keep-versions", type=int, default=2, metavar="N", help="index versions kept on disk, the current one included (default 2)")


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
            fill_empty_partitions=args.fde_fill,
        ),
        ann=ANNConfig(kind=args.ann, hnsw_storage=args.hnsw_storage),
        shard_size=args.shard_size,
        device=args.device,
        on_error=args.on_error,
        token_codec=args.token_codec,
    )


def cmd_index(args: argparse.Namespace) -> int:
    from flows.index import index_flow
    from flows.runners import with_runner
    from storage.fs import local_path
    from storage.manifest import resolve_index_dir

    if args.keep_versions < 1:  # checked here too: inside the flow it came after Prefect's tracebacks
        raise ValueError(f"--keep-versions must be at least 1, got {args.keep_versions}")
    config = index_config_from_args(args)
    if args.device and args.runner == "default":  # this process encodes: its device must exist here
        from tasks.encode import select_device

        select_device(args.device)
    flow = with_runner(index_flow, args.runner, dask_address=args.dask_address, dask_workers=args.dask_workers)
    manifest = flow(args.corpus, args.index, config, cache=args.cache, keep_versions=args.keep_versions)
    if manifest.get("outcome") == "up_to_date":
        print(f"{args.index} is up to date: version {manifest['version']} already holds this corpus with these settings (nothing to do)")
        return 0
    if manifest.get("outcome") == "adopted":
        print(f"{args.index}: switched to version {manifest['version']}, built earlier from this corpus with these settings (nothing encoded)")
        return 0
    counts = manifest["counts"]
    print(
        f"indexed {counts['docs']} documents as {counts['chunks']} chunks / {counts['tokens']} tokens "
        f"into {args.index} in {manifest['build_seconds']:.1f} s (FDE dim {counts['fde_dim']}, ANN {manifest['ann']['kind']})"
    )
    inc = manifest.get("incremental")
    if inc:
        print(
            f"version {manifest['version']}: {inc['docs_new']} new, {inc['docs_changed']} changed, {inc['docs_unchanged']} unchanged, "
            f"{inc['docs_removed']} removed documents; encoded {inc['docs_encoded']} documents in {inc['segments_encoded']} of {inc['segments']} segments"
            + (f"; new metadata for {inc['docs_metadata_changed']} unchanged documents" if inc.get("docs_metadata_changed") else "")
        )
    if counts["rejected"]:
        print(f"{counts['rejected']} records rejected: see {resolve_index_dir(local_path(args.index)) / 'rejected.parquet'}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import serve_index

    print(f"lateflow deploy: serving deployment 'index/{args.name}' (cron {args.cron!r}); runs happen in this process until you stop it (Ctrl-C)", file=sys.stderr)
    serve_index(
        args.corpus,
        args.index,
        index_config_from_args(args),
        cron=args.cron,
        name=args.name,
        runner=args.runner,
        dask_address=args.dask_address,
        cache=args.cache,
        keep_versions=args.keep_versions,
    )
    return 0


def finite_json(value):
    """``value`` with every NaN or infinity (corpus metadata may hold them) as None: strict JSON, as the HTTP API gives.

    Examples
    --------
    >>> finite_json({"a": [1.5, float("nan")], "b": {"c": float("-inf")}, "d": "x"})
    {'a': [1.5, None], 'b': {'c': None}, 'd': 'x'}
    """
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def print_hits(hits, as_json: bool) -> None:
    if as_json:
        print(json.dumps(finite_json([h.to_dict() for h in hits]), ensure_ascii=False, indent=2, allow_nan=False))
        return
    for h in hits:
        snippet = " ".join(h.text.split())
        snippet = snippet if len(snippet) <= 160 else snippet[:157] + "..."
        print(f"{h.rank:>3}. {h.doc_id}  score {h.score:.3f}  chars {h.char_start}-{h.char_end}")
        print(f"     {snippet}")


def parse_filter(pairs: Sequence[str] | None) -> dict | None:
    """``["source=x", "year=2020", "year=2021"]`` -> ``{"source": "x", "year": [2020, 2021]}``.

    A value is read as JSON when it parses (numbers, true, null, lists), else taken as a string;
    a field given twice means "any of".

    Examples
    --------
    >>> parse_filter(["source=web", "year=2020", "year=2021"])
    {'source': 'web', 'year': [2020, 2021]}
    """
    if not pairs:
        return None
    out: dict = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--filter expects FIELD=VALUE, got {pair!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if name in out:
            previous = out[name] if isinstance(out[name], list) else [out[name]]
            value = previous + (value if isinstance(value, list) else [value])
        out[name] = value
    return out


def cmd_search(args: argparse.Namespace) -> int:
    from lateflow.engine import LateIndex, SearchHit

    if (args.index is None) == (args.server is None):
        raise ValueError("give exactly one of --index (search in-process) or --server URL (ask a running service)")
    prf = prf_config_from_args(args) if args.prf else None
    if (args.query is None) == (args.queries is None):
        raise ValueError("give exactly one of a query text or --queries FILE (with --out FILE)")
    if args.queries is not None:
        return _search_batch(args, prf)
    filters = parse_filter(args.filter)
    if args.server and args.verify:
        raise ValueError("--verify checks an index folder: use it with --index (the service has `lateflow serve --verify`)")
    if args.server:
        from service.client import search_remote

        prf_body = {k: v for k, v in prf.to_dict().items() if k in ("fb_docs", "k", "fb_embs", "beta", "mode")} if prf else False
        answer = search_remote(args.server, args.query, k=args.k, candidates=args.candidates, scope=args.scope, prf=prf_body, filter=filters)
        print_hits([SearchHit(**hit) for hit in answer["results"]], args.json)
        return 0
    index = LateIndex.open(args.index, device=args.device, verify=args.verify)
    print_hits(index.search(args.query, k=args.k, candidates=args.candidates, prf=prf, filter=filters, scope=args.scope), args.json)
    return 0


def _search_batch(args: argparse.Namespace, prf) -> int:
    """``lateflow search --queries FILE --out RUN.parquet``: the batch search flow."""
    from flows.search import search_flow

    if args.out is None or args.server is not None or args.filter:
        raise ValueError("--queries needs --index and --out (no --server, no --filter)")
    if args.verify:
        from storage.manifest import read_manifest

        read_manifest(args.index, verify_hashes=True)  # an IndexFormatError naming the damaged file
    result = search_flow(str(args.index), str(args.queries), str(args.out), k=args.k, candidates=args.candidates, prf=prf)
    print(f"searched {result['queries']} queries: {result['rows']} rows in {result['out']}")
    if result["unreadable"]:
        print(f"{len(result['unreadable'])} queries had no token the model can read (no rows): {', '.join(result['unreadable'][:10])}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.auth import resolve_token
    from service.limits import Limits
    from service.server import configure_logging, serve

    token = resolve_token(args.token_file)
    limits = Limits(
        max_query_chars=args.max_query_chars,
        max_k=args.max_k,
        max_batch=args.max_batch,
        max_body_bytes=args.max_body_bytes,
        max_concurrent_searches=args.max_concurrent or Limits().max_concurrent_searches,
    )
    configure_logging(args.log_level)
    print(f"lateflow serve: loading {args.index} ...", file=sys.stderr)
    app = create_app(args.index, token=token, limits=limits, watch_seconds=args.watch_seconds, device=args.device, verify=args.verify, preload=True)
    auth = "bearer token required (from --token-file)" if args.token_file else ("bearer token required (from $LATEFLOW_API_TOKEN)" if token else "no auth")
    if not token and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lateflow serve: warning: listening on {args.host} without a token; set LATEFLOW_API_TOKEN or --token-file", file=sys.stderr)
    print(f"lateflow serve: index {app.state.holder.current.index_id} on http://{args.host}:{args.port} ({auth}; docs at /docs)", file=sys.stderr)
    serve(app, args.host, args.port, log_level=args.log_level)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from evaluation.report import render_table
    from flows.evaluate import evaluate_flow
    from storage.fs import local_path

    command = " ".join(["lateflow", "evaluate", *map(str, sys.argv[2:])]) if sys.argv[1:2] == ["evaluate"] else None
    config = index_config_from_args(args)
    # `--index DIR` alone evaluates that index as it is; only index options given on the command
    # line (compared with their defaults) may rebuild it
    defaults = index_config_from_args(build_parser().parse_args(["evaluate", str(args.dataset), "--out", str(args.out)]))
    asked = replace(config, device=None, on_error=defaults.on_error) != replace(defaults, device=None)
    report = evaluate_flow(
        str(args.dataset),
        str(args.out),
        split=args.split,
        systems=args.systems,
        index_dir=str(local_path(args.index)) if args.index else None,  # Path() would mangle file:///x into file:/x
        config=config,
        candidates=args.candidates,
        prf=prf_config_from_args(args),
        command=command,
        max_queries=args.max_queries,
        rebuild_existing=asked or args.index is None,  # OUT/index is the command's own: kept up to date
    )
    print(f"\n{report['dataset']} ({report['split']}): {report['docs']} docs, {report['queries']} queries, {report['evaluation_seconds']:.0f} s\n")
    print(render_table(report))
    print(f"\nreport: {Path(args.out) / 'report.md'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from evaluation.demo import run_demo

    return run_demo(Path(args.workdir), args.max_queries)


def _system_names() -> tuple[str, ...]:
    from evaluation.systems import ALL_SYSTEMS

    return ALL_SYSTEMS


def build_parser() -> argparse.ArgumentParser:
    from evaluation.demo import DEMO_QUERY_COUNT
    from lateflow.engine import DEFAULT_CANDIDATES, DEFAULT_RERANK_SCOPE, RERANK_SCOPES

    parser = argparse.ArgumentParser(prog="lateflow", description="Multi-vector retrieval: MUVERA FDE + FAISS + exact MaxSim, as Prefect flows.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "index",
        help="build or update an index from a corpus",
        description="Index a corpus: chunk, encode, FDE, ANN (a Prefect flow). Incremental: only new or changed documents are encoded, "
        "deleted ones dropped; each build is a new version under INDEX/versions, switched in atomically. A killed run resumes when re-run; "
        "a second run on the same index folder fails at once (lock).",
    )
    # str, not Path: Path would fold the // of URLs such as s3://bucket/corpus.jsonl
    p.add_argument("corpus", help="BEIR folder, corpus.jsonl or .parquet (columns _id, title, text, metadata...): a path, file:// URL or s3://, gs://, fsspec URL")
    p.add_argument("--index", required=True, help="index folder to write (local path or file:// URL)")
    _add_index_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "deploy",
        help="serve a scheduled index deployment on a Prefect server",
        description="Register a Prefect deployment of the index flow with a cron schedule (flow.serve) and run its runs in this process "
        "until stopped. Needs PREFECT_API_URL pointing at a Prefect server (prefect server start --host 127.0.0.1 --analytics-off).",
    )
    p.add_argument("corpus", help="corpus to index on every run (path or URL, as for `lateflow index`)")
    p.add_argument("--index", required=True, help="index folder each run updates incrementally")
    p.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *" for 02:00 UTC every day (schedules run in UTC)')
    p.add_argument("--name", default="scheduled", help="deployment name; the deployment is index/NAME (default scheduled)")
    _add_index_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("search", help="query an index", description="Search an index in-process (--index) or through a running service (--server) and print the top documents.")
    p.add_argument("query", nargs="?", default=None, help="query text (or --queries FILE for a batch)")
    p.add_argument("--queries", type=Path, default=None, help="batch: a queries.jsonl (_id, text) searched by the Prefect search flow; needs --out")
    p.add_argument("--out", type=Path, default=None, help="batch: Parquet file for the ranked run (query_id, rank, doc_id, score, chunk offsets, text)")
    p.add_argument("--index", type=Path, default=None, help="index folder built by `lateflow index` (search in-process)")
    p.add_argument("--verify", action="store_true", help="with --index: check every index file's sha256 against the manifest first (reads the whole index)")
    p.add_argument("--server", default=None, metavar="URL", help="URL of a running `lateflow serve` to ask instead, e.g. http://127.0.0.1:8000 (sends $LATEFLOW_API_TOKEN if set)")
    p.add_argument("--filter", action="append", default=None, metavar="FIELD=VALUE", help="keep documents whose metadata FIELD equals VALUE (JSON or text); repeat a field for any of")
    p.add_argument("-k", type=int, default=10, help="documents to return (default 10)")
    p.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help=f"ANN chunk candidates to rerank (default {DEFAULT_CANDIDATES})")
    p.add_argument(
        "--scope", choices=RERANK_SCOPES, default=DEFAULT_RERANK_SCOPE,
        help=f"rerank only the retrieved chunks, or every chunk of their documents (default {DEFAULT_RERANK_SCOPE})",
    )
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    _add_prf_options(p, with_switch=True)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("evaluate", help="score systems on a BEIR dataset with ranx", description="Evaluate lateflow and baselines on a BEIR-layout dataset (a Prefect flow); writes report.json, report.md, runs and plots.")
    p.add_argument("dataset", type=Path, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--split", default="test", help="qrels split (default test)")
    p.add_argument("--systems", nargs="+", default=None, metavar="NAME", help="systems to run (default: all): " + ", ".join(_system_names()))
    p.add_argument("--index", default=None, help="an existing index folder (path or file:// URL) to evaluate as it is, with its own settings; it must have been built from this dataset's corpus file. Index options that differ from their defaults rebuild it with those instead. Default: OUT/index, built or brought up to date with the index options")
    p.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help=f"ANN chunk candidates for fde-rerank (default {DEFAULT_CANDIDATES})")
    p.add_argument("--max-queries", type=int, default=None, metavar="N", help="evaluate a fixed subset of N queries (chosen by a hash of their ids; default: all)")
    _add_index_options(p)
    _add_prf_options(p, with_switch=False)
    p.set_defaults(func=cmd_evaluate)

    from service.limits import Limits

    lim = Limits()
    p = sub.add_parser("serve", help="serve an index over HTTP", description="Serve an index over HTTP (FastAPI + uvicorn): POST /search, POST /search/batch, GET /health, GET /ready, POST /reload; OpenAPI docs at /docs. A new index version on disk is swapped in without dropping requests.")
    p.add_argument("--index", type=Path, required=True, help="index folder (or a symlink to one: re-point it to swap versions)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token-file", type=Path, default=None, help="file holding the bearer token clients must send (default: $LATEFLOW_API_TOKEN; neither: no auth)")
    p.add_argument("--watch-seconds", type=float, default=5.0, help="poll the index manifest this often and swap in a new version (default 5; 0: only on POST /reload)")
    p.add_argument("--max-batch", type=int, default=lim.max_batch, help=f"most queries per POST /search/batch (default {lim.max_batch})")
    p.add_argument("--max-k", type=int, default=lim.max_k, help=f"largest k per query (default {lim.max_k})")
    p.add_argument("--max-query-chars", type=int, default=lim.max_query_chars, help=f"longest query in characters (default {lim.max_query_chars})")
    p.add_argument("--max-body-bytes", type=int, default=lim.max_body_bytes, help=f"largest request body in bytes (default {lim.max_body_bytes})")
    p.add_argument("--max-concurrent", type=int, default=0, help="searches computed at once; others wait (default: one per CPU core)")
    p.add_argument("--verify", action="store_true", help="check every artifact's sha256 on each load (slower)")
    p.add_argument("--device", default=None, help="cuda or cpu for the query encoder (default: cuda when present)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level (default info)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="index and query the small dataset shipped with lateflow", description="Index the bundled LIMIT-small corpus, run sample searches and an evaluation.")
    p.add_argument("--workdir", default="lateflow-demo", help="folder for the demo's index and reports (default ./lateflow-demo)")
    p.add_argument("--max-queries", type=int, default=DEMO_QUERY_COUNT, metavar="N", help=f"queries evaluated, of 1,000 (default {DEMO_QUERY_COUNT}; 1000 for all)")
    p.set_defaults(func=cmd_demo)
    return parser


@contextlib.contextmanager
def _noting_interrupts() -> Iterator[list[int]]:
    """Record SIGINT in the yielded list (it still raises KeyboardInterrupt as usual) while the block runs."""
    import signal
    import threading

    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # handlers can only be set from the main thread
        return

    def on_interrupt(signum: int, frame: object) -> None:
        received.append(signum)
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_input_error_tracebacks()
    reaped = reap_orphaned_ephemeral_servers()
    if reaped:
        print(f"lateflow: stopped {len(reaped)} temporary Prefect server(s) left running by killed runs (pids {reaped})", file=sys.stderr)
    with _noting_interrupts() as interrupted:
        try:
            return int(args.func(args) or 0)
        except BaseException as exc:
            return _failure(args, exc, interrupted)


def _failure(args: argparse.Namespace, exc: BaseException, interrupted: list[int]) -> int:
    """The exit code for a command that raised ``exc``, after one line on stderr; a bug is re-raised."""
    # Ctrl-C reaches Prefect's temporary API server too, so what surfaces here is often not the
    # KeyboardInterrupt but the flow's next API call failing (httpx.ConnectError): the signal itself
    # is what counts. Finished segments and versions are on disk: the same command resumes.
    if interrupted or isinstance(exc, KeyboardInterrupt):
        # on a line of its own: Prefect's last log record on a dead API server ends without a newline
        print(f"\nlateflow {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if not isinstance(exc, (ValueError, OSError, RuntimeError)):
        raise exc
    # user-facing failures (bad input, missing index, offline model) get one clear line, not a traceback
    print(f"lateflow {args.command}: error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
