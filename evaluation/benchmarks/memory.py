"""Memory: bytes per document of the token store, the FDEs and the FAISS index, and what compressing them costs.

Run (choose codec parameters on train, report on test; one heavy job at a time)::

    flock /tmp/lateflow-heavy.lock .venv/bin/python -m evaluation.benchmarks.memory ../shared/datasets/scifact \
        --index /work/idx/scifact --split train --max-queries 300 --fde-indexes \
        --out reports/benchmarks/memory-scifact-train.md
    flock /tmp/lateflow-heavy.lock .venv/bin/python -m evaluation.benchmarks.memory ../shared/datasets/scifact \
        --index /work/idx/scifact --split test --codecs float16 int8 int8-dim@99.99 int4-dim@99 pca192 pca256-int8 \
        --out reports/benchmarks/memory-scifact.md

It opens an index once and prints three tables (issue 7, "Memory"):

1. **Where the bytes are**: each artifact's bytes per document on disk and in memory (the token store
   is float16 on disk; ``LateIndex`` widens it to float32 in memory when that fits in a quarter of RAM).
2. **Token codecs**: for each candidate number format of the token store, its bytes per token as a
   share of float32, and nDCG@10 of ``maxsim-exact`` and ``fde-rerank`` (400 candidates) with the
   decoded tokens substituted into the opened index's in-memory store: exactly what an index built
   with that codec would answer, since the FDEs and the ANN are built from the float16 cache either
   way. Candidates: ``float16`` (the baseline); ``int8`` and ``int4`` (per-vector scale, not
   stored: rows are renormalised on decode; the kernels of :mod:`storage.token_codec`);
   ``int8-dim@P`` / ``int4-dim@P`` (one scale per dimension, the P-th percentile of |x|, values
   beyond it clipped); ``sign`` (one bit per value); ``pcaK`` (PCA fitted on the indexed tokens, K
   float16 coordinates; decoding ``mean + P z`` equals projecting the queries, up to a per-query
   constant that MaxSim ranking ignores); ``pcaK-int8`` (those coordinates in int8); ``pqM`` (FAISS
   product quantiser, M bytes per token).
   Fitted parameters come from 200,000 tokens sampled from the index. Also per codec: relative
   reconstruction error, encode and decode seconds for the whole store, agreement of each top-10
   with float16's, a paired t-test against float16, and the rerank cost per query if the store were
   kept compressed in memory and decoded per query (one thread; the engine today decodes at load).
3. **FDE index compression**: flat float32 (today), FAISS scalar quantisers (fp16, 8-bit), IVF-PQ
   (``tasks.ann``) and a binary index over the FDEs' sign bits (Hamming distance), each reranked by
   exact MaxSim as usual: bytes, nDCG@10 of ``fde-rerank``, recall of the exact top-10, latency.

Memory: the float16 store, one float32 decoded copy and one codec's codes are held at once (about
5 GB for scifact's 1.8M tokens).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evaluation.benchmarks import print_and_save, tuning_parser
from flows.settings import apply_quiet_defaults

apply_quiet_defaults()

DEPTH = 100
SAMPLE_TOKENS = 200_000
ERROR_TOKENS = 20_000
BLOCK_ROWS = 1 << 16
EXACT_BATCH = 16  # queries per brute-force pass: bounds the (rows x query tokens) similarity block
DEFAULT_CODECS = [
    "float16", "int8", "int8-dim@100", "int8-dim@99.99", "int8-dim@99.9",
    "int4", "int4-dim@99.9", "int4-dim@99", "int4-dim@98",
    "pca64", "pca96", "pca128", "pca192", "pca128-int8", "pca192-int8", "pca256-int8", "pq96", "sign",
]
DEFAULT_FDE_INDEXES = ["flat", "flat-fp16", "sq8", "ivfpq", "ivfpq-np64", "ivfpq-np128", "ivfpq256-np128", "binary", "binary@1600"]


# -- token codec candidates --------------------------------------------------------------------
@dataclass
class Resident:
    """How rerank would score against a store kept compressed in memory (decoded per query)."""

    store: np.ndarray  # one row per token, as held in memory
    query_map: Callable[[np.ndarray], np.ndarray]  # query tokens -> vectors to multiply stored rows with
    unpack: Callable[[np.ndarray], np.ndarray] | None = None  # gathered rows -> float32 (default: astype)
    row_scale: np.ndarray | None = None  # per-token multiplier of its similarities (per-vector scales)
    query_constant: Callable[[np.ndarray], float] | None = None  # score offset (PCA mean term)

    @property
    def bytes_per_token(self) -> float:
        extra = self.row_scale.itemsize if self.row_scale is not None else 0
        return self.store.itemsize * self.store.shape[1] + extra


@dataclass
class Candidate:
    """One token codec under study: per-token code size, fitted parameters, kernels."""

    name: str
    code_bytes: float  # bytes per token on disk
    param_bytes: int  # fitted parameters, once per index
    encode: Callable[[np.ndarray], np.ndarray]  # float32 rows -> codes
    decode: Callable[[np.ndarray], np.ndarray]  # codes -> float32 rows of the full dimension
    resident: Callable[[np.ndarray], Resident] | None = None  # codes of the whole store -> Resident


def _dim_scales(sample: np.ndarray, percentile: float) -> np.ndarray:
    scales = np.percentile(np.abs(sample), percentile, axis=0).astype(np.float32)
    return np.where(scales > 0, scales, 1.0).astype(np.float32)  # a dead dimension: any scale works


def _float16() -> Candidate:
    return Candidate(
        "float16", 2.0, 0, lambda x: x.astype(np.float16), lambda c: c.astype(np.float32),
        resident=lambda codes: Resident(codes, lambda q: q),
    )


def _per_vector(codec: str, dim: int) -> Candidate:
    """A codec of :mod:`storage.token_codec` (per-vector scale, not stored: rows renormalised on decode)."""
    from storage import token_codec

    spec = token_codec.get_codec(codec)
    unpack = (lambda c: token_codec.unpack_int4(c, dim)) if spec.values_per_item == 2 else None

    def resident(codes: np.ndarray) -> Resident:
        # kept compressed, a row's similarities are scaled by 1 / ||codes|| (float32 per token in memory)
        inv = np.empty(len(codes), np.float32)
        for lo in range(0, len(codes), BLOCK_ROWS):
            block = codes[lo : lo + BLOCK_ROWS]
            inv[lo : lo + BLOCK_ROWS] = 1.0 / np.maximum(np.linalg.norm(unpack(block) if unpack else block.astype(np.float32), axis=1), 1e-12)
        return Resident(codes, lambda q: q, unpack=unpack, row_scale=inv)

    return Candidate(
        codec, spec.row_bytes(dim) / dim, 0, lambda x: token_codec.encode(x, codec), lambda c: token_codec.decode(c, codec, np.float32, dim), resident
    )


def _sign(dim: int) -> Candidate:
    """One bit per value: the sign, decoded as +-1/sqrt(dim) (a unit vector)."""
    unpack = lambda c: np.unpackbits(c, axis=1, count=dim).astype(np.float32) * 2 - 1  # noqa: E731
    return Candidate(
        "sign", 1 / 8, 0, lambda x: np.packbits(x > 0, axis=1), lambda c: unpack(c) / np.sqrt(dim),
        resident=lambda codes: Resident(codes, lambda q: q / np.sqrt(dim), unpack=unpack),
    )


def _scalar_dim(bits: int, percentile: float, sample: np.ndarray) -> Candidate:
    levels = 2 ** (bits - 1) - 1
    scales = _dim_scales(sample, percentile)
    step = scales / levels
    from storage.token_codec import pack_int4, unpack_int4

    dim = sample.shape[1]
    pack, unpack = (pack_int4, lambda c: unpack_int4(c, dim)) if bits == 4 else (lambda c: c, lambda c: c.astype(np.float32))

    def encode(x: np.ndarray) -> np.ndarray:
        return pack(np.clip(np.rint(x / step), -levels, levels).astype(np.int8))

    return Candidate(
        f"int{bits}-dim@{percentile:g}", bits / 8, scales.nbytes, encode, lambda c: unpack(c) * step,
        # a per-dimension scale folds into the query: <q, s * c> = <q * s, c>
        resident=lambda codes: Resident(codes, lambda q: q * step, unpack=unpack if bits == 4 else None),
    )


def _pca(k: int, bits: int | None, sample: np.ndarray) -> Candidate:
    mean = sample.mean(axis=0)
    _, vectors = np.linalg.eigh(np.cov((sample - mean).T))
    basis = np.ascontiguousarray(vectors[:, ::-1][:, :k], dtype=np.float32)  # (dim, k), largest variance first
    mean = mean.astype(np.float32)
    project = lambda x: (x - mean) @ basis  # noqa: E731
    name, param_bytes = f"pca{k}", basis.nbytes + mean.nbytes
    constant = lambda q: float((q @ mean).sum())  # noqa: E731  sum over query tokens of <q_i, mean>
    if bits is None:
        return Candidate(
            name, 2.0 * k / sample.shape[1], param_bytes, lambda x: project(x).astype(np.float16), lambda c: mean + c.astype(np.float32) @ basis.T,
            resident=lambda codes: Resident(codes, lambda q: q @ basis, query_constant=constant),
        )
    step = np.abs(project(sample)).max(axis=0) / 127
    return Candidate(
        f"{name}-int8", k / sample.shape[1], param_bytes + step.nbytes,
        lambda x: np.clip(np.rint(project(x) / step), -127, 127).astype(np.int8),
        lambda c: mean + (c.astype(np.float32) * step) @ basis.T,
        resident=lambda codes: Resident(codes, lambda q: (q @ basis) * step, query_constant=constant),
    )


def _pq(m: int, sample: np.ndarray) -> Candidate:
    import faiss

    quantizer = faiss.ProductQuantizer(sample.shape[1], m, 8)
    quantizer.train(np.ascontiguousarray(sample[:50_000]))  # PQ96 takes ~35 s on 50k tokens here
    return Candidate(
        f"pq{m}", m / sample.shape[1], quantizer.M * quantizer.ksub * quantizer.dsub * 4,
        lambda x: quantizer.compute_codes(np.ascontiguousarray(x, dtype=np.float32)), lambda c: quantizer.decode(c),
    )


def make_candidate(name: str, sample: np.ndarray) -> Candidate:
    """Build (and fit on ``sample``) the codec candidate called ``name`` (see the module docstring).

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(500, 64)).astype(np.float32)
    >>> x /= np.linalg.norm(x, axis=1, keepdims=True)
    >>> [(c.name, c.code_bytes * 64) for c in map(lambda n: make_candidate(n, x), ["int8", "int4-dim@99", "pca32-int8", "sign"])]
    [('int8', 64.0), ('int4-dim@99', 32.0), ('pca32-int8', 32.0), ('sign', 8.0)]
    >>> c = make_candidate("int8", x)
    >>> bool(np.abs(c.decode(c.encode(x)) - x).max() < 0.01)
    True
    """
    dim = sample.shape[1]
    if name == "float16":
        return _float16()
    if name in ("int8", "int4"):
        return _per_vector(name, dim)
    if name == "sign":
        return _sign(dim)
    if name.startswith(("int8-dim@", "int4-dim@")):
        return _scalar_dim(int(name[3]), float(name.split("@")[1]), sample)
    if name.startswith("pca"):
        k, _, suffix = name[3:].partition("-")
        return _pca(int(k), 8 if suffix == "int8" else None, sample)
    if name.startswith("pq"):
        return _pq(int(name[2:]), sample)
    raise ValueError(f"unknown codec candidate {name!r}")


# -- measuring ---------------------------------------------------------------------------------
@dataclass
class Queries:
    """The split's queries, encoded once, with what every codec is compared against."""

    qids: list[str]
    encoded: list[Any]
    candidates: list[np.ndarray]  # fde-rerank candidate documents per query (independent of the codec)
    qrels: Any
    runs: dict[str, Any] = field(default_factory=dict)  # ranx runs by system name, for the t-tests
    reference_top10: dict[str, list[set[int]]] = field(default_factory=dict)


