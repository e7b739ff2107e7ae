"""Bounded load test of the HTTP service, with an index swap in the middle.

Run::

    .venv/bin/python -m evaluation.benchmarks.loadtest --index idx/limit-small [--clients 32] [--seconds 60]

What it does, on loopback only, and then stops by itself:

1. Takes a second index version: ``--swap-to DIR2``, or else builds one from the corpus recorded in
   the first index's manifest with the same settings but FDE seed + 1 (a genuinely different FDE and
   ANN, so a different ``index_id``; the first index's shard cache is copied so no text is
   re-encoded).
2. Serves a symlink ``current -> DIR`` with ``lateflow serve`` in a subprocess (bearer token on, as in
   production), and waits for ``/ready``.
3. Runs ``--clients`` threads, each with its own keep-alive connection, sending ``POST /search``
   back to back for ``--seconds`` seconds (queries from the dataset's ``queries.jsonl`` when it sits
   beside the corpus, else ``--queries``, else word windows from the indexed text).
4. Half-way, re-points the symlink to the second version and swaps it in with ``POST /reload``
   (``--swap-via reload``, default) or lets the manifest watcher find it (``--swap-via watch``).
5. Stops the clients and the server and prints: requests, failures, throughput, latency p50 / p90 /
   p99 / max (overall and for requests started during the swap), the swap time, and how many answers
   each version gave. Exits 1 if any request failed or the new version never answered.

A failure is any transport error, timeout, non-200 status or response without results. Client
threads and the server share the machine's cores, so throughput is a floor for a separate client.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.settings import apply_quiet_defaults

apply_quiet_defaults()


@dataclass
class Outcome:
    """One request: when it started (s since the load began), its latency, and what came back."""

    started: float
    latency_ms: float
    ok: bool
    index_id: str | None = None
    error: str | None = None


@dataclass
class SwapRecord:
    started: float | None = None
    finished: float | None = None
    seconds: float | None = None
    result: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    """A free loopback port (bound and released; the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def point(link: Path, target: Path) -> None:
    """Re-point a symlink atomically (``ln -sfn``): readers see the old or the new target, never none."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.resolve(), target_is_directory=True)
    os.replace(tmp, link)


def _inferred_shard_size(index_dir: Path) -> int:
    """The shard size the index was built with (not in the manifest): the largest cached docs shard."""
    import pyarrow.parquet as pq

    from flows.index import IndexConfig

    rows = [pq.ParquetFile(p).metadata.num_rows for p in (index_dir / ".cache").glob("docs-*.parquet")]
    return max(rows) if rows else IndexConfig().shard_size


def build_variant(index_dir: Path, out: Path) -> Path:
    """Build a second version of ``index_dir`` (same corpus and settings, FDE seed + 1) into ``out``."""
    from flows.index import FDEParams, IndexConfig, index_flow
    from tasks.ann import ANNConfig
    from tasks.chunk import ChunkConfig

    manifest = json.loads((index_dir / "manifest.json").read_text(encoding="utf-8"))
    corpus = Path(manifest["corpus"]["path"])
    if not corpus.exists():
        raise SystemExit(f"loadtest: the corpus {corpus} recorded in {index_dir}/manifest.json is gone; pass --swap-to DIR2")
    fde, enc, spec = manifest["fde"], manifest["encoding"], manifest["model"].get("spec")
    config = IndexConfig(
        model=None if spec in (None, "default") else spec,
        chunk=ChunkConfig(**manifest["chunking"]),
        precision=enc["precision"],
        drop_punctuation=enc["drop_punctuation"],
        batch_tokens=enc.get("batch_tokens", IndexConfig().batch_tokens),
        fde=FDEParams(repetitions=fde["repetitions"], simhash_bits=fde["simhash_bits"], projection_dim=fde["projection_dim"], final_dim=fde["final_dim"], seed=fde["seed"] + 1,
                      fill_empty_partitions=fde.get("fill_empty_partitions", True)),
        ann=ANNConfig(kind=manifest["ann"].get("kind", "auto")),
        shard_size=_inferred_shard_size(index_dir),
    )
    if (index_dir / ".cache").is_dir():
        # chunk and token shards are keyed by content and settings, so the copy is reused as is
        shutil.copytree(index_dir / ".cache", out / ".cache")
    index_flow(str(corpus), str(out), config)
    return out


def load_queries(index_dir: Path, queries_file: Path | None, rng: random.Random, n: int = 500) -> list[str]:
    """Query texts: ``--queries`` (jsonl with ``text`` or plain lines), the corpus's queries.jsonl, or text windows."""
    candidates = [queries_file] if queries_file else []
    manifest = json.loads((index_dir / "manifest.json").read_text(encoding="utf-8"))
    corpus = Path(manifest.get("corpus", {}).get("path", ""))
    candidates.append((corpus if corpus.is_dir() else corpus.parent) / "queries.jsonl")
    for path in candidates:
        if path and path.is_file():
            texts = []
            for line in path.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line:
                    texts.append(json.loads(line)["text"] if line.startswith("{") else line)
            if texts:
                return rng.sample(texts, min(n, len(texts)))
    import pyarrow.parquet as pq

    # the manifest lists every artifact (in a versioned index, under the current version's folder)
    chunks = next((name for name in manifest.get("files", {}) if name.endswith("chunks.parquet")), "chunks.parquet")
    words = [t.split() for t in pq.read_table(index_dir / chunks, columns=["text"]).column("text").to_pylist()]
    words = [w for w in words if len(w) >= 3]
    out = []
    for _ in range(n):
        w = rng.choice(words)
        size = rng.randint(3, min(8, len(w)))
        start = rng.randint(0, len(w) - size)
        out.append(" ".join(w[start : start + size]))
    return out


def wait_ready(url: str, headers: dict[str, str], proc: subprocess.Popen, log: Path, timeout: float = 300) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"loadtest: the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            r = httpx.get(url + "/ready", headers=headers, timeout=5)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"loadtest: the server was not ready after {timeout:g} s:\n{log.read_text()[-3000:]}")


def client_loop(url: str, headers: dict[str, str], queries: list[str], k: int, t0: float, deadline: float, seed: int, out: list[Outcome]) -> None:
    """One client: back-to-back searches on one keep-alive connection until the deadline."""
    import httpx

    rng = random.Random(seed)
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        while time.perf_counter() < deadline:
            body = {"query": rng.choice(queries), "k": k}
            started = time.perf_counter()
            try:
                r = client.post("/search", json=body)
                latency = (time.perf_counter() - started) * 1000
                payload = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                ok = r.status_code == 200 and isinstance(payload.get("results"), list) and len(payload["results"]) > 0
                error = None if ok else f"HTTP {r.status_code}: {str(payload.get('error', r.text))[:200]}"
                out.append(Outcome(started - t0, latency, ok, payload.get("index_id"), error))
            except Exception as exc:  # every failure counts; none may stop the client early
                out.append(Outcome(started - t0, (time.perf_counter() - started) * 1000, False, None, f"{type(exc).__name__}: {exc}"[:200]))


def swap(url: str, headers: dict[str, str], link: Path, target: Path, via: str, new_id: str, t0: float, record: SwapRecord) -> None:
    """Deploy the second version: re-point the symlink, then reload (or wait for the watcher)."""
    import httpx

    record.started = time.perf_counter() - t0
    point(link, target)
    began = time.perf_counter()
    if via == "reload":
        r = httpx.post(url + "/reload", headers=headers, timeout=300)
        record.result = {"status_code": r.status_code, **r.json()}
    else:
        while time.perf_counter() - began < 300:
            ready = httpx.get(url + "/ready", headers=headers, timeout=30).json()
            if ready.get("index_id") == new_id:
                record.result = ready.get("last_reload") or {}
                break
            time.sleep(0.05)
    record.seconds = time.perf_counter() - began
    record.finished = time.perf_counter() - t0


def percentiles(values: list[float]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "max": float("nan")}
    arr = np.asarray(values)
    return {"p50": round(float(np.percentile(arr, 50)), 1), "p90": round(float(np.percentile(arr, 90)), 1), "p99": round(float(np.percentile(arr, 99)), 1), "max": round(float(arr.max()), 1)}


def summarise(outcomes: list[Outcome], seconds: float, record: SwapRecord, old_id: str, new_id: str) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    window = [o.latency_ms for o in ok if record.started is not None and record.finished is not None and record.started <= o.started <= record.finished + 1]
    first_new = min((o.started for o in ok if o.index_id == new_id), default=None)
    errors: dict[str, int] = {}
    for o in failed:
        errors[o.error or "?"] = errors.get(o.error or "?", 0) + 1
    return {
        "requests": len(outcomes),
        "failed": len(failed),
        "throughput_rps": round(len(ok) / seconds, 1),
        "latency_ms": percentiles([o.latency_ms for o in ok]),
        "latency_ms_during_swap": percentiles(window),
        "swap": {
            "started_s": round(record.started, 2) if record.started is not None else None,
            "seconds": round(record.seconds, 2) if record.seconds is not None else None,
            "first_answer_from_new_version_s": round(first_new, 2) if first_new is not None else None,
            "result": record.result,
        },
        "answers_per_version": {old_id: sum(o.index_id == old_id for o in ok), new_id: sum(o.index_id == new_id for o in ok)},
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10]),
    }


