"""Request and response models of the HTTP API (pydantic), with the configured limits built in.

The request models are made per app by :func:`request_models` so that the limits in force are the
ones the OpenAPI docs at ``/docs`` show. Unknown fields are refused (a typo such as ``"topk"`` is a
422, not a silently ignored option).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator
from pydantic_core import PydanticCustomError

from lateflow.engine import DEFAULT_CANDIDATES, DEFAULT_RERANK_SCOPE, RERANK_SCOPES, filter_keys
from service.limits import Limits
from tasks.prf import PRF_MODES, PRFConfig

_PRF = PRFConfig()
FilterScalar = Union[StrictStr, StrictInt, StrictFloat, StrictBool, None]


class PRFRequest(BaseModel):
    """ColBERT-PRF settings of one query (defaults: the paper's reference values)."""

    model_config = ConfigDict(extra="forbid")

    fb_docs: Annotated[int, Field(strict=True, ge=1, le=20, description="feedback documents")] = _PRF.fb_docs
    k: Annotated[int, Field(strict=True, ge=2, le=256, description="k-means clusters; must exceed fb_embs")] = _PRF.k
    fb_embs: Annotated[int, Field(strict=True, ge=1, le=128, description="expansion embeddings kept")] = _PRF.fb_embs
    beta: Annotated[float, Field(strict=True, ge=0, le=100, description="weight of expansion embeddings, times IDF")] = _PRF.beta
    mode: Literal[PRF_MODES] = Field(_PRF.mode, description="rerank the first pass, or retrieve again with the expanded query")  # type: ignore[valid-type]

    def config(self) -> PRFConfig:
        """The engine's :class:`PRFConfig` (raises ValueError for inconsistent values, e.g. k <= fb_embs)."""
        return PRFConfig(fb_docs=self.fb_docs, k=self.k, fb_embs=self.fb_embs, beta=self.beta, mode=self.mode)


def request_models(limits: Limits) -> tuple[type[BaseModel], type[BaseModel]]:
    """``(SearchRequest, BatchRequest)`` models enforcing ``limits``."""
    filter_value = Union[FilterScalar, list[FilterScalar]]

    class SearchRequest(BaseModel):
        """One query."""

        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"query": "Who likes Quokkas?", "k": 5}]})

        query: Annotated[str, Field(min_length=1, max_length=limits.max_query_chars, description="the query text")]
        k: Annotated[int, Field(strict=True, ge=1, le=limits.max_k, description="documents to return")] = 10
        candidates: Annotated[
            int, Field(strict=True, ge=1, le=limits.max_candidates, description="ANN chunk candidates reranked by exact MaxSim (raised to k if lower)")
        ] = DEFAULT_CANDIDATES
        scope: Literal[RERANK_SCOPES] = Field(  # type: ignore[valid-type]
            DEFAULT_RERANK_SCOPE, description="rerank every chunk of a candidate document, or only the chunks the ANN returned"
        )
        prf: Union[StrictBool, PRFRequest] = Field(False, description="ColBERT-PRF: true for the default settings, or an object of settings")
        filter: Annotated[
            dict[str, filter_value] | None,
            Field(
                max_length=limits.max_filter_fields,
                description='metadata filter: {"field": value} for equality, {"field": [v1, v2]} for any of; every field must match',
            ),
        ] = None

        @field_validator("query")
        @classmethod
        def _not_blank(cls, value: str) -> str:
            if not value.strip():
                raise ValueError("the query is empty (only whitespace)")
            return value

        @field_validator("filter", mode="wrap")
        @classmethod
        def _filter(cls, value: Any, handler: Any) -> Any:
            # checked by the engine's own rules first: one clear message instead of one per union branch
            if value is not None:
                try:
                    filter_keys(value)
                except ValueError as exc:
                    raise PydanticCustomError("filter_invalid", str(exc)) from None
                for name, wanted in value.items():
                    if isinstance(wanted, list) and len(wanted) > limits.max_filter_values:
                        raise PydanticCustomError(
                            "too_long", "filter field '{name}' lists {n} values; at most {limit} are allowed",
                            {"name": name, "n": len(wanted), "limit": limits.max_filter_values},
                        )
            return handler(value)

        def prf_config(self) -> PRFConfig | None:
            if self.prf is False:
                return None
            return (PRFRequest() if self.prf is True else self.prf).config()

    class BatchRequest(BaseModel):
        """Many queries, answered on one index version."""

        model_config = ConfigDict(extra="forbid")

        queries: Annotated[list[SearchRequest], Field(min_length=1, max_length=limits.max_batch, description="the queries, each with its own options")]

    return SearchRequest, BatchRequest


class Hit(BaseModel):
    """One document: its id and score, and its best chunk (text and offsets) for a RAG prompt."""

    doc_id: str
    score: float
    rank: int
    chunk_id: int
    text: str = Field(description="the best-scoring chunk of the document")
    char_start: int = Field(description="offset of the chunk in the document's title + newline + text")
    char_end: int
    title: str
    metadata: dict[str, Any] = Field(description="the corpus fields other than _id, title and text")


class SearchResponse(BaseModel):
    index_id: str = Field(description="manifest id of the index version that answered")
    took_ms: float
    results: list[Hit]


class BatchResponse(BaseModel):
    index_id: str
    took_ms: float
    results: list[list[Hit]] = Field(description="one ranked list per query, in request order")


class ReloadResponse(BaseModel):
    status: Literal["swapped", "unchanged"]
    index_id: str
    previous_index_id: str | None
    load_seconds: float
    trigger: str


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    index_id: str
    index_path: str
    documents: int
    chunks: int
    loaded_at: str
    watch_seconds: float | None
    last_reload: dict[str, Any] | None
    last_error: str | None = Field(None, description="why the last reload failed, while the version above keeps serving")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