def _rss() -> int:
    """Resident set size of this process, after Arrow hands its unused read buffers back."""
    import psutil
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    return psutil.Process().memory_info().rss


def _sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, size), replace=False))


def _encode_store(candidate: Candidate, original: np.ndarray) -> tuple[np.ndarray, float]:
    """Codes of the whole float16 store, block by block; and the seconds it took."""
    started = time.perf_counter()
    if candidate.name == "float16":
        return original, 0.0  # already stored as float16: no copy
    first = candidate.encode(original[:BLOCK_ROWS].astype(np.float32))
    codes = np.empty((len(original), *first.shape[1:]), dtype=first.dtype)  # filled in place: no second copy
    codes[:BLOCK_ROWS] = first
    for lo in range(BLOCK_ROWS, len(original), BLOCK_ROWS):
        codes[lo : lo + BLOCK_ROWS] = candidate.encode(original[lo : lo + BLOCK_ROWS].astype(np.float32))
    return codes, time.perf_counter() - started


def _decode_store(candidate: Candidate, codes: np.ndarray, out: np.ndarray) -> float:
    started = time.perf_counter()
    for lo in range(0, len(codes), BLOCK_ROWS):
        out[lo : lo + BLOCK_ROWS] = candidate.decode(codes[lo : lo + BLOCK_ROWS])
    return time.perf_counter() - started


