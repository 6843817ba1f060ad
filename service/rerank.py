"""Rerank: order documents by the cosine of each to an instructed query, with the embedding model.

Why on top of ``embed`` rather than a model of its own: RAG frameworks call a rerank endpoint
after retrieval, and a bi-encoder ranks by exactly what retrieval used (query with its
instruction, documents as is). Going through ``EmbeddingCore.embed`` keeps every rule in one place:
limits, truncation, deadlines, the batcher (query and documents batch with all other traffic) and
the result cache. The two jobs (one query, the documents) run concurrently, so they can share a
batch. Both front ends (service/servicer.py's ``Rerank``, service/http_rerank.py) call
:func:`rerank`; errors keep their class (the one table) and name the rerank field at fault.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.domain import EmbedJob, EmbedResult, Timings, Truncation, Usage
from service.errors import EmbeddingError, InvalidInput


class Embedder(Protocol):
    async def embed(self, job: EmbedJob) -> EmbedResult: ...


@dataclass(frozen=True)
class RerankJob:
    """``top_n=None`` returns every document. ``task``/``instruction`` apply to the query only."""

    query: str
    documents: tuple[str, ...]
    top_n: int | None = None
    task: str | None = None
    instruction: str | None = None
    truncation: Truncation | None = None
    deadline: float | None = None
    request_id: str = ""
    # The served model (name or alias); None: the default model.
    model: str | None = None


@dataclass(frozen=True)
class Ranked:
    index: int  # position of the document in the request
    score: float  # cosine similarity to the query, in [-1, 1]


@dataclass(frozen=True)
class RerankResult:
    """Best first (ties keep request order); at most ``top_n`` entries."""

    ranked: tuple[Ranked, ...]
    usage: Usage
    timings: Timings
    model: str
    request_id: str


def _renamed(exc: EmbeddingError, name: str) -> EmbeddingError:
    """The core names its fields ``inputs[i]``; the rerank request calls them ``query`` / ``documents``."""
    if exc.field is not None and exc.field.startswith("inputs"):
        exc.field = name + exc.field[len("inputs") :] if name == "documents" else name
    return exc


def check_job(job: RerankJob) -> None:
    """What the core cannot see: its own checks cover counts, empty strings, task and lengths."""
    if not job.query:
        raise InvalidInput("query is empty: give the text to rank the documents against", field="query")
    if not job.documents:
        raise InvalidInput("documents is empty: give at least one document", field="documents")
    if job.top_n is not None and job.top_n < 1:
        raise InvalidInput("top_n must be at least 1 (omit it for all documents)", field="top_n")


async def _embed(core: Embedder, job: EmbedJob, name: str) -> EmbedResult:
    try:
        return await core.embed(job)
    except EmbeddingError as exc:
        raise _renamed(exc, name) from None


async def rerank(core: Embedder, job: RerankJob) -> RerankResult:
    """Embed the query (as a query) and the documents (as documents) concurrently; rank by cosine."""
    started = time.perf_counter()
    check_job(job)
    query_job = EmbedJob(
        texts=(job.query,),
        input_type="query",
        task=job.task,
        instruction=job.instruction,
        truncation=job.truncation,
        deadline=job.deadline,
        request_id=job.request_id,
        model=job.model,
    )
    docs_job = EmbedJob(
        texts=job.documents,
        input_type="document",
        truncation=job.truncation,
        deadline=job.deadline,
        request_id=job.request_id,
        model=job.model,
    )
    tasks = [
        asyncio.ensure_future(_embed(core, docs_job, "documents")),
        asyncio.ensure_future(_embed(core, query_job, "query")),
    ]
    try:
        docs, query = await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # one failed: the other's queued inputs are dropped, not computed
            task.cancel()
    # Both are L2-normalised float32 (normalize defaults to true): the dot product is the cosine.
    # Rounding can put the dot product of two unit vectors a few ulps past ±1; scores promise [-1, 1].
    scores = np.clip(docs.vectors @ query.vectors[0], -1.0, 1.0)
    order = np.argsort(-scores, kind="stable")
    if job.top_n is not None:
        order = order[: job.top_n]
    ranked = tuple(Ranked(int(i), float(scores[i])) for i in order)
    usage = Usage(
        input_tokens=docs.usage.input_tokens + query.usage.input_tokens,
        truncated_inputs=docs.usage.truncated_inputs + query.usage.truncated_inputs,
    )
    timings = Timings(
        queue_ms=max(docs.timings.queue_ms, query.timings.queue_ms),
        tokenize_ms=max(docs.timings.tokenize_ms, query.timings.tokenize_ms),
        inference_ms=max(docs.timings.inference_ms, query.timings.inference_ms),
        total_ms=(time.perf_counter() - started) * 1000.0,
    )
    return RerankResult(ranked, usage, timings, docs.model, docs.request_id)
