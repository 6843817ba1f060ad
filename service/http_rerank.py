"""The rerank wire format RAG frameworks send (Cohere / Jina style) ⇄ :class:`~service.rerank.RerankJob`.

Why pure and apart from ``http.py``: like ``http_schema`` for embeddings, the body has small cases
(documents as strings or ``{"text": ...}`` objects, optional ``top_n``) that are cheapest to test
without a server; ``http.py`` only routes. Accepted shapes and their differences from Cohere v1/v2,
Jina and TEI are listed in docs/http.md ("Rerank").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from service.domain import Truncation
from service.errors import InvalidInput
from service.http_schema import _choice, _is_int, _optional_str, _text
from service.rerank import RerankJob, RerankResult

# Cohere / Jina / vLLM's common fields, then ours (as on /v1/embeddings). Anything else is refused:
# a field we would ignore (Cohere's rank_fields, max_tokens_per_doc) changes what a client expects.
RERANK_FIELDS = frozenset({"query", "documents", "top_n", "return_documents", "model"})
EXTRA_FIELDS = frozenset({"task", "instruction", "truncation"})
_TRUNCATIONS: tuple[Truncation, ...] = ("none", "end", "start")


@dataclass(frozen=True)
class RerankRequestBody:
    """A parsed ``POST /v1/rerank`` body."""

    job: RerankJob
    model: str | None
    return_documents: bool


def _document(value: object, index: int) -> str:
    """A string, or Cohere v1's / Jina's ``{"text": "..."}`` object."""
    param = f"documents[{index}]"
    if isinstance(value, Mapping) and set(value) == {"text"}:
        value = value["text"]
    if not isinstance(value, str):
        raise InvalidInput(f"'{param}' must be a string (or an object {{\"text\": string}})", field=param)
    return _text(value, param)


def parse_rerank_request(body: object, request_id: str, deadline: float | None = None) -> RerankRequestBody:
    """Validate the JSON body's structure; the core applies the semantic rules (limits, empties)."""
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    fields = cast("dict[str, Any]", body)
    unknown = sorted(set(fields) - RERANK_FIELDS - EXTRA_FIELDS)
    if unknown:
        raise InvalidInput(f"unknown parameter '{unknown[0]}'", field=unknown[0])
    query = fields.get("query")
    if not isinstance(query, str):
        raise InvalidInput("'query' is required and must be a string", field="query")
    documents = fields.get("documents")
    if not isinstance(documents, list):
        raise InvalidInput("'documents' is required and must be a list of strings", field="documents")
    top_n = fields.get("top_n")
    if top_n is not None and not (_is_int(top_n) and top_n >= 1):
        raise InvalidInput("'top_n' must be a positive integer (omit it for all documents)", field="top_n")
    return_documents = fields.get("return_documents", False)
    if not isinstance(return_documents, bool):
        raise InvalidInput("'return_documents' must be true or false", field="return_documents")
    job = RerankJob(
        query=_text(query, "query"),
        documents=tuple(_document(d, i) for i, d in enumerate(documents)),
        top_n=cast("int | None", top_n),
        task=_optional_str(fields, "task"),
        instruction=_optional_str(fields, "instruction"),
        truncation=cast("Truncation | None", _choice(fields, "truncation", _TRUNCATIONS)),
        deadline=deadline,
        request_id=request_id,
    )
    return RerankRequestBody(job, _optional_str(fields, "model"), return_documents)


def rerank_response(
    result: RerankResult, documents: tuple[str, ...], *, return_documents: bool, model: str
) -> dict[str, Any]:
    """Cohere's / Jina's shape: ``id``, ``results`` best first, ``document`` as ``{"text"}``; plus
    ``model`` and OpenAI-style ``usage`` (Jina's ``usage.total_tokens``)."""
    results: list[dict[str, Any]] = []
    for ranked in result.ranked:
        item: dict[str, Any] = {"index": ranked.index, "relevance_score": ranked.score}
        if return_documents:
            item["document"] = {"text": documents[ranked.index]}
        results.append(item)
    usage = result.usage
    return {
        "id": result.request_id,
        "model": model,
        "results": results,
        "usage": {"prompt_tokens": usage.input_tokens, "total_tokens": usage.total_tokens},
    }