def _ranked_run(index, qids: list[str], ranked: list[list[tuple[int, float]]]) -> dict[str, dict[str, float]]:
    return {qid: {index.doc_ids[d]: float(s) for d, s in r} for qid, r in zip(qids, ranked)}


def _exact(index, queries: Queries) -> list[list[tuple[int, float]]]:
    ranked = []
    for lo in range(0, len(queries.encoded), EXACT_BATCH):
        ranked += [[(d, s) for d, s, _ in r] for r in index.rank_exhaustive(queries.encoded[lo : lo + EXACT_BATCH], DEPTH)]
    return ranked


def _rerank(index, queries: Queries) -> list[list[tuple[int, float]]]:
    ranked = []
    for query, docs in zip(queries.encoded, queries.candidates):
        scores, _ = index.score_documents(query, docs)
        order = np.argsort(-scores, kind="stable")[:DEPTH]
        ranked.append([(int(docs[i]), float(scores[i])) for i in order])
    return ranked


def _top10_agreement(reference: list[set[int]], ranked: list[list[tuple[int, float]]]) -> float:
    return float(np.mean([len(ref & {d for d, _ in r[:10]}) / max(1, len(ref)) for ref, r in zip(reference, ranked)]))


def _score(index, queries: Queries, system: str, ranked: list[list[tuple[int, float]]]) -> dict[str, float]:
    from evaluation.scoring import score_run, to_run

    run = to_run(_ranked_run(index, queries.qids, ranked), system)
    queries.runs[system] = run
    return score_run(queries.qrels, run)