def render(report: dict[str, Any]) -> str:
    lat, win, sw = report["latency_ms"], report["latency_ms_during_swap"], report["swap"]
    lines = [
        f"load test: {report['clients']} clients x {report['seconds']:g} s, loopback, k={report['k']}, {report['machine']}",
        f"  requests   {report['requests']}  failed {report['failed']}  throughput {report['throughput_rps']} req/s",
        f"  latency ms p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}",
        f"  during swap p50 {win['p50']}  p99 {win['p99']}  max {win['max']}",
        f"  swap via {report['swap_via']} at {sw['started_s']} s: {sw['seconds']} s from deploy to swapped (load + warm-up beside the old version) "
        f"({sw['result'].get('status', '?')}); first answer from the new version at {sw['first_answer_from_new_version_s']} s",
        "  answers per version: " + ", ".join(f"{k} {v}" for k, v in report["answers_per_version"].items()),
    ]
    if report["errors"]:
        lines.append("  errors: " + "; ".join(f"{n} x {e}" for e, n in report["errors"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.benchmarks.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, required=True, help="index folder served first")
    parser.add_argument("--swap-to", type=Path, default=None, help="second index version swapped in half-way (default: build one, FDE seed + 1)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--seconds", type=float, default=60, help="duration of the load (default 60)")
    parser.add_argument("--k", type=int, default=10, help="documents per query (default 10)")
    parser.add_argument("--swap-via", choices=["reload", "watch"], default="reload", help="POST /reload (default) or the manifest watcher")
    parser.add_argument("--queries", type=Path, default=None, help="queries file (jsonl with 'text', or one per line)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query choice (default 0)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        parser.error("--clients and --seconds must be positive")

    from evaluation.machine import machine_line
    from storage.manifest import read_manifest

    v1 = args.index.resolve()
    old_id = read_manifest(v1)["index_id"]
    work = Path(tempfile.mkdtemp(prefix="lateflow-loadtest-"))
    proc = None
    try:
        if args.swap_to:
            v2 = args.swap_to.resolve()
        else:
            print(f"building a second index version from {v1} (FDE seed + 1) ...", flush=True)
            started = time.perf_counter()
            v2 = build_variant(v1, work / "v2")
            print(f"  built in {time.perf_counter() - started:.1f} s", flush=True)
        new_id = read_manifest(v2)["index_id"]
        if new_id == old_id:
            raise SystemExit(f"loadtest: {v2} has the same index_id as {v1}; nothing to swap")
        link = work / "current"
        point(link, v1)
        queries = load_queries(v1, args.queries, random.Random(args.seed))
        token = secrets.token_urlsafe(24)
        headers = {"Authorization": f"Bearer {token}"}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = work / "server.log"
        command = [
            sys.executable, "-m", "lateflow.cli", "serve", "--index", str(link), "--host", "127.0.0.1", "--port", str(port),
            "--watch-seconds", "1" if args.swap_via == "watch" else "0", "--log-level", "warning",
        ]
        with open(log, "w") as handle:
            proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "LATEFLOW_API_TOKEN": token})
        print(f"starting the service on {url} ...", flush=True)
        wait_ready(url, headers, proc, log)

        outcomes: list[list[Outcome]] = [[] for _ in range(args.clients)]
        record = SwapRecord()
        t0 = time.perf_counter()
        deadline = t0 + args.seconds
        clients = [
            threading.Thread(target=client_loop, args=(url, headers, queries, args.k, t0, deadline, args.seed + i + 1, outcomes[i]), daemon=True)
            for i in range(args.clients)
        ]
        for c in clients:
            c.start()
        time.sleep(args.seconds / 2)
        swapper = threading.Thread(target=swap, args=(url, headers, link, v2, args.swap_via, new_id, t0, record), daemon=True)
        swapper.start()
        for c in clients:
            c.join(timeout=max(0.0, deadline - time.perf_counter()) + 40)  # a request may time out at 30 s
        swapper.join(timeout=max(0.0, deadline - time.perf_counter()) + 300)
        elapsed = time.perf_counter() - t0

        report = {
            "clients": args.clients, "seconds": args.seconds, "k": args.k, "swap_via": args.swap_via, "machine": machine_line(),
            "old_index": str(v1), "new_index": str(v2), "elapsed_s": round(elapsed, 2),
            **summarise([o for per in outcomes for o in per], min(elapsed, args.seconds), record, old_id, new_id),
        }
        print(render(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        swapped = report["answers_per_version"][new_id] > 0
        if not swapped:
            print("loadtest: the new index version never answered", file=sys.stderr)
        return 0 if report["failed"] == 0 and swapped else 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