def _resident_scores(resident: Resident, query: np.ndarray, rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """MaxSim of one query against gathered sets, decoding the stored rows on the fly."""
    from tasks.rerank import maxsim_kernel

    stored = resident.store[rows]
    mapped = np.ascontiguousarray(resident.query_map(query), dtype=np.float32)
    if resident.row_scale is not None:
        scores = _maxsim_row_scaled(mapped, stored, resident.row_scale[rows], offsets, resident.unpack)
    else:
        # float32/float16/int8 rows are widened block by block inside the kernel
        scores = maxsim_kernel(mapped, resident.unpack(stored) if resident.unpack is not None else stored, offsets)
    return scores + resident.query_constant(query) if resident.query_constant is not None else scores


def _maxsim_row_scaled(query: np.ndarray, stored: np.ndarray, row_scale: np.ndarray, offsets: np.ndarray, unpack) -> np.ndarray:
    """MaxSim where each stored row's similarities are multiplied by its scale (per-vector codes).

    Scaling the (rows x query tokens) similarities costs ~20x less than scaling the decoded rows.
    """
    scores = np.full(len(offsets) - 1, -np.inf, dtype=np.float32)
    nonempty = np.flatnonzero(np.diff(offsets) > 0)
    for first in range(0, len(nonempty), 512):
        sets = nonempty[first : first + 512]
        lo, hi = int(offsets[sets[0]]), int(offsets[sets[-1] + 1])
        block = unpack(stored[lo:hi]) if unpack is not None else stored[lo:hi].astype(np.float32)
        sim = block @ query.T
        sim *= row_scale[lo:hi, None]
        scores[sets] = np.maximum.reduceat(sim, offsets[sets] - lo, axis=0).sum(axis=1)
    return scores


def _rerank_ms(index, resident: Resident, queries: Queries) -> float:
    """Median per-query cost of gathering and scoring every chunk of the candidates from ``resident`` (one thread)."""
    from threadpoolctl import threadpool_limits

    from tasks.rerank import gather_rows

    times = []
    with threadpool_limits(limits=1, user_api="blas"):
        for query, docs in zip(queries.encoded, queries.candidates):
            started = time.perf_counter()
            chunk_ids, _ = gather_rows(index.doc_chunk_offsets, docs)
            rows, offsets = gather_rows(index.tokens.offsets, chunk_ids)
            _resident_scores(resident, query.vectors, rows, offsets)
            times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times))


def measure_codec(index, queries: Queries, candidate: Candidate, original: np.ndarray, buffer: np.ndarray, error_rows: np.ndarray, docs: int) -> dict[str, Any]:
    """Encode the store, decode it into ``buffer`` (the index's in-memory store), score both systems."""
    codes, encode_s = _encode_store(candidate, original)
    decode_s = _decode_store(candidate, codes, buffer)
    index.tokens.vectors = buffer
    reference = original[error_rows].astype(np.float32)
    error = float(np.mean(np.linalg.norm(buffer[error_rows] - reference, axis=1) / np.linalg.norm(reference, axis=1)))
    n_tokens, dim = original.shape
    row = {
        "codec": candidate.name,
        "bytes_per_token": candidate.code_bytes * dim,
        "share_of_float32": candidate.code_bytes / 4,
        "param_bytes": candidate.param_bytes,
        "vector_bytes_per_doc": (candidate.code_bytes * dim * n_tokens + candidate.param_bytes) / docs,
        "relative_error": error,
        "encode_s": encode_s,
        "decode_s": decode_s,
    }
    for system, ranker in (("maxsim-exact", _exact), ("fde-rerank", _rerank)):
        ranked = ranker(index, queries)
        scores = _score(index, queries, f"{system}:{candidate.name}", ranked)
        row[system] = scores
        # the first codec measured (float16) sets the reference top-10 of each system
        reference_top = queries.reference_top10.setdefault(system, [{d for d, _ in r[:10]} for r in ranked])
        row[system]["top10_agreement"] = _top10_agreement(reference_top, ranked)
    if candidate.resident is not None:
        resident = candidate.resident(codes)
        row["resident_bytes_per_token"] = resident.bytes_per_token
        row["rerank_ms_resident"] = _rerank_ms(index, resident, queries)
    print(
        f"{candidate.name}: exact {row['maxsim-exact']['ndcg@10']:.4f} rerank {row['fde-rerank']['ndcg@10']:.4f} "
        f"err {error:.4f} ({encode_s:.0f}+{decode_s:.0f} s)",
        flush=True,
    )
    return row


def _t_tests(queries: Queries, codecs: list[str]) -> dict[str, dict[str, float]]:
    """p-value (paired t-test, Bonferroni over the codecs) of each codec against float16, per system."""
    from evaluation.scoring import significance

    out: dict[str, dict[str, float]] = {}
    for system in ("maxsim-exact", "fde-rerank"):
        runs = {c: queries.runs[f"{system}:{c}"] for c in codecs}
        for codec, run in runs.items():
            run.name = codec  # ranx pairs runs by name
        result = significance(queries.qrels, runs, "float16", metrics=("ndcg@10",))
        for codec, facts in result.get("systems", {}).items():
            out.setdefault(codec, {})[system] = facts["ndcg@10"]["p_bonferroni"]
    return out


# -- the index's footprint ---------------------------------------------------------------------
def footprint(index, rss_growth: int) -> dict[str, Any]:
    """Bytes per document of each artifact on disk, and of what a loaded index holds in memory."""
    docs, n_tokens, dim = len(index.doc_ids), len(index.tokens.token_ids), index.tokens.vectors.shape[1]
    disk = {name: facts["bytes"] for name, facts in index.manifest["files"].items()}
    ann_bytes = disk.get("ann.faiss", 0)
    memory = {
        "token vectors, float32 (token_memory auto on this machine)": n_tokens * dim * 4,
        "token vectors, float16 (token_memory float16)": n_tokens * dim * 2,
        "token ids + offsets": index.tokens.token_ids.nbytes + index.tokens.offsets.nbytes,
        "FAISS index (flat float32 FDEs)": ann_bytes,
    }
    return {
        "docs": docs,
        "chunks": index.tokens.n_chunks,
        "tokens": n_tokens,
        "dim": dim,
        "fde_dim": int(index.ann.d),
        "disk_bytes": disk,
        "memory_bytes": memory,
        "rss_growth_open_float16": rss_growth,
    }


def measure_files(source: Path) -> dict[str, Any]:
    """Real tokens.parquet sizes and load times (float32 in memory) of a float16 file and an int8 copy of it.

    Runs in a child process (see :func:`study`), so the stores it loads never add to the study's memory.
    """
    from storage import index_files as files

    workdir = Path(tempfile.mkdtemp(prefix="lateflow-memory-"))
    target = workdir / "tokens-int8.parquet"
    started = time.perf_counter()
    files.transcode_token_file(source, target, "int8")
    transcode_s = time.perf_counter() - started
    out = {"transcode_int8_s": transcode_s}
    for codec, path in (("float16", source), ("int8", target)):
        started = time.perf_counter()
        store = files.read_token_store(path, np.float32)
        out[codec] = {"bytes": path.stat().st_size, "load_float32_s": time.perf_counter() - started}
        del store
    target.unlink()
    workdir.rmdir()
    return out


# -- FDE index compression ---------------------------------------------------------------------
class SignBitIndex:
    """A FAISS binary index over the FDEs' sign bits that answers like a float index (higher is better).

    Query FDEs have exact zeros in empty partitions; their bit is 0 like a negative value's.

    Examples
    --------
    >>> fde = np.array([[1.0, -2.0, 3.0, 0.5] * 4, [-1.0, 2.0, -3.0, 0.5] * 4], dtype=np.float32)
    >>> scores, ids = SignBitIndex(fde).search(fde[:1], 2)
    >>> ids.tolist(), scores.tolist()
    ([[0, 1]], [[-0.0, -12.0]])
    """

    def __init__(self, fde: np.ndarray) -> None:
        import faiss

        self.d = fde.shape[1]
        self.index = faiss.IndexBinaryFlat(self.d)
        self.index.add(np.packbits(fde > 0, axis=1))
        self.ntotal = self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        distances, ids = self.index.search(np.packbits(queries > 0, axis=1), k)
        return -distances.astype(np.float32), ids

    def nbytes(self) -> int:
        import faiss

        return int(faiss.serialize_index_binary(self.index).size)


def build_fde_index(kind: str, fde: np.ndarray) -> tuple[Any, int, int]:
    """(index, bytes serialised, rerank candidates) for an FDE index kind of :data:`DEFAULT_FDE_INDEXES`.

    ``KIND@N`` reranks N candidates instead of the engine's default.
    """
    import faiss

    from lateflow.engine import DEFAULT_CANDIDATES
    from tasks.ann import ANNConfig, build_ann

    name, _, count = kind.partition("@")
    candidates = int(count) if count else DEFAULT_CANDIDATES
    if name == "binary":
        index = SignBitIndex(fde)
        return index, index.nbytes(), candidates
    if name == "flat":
        index, _ = build_ann(fde, ANNConfig(kind="flat"))
    elif name in ("flat-fp16", "sq8"):
        qtype = faiss.ScalarQuantizer.QT_fp16 if name == "flat-fp16" else faiss.ScalarQuantizer.QT_8bit
        index = faiss.IndexScalarQuantizer(fde.shape[1], qtype, faiss.METRIC_INNER_PRODUCT)
        index.train(fde)
        index.add(fde)
    elif name.startswith("ivfpq"):  # ivfpq[M][-npN]: M sub-quantisers (default 64), N lists probed (default 16)
        subquantizers, _, nprobe = name[5:].partition("-np")
        index, _ = build_ann(fde, ANNConfig(kind="ivfpq", pq_subquantizers=int(subquantizers or 64), ivf_nprobe=int(nprobe or 16)))
    else:
        raise ValueError(f"unknown FDE index kind {kind!r}")
    return index, int(faiss.serialize_index(index).size), candidates


def measure_fde_index(index, queries: Queries, kind: str, fde: np.ndarray) -> dict[str, Any]:
    """Swap the index's ANN for ``kind``; nDCG@10 of fde-rerank, recall of the exact top-10, latency."""
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    ann, nbytes, candidates = build_fde_index(kind, fde)
    build_s = time.perf_counter() - started
    saved, index.ann = index.ann, ann
    ranked, times = [], []
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            for query in queries.encoded:
                t0 = time.perf_counter()
                result = index.rank(query, DEPTH, candidates=candidates)
                times.append((time.perf_counter() - t0) * 1000)
                ranked.append([(d, s) for d, s, _ in result])
    finally:
        index.ann = saved
    row = {
        "index": kind,
        "bytes": nbytes,
        "bytes_per_doc": nbytes / len(index.doc_ids),
        "share_of_flat": nbytes / (fde.shape[0] * fde.shape[1] * 4),
        "build_s": build_s,
        "candidates": candidates,
        **_score(index, queries, f"fde-index:{kind}", ranked),
        "recall_exact_top10": _top10_agreement(queries.reference_top10["maxsim-exact"], ranked),
        "rank_ms_p50": float(np.median(times)),
    }
    print(f"FDE index {kind}: nDCG@10 {row['ndcg@10']:.4f} recall {row['recall_exact_top10']:.3f} {row['bytes_per_doc']:.0f} B/doc", flush=True)
    return row


# -- the study ---------------------------------------------------------------------------------
def study(
    dataset_dir: str, index_dir: str, split: str, codecs: list[str], fde_kinds: list[str], max_queries: int | None, transcode: bool
) -> dict[str, Any]:
    """Open the index once; measure its footprint, every token codec, then every FDE index kind."""
    from evaluation.datasets import load_dataset, subsample
    from evaluation.scoring import to_qrels
    from lateflow.engine import DEFAULT_CANDIDATES, LateIndex
    from storage import index_files as files

    codecs = ["float16", *[c for c in codecs if c != "float16"]]  # float16 first: the reference of every comparison
    from storage.manifest import resolve_index_dir

    stored = files.token_codec_of(resolve_index_dir(Path(index_dir)) / files.TOKENS_FILE)
    if stored != "float16":
        raise SystemExit(f"{index_dir}: its token store is {stored}; the study needs the encoder's float16 vectors (lateflow index --token-codec float16)")
    dataset = subsample(load_dataset(dataset_dir, split), max_queries)
    before = _rss()
    index = LateIndex.open(index_dir, token_memory="float16")
    report: dict[str, Any] = {"dataset": dataset.name, "split": split, "queries": len(dataset.queries), "candidates": DEFAULT_CANDIDATES}
    report["footprint"] = footprint(index, _rss() - before)
    original = index.tokens.vectors
    qids = list(dataset.queries)
    encoded = index.encode_many([dataset.queries[q] for q in qids])
    candidates = [index.candidate_documents(q, DEFAULT_CANDIDATES, min_docs=DEPTH) for q in encoded]
    queries = Queries(qids, encoded, candidates, to_qrels(dataset.qrels))
    if transcode:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # a fresh process: its loads start cold in memory terms, and their memory goes when it exits
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            report["files"] = pool.submit(measure_files, index.path / files.TOKENS_FILE).result()
    buffer = np.empty(original.shape, dtype=np.float32)  # the decoded store every codec is scored with
    baseline = Resident(buffer, lambda q: q)
    sample = original[_sample_rows(len(original), SAMPLE_TOKENS, seed=0)].astype(np.float32)
    error_rows = _sample_rows(len(original), ERROR_TOKENS, seed=1)
    rows = []
    for name in codecs:
        started = time.perf_counter()
        candidate = make_candidate(name, sample)
        fit_s = time.perf_counter() - started
        rows.append({**measure_codec(index, queries, candidate, original, buffer, error_rows, len(index.doc_ids)), "fit_s": fit_s})
        if name == "float16":
            report["rerank_ms_float32"] = _rerank_ms(index, baseline, queries)  # the engine's path today
    p_values = _t_tests(queries, codecs)
    for row in rows:
        row["p_bonferroni"] = p_values.get(row["codec"], {})
    report["codecs"] = rows
    if fde_kinds:
        _decode_store(make_candidate("float16", sample), original, buffer)  # rerank with the float16 store
        index.tokens.vectors = buffer
        del sample
        fde = files.read_fde(index.path / files.FDE_FILE)
        report["fde_indexes"] = [measure_fde_index(index, queries, kind, fde) for kind in fde_kinds]
    return report


# -- the report --------------------------------------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _kb(n: float) -> str:
    return f"{n / 1000:,.1f} kB" if n >= 1000 else f"{n:,.0f} B"


def render(report: dict[str, Any]) -> str:
    fp = report["footprint"]
    docs = fp["docs"]
    lines = [
        f"Memory study on {report['dataset']} ({report['split']}, {report['queries']} queries): {docs:,} docs, "
        f"{fp['chunks']:,} chunks, {fp['tokens']:,} tokens of dim {fp['dim']}, FDE dim {fp['fde_dim']:,}; "
        f"fde-rerank reranks {report['candidates']} ANN candidates.",
        "",
        "Where the bytes are (per document):",
        "",
        "| artifact | on disk | per doc |",
        "|---|---|---|",
    ]
    for name, nbytes in sorted(fp["disk_bytes"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {_mib(nbytes)} | {_kb(nbytes / docs)} |")
    lines += ["", "| held in memory by LateIndex | bytes | per doc |", "|---|---|---|"]
    for name, nbytes in fp["memory_bytes"].items():
        lines.append(f"| {name} | {_mib(nbytes)} | {_kb(nbytes / docs)} |")
    lines.append(f"| measured RSS growth of LateIndex.open(token_memory='float16') | {_mib(fp['rss_growth_open_float16'])} | {_kb(fp['rss_growth_open_float16'] / docs)} |")
    if "files" in report:
        f = report["files"]
        lines += [
            "",
            f"tokens.parquet as written: float16 {_mib(f['float16']['bytes'])} ({_kb(f['float16']['bytes'] / docs)}/doc), loaded as float32 in "
            f"{f['float16']['load_float32_s']:.1f} s; int8 {_mib(f['int8']['bytes'])} ({_kb(f['int8']['bytes'] / docs)}/doc, "
            f"{f['int8']['bytes'] / f['float16']['bytes']:.1%} of float16), loaded (decoded) as float32 in {f['int8']['load_float32_s']:.1f} s; "
            f"transcoding float16 -> int8 took {f['transcode_int8_s']:.1f} s.",
        ]
    base = next(r for r in report["codecs"] if r["codec"] == "float16")
    lines += [
        "",
        "Token codecs (nDCG@10 with the decoded store; delta relative to float16; p: paired t-test vs float16, Bonferroni; "
        "agree: share of float16's top-10 kept; rerank ms: per query, one thread, if the store stayed compressed in memory and were "
        f"decoded per query; decoded at load into float32, as the engine does, it is {report['rerank_ms_float32']:.1f} ms):",
        "",
        "| codec | B/token | vs float32 | vectors/doc | rel. error | maxsim-exact | delta | p | agree | fde-rerank | delta | p | agree "
        "| in-memory B/token | rerank ms | encode s | decode s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["codecs"]:
        cells = [r["codec"], f"{r['bytes_per_token']:.0f}", f"{r['share_of_float32']:.3f}", _kb(r["vector_bytes_per_doc"]), f"{r['relative_error']:.4f}"]
        for system in ("maxsim-exact", "fde-rerank"):
            ndcg, ref = r[system]["ndcg@10"], base[system]["ndcg@10"]
            p = r.get("p_bonferroni", {}).get(system)
            cells += [f"{ndcg:.4f}", f"{(ndcg - ref) / ref:+.2%}", "" if p is None else f"{p:.2f}", f"{r[system]['top10_agreement']:.3f}"]
        cells += [
            f"{r['resident_bytes_per_token']:.0f}" if "resident_bytes_per_token" in r else "—",
            f"{r['rerank_ms_resident']:.1f}" if "rerank_ms_resident" in r else "—",
            f"{r['encode_s'] + r.get('fit_s', 0):.1f}",
            f"{r['decode_s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("fde_indexes"):
        lines += [
            "",
            "FDE index compression (tokens float16; recall: share of maxsim-exact's top-10 in fde-rerank's top-10; ms: ANN + rerank per query, "
            "one thread, query encoding excluded):",
            "",
            "| FDE index | bytes | per doc | vs flat | build s | candidates | fde-rerank nDCG@10 | recall of exact top-10 | R@100 | ms p50 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["fde_indexes"]:
            lines.append(
                f"| {r['index']} | {_mib(r['bytes'])} | {_kb(r['bytes_per_doc'])} | {r['share_of_flat']:.4f} | {r['build_s']:.1f} | {r['candidates']} "
                f"| {r['ndcg@10']:.4f} | {r['recall_exact_top10']:.3f} | {r['recall@100']:.4f} | {r['rank_ms_p50']:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = tuning_parser(__doc__)
    parser.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS, help="token codec candidates (float16 is always measured, first)")
    parser.add_argument("--fde-indexes", nargs="*", default=DEFAULT_FDE_INDEXES, help="FDE index kinds (none: skip); KIND@N reranks N candidates")
    parser.add_argument("--no-transcode", action="store_true", help="skip writing an int8 tokens.parquet copy to measure its size and load time")
    args = parser.parse_args(argv)
    report = study(args.dataset, str(args.index), args.split, args.codecs, args.fde_indexes, args.max_queries, not args.no_transcode)
    print_and_save(render(report), report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
