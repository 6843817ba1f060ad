"""``Rerank`` RPC: proto ⇄ :mod:`service.rerank`, nothing else.

Why a subclass of ``EmbeddingServicer`` in its own module: the servicer stays about Embed /
Tokenize / GetModelInfo, the rerank translation reuses its request checks (imports flow one way:
this module → servicer), and server.py registers this class instead.
"""

from __future__ import annotations

import grpc

from service.errors import TooManyInputs
from service.grpc_status import maps_errors
from service.pb.embedding.v1 import embedding_pb2 as pb
from service.rerank import Embedder, RerankJob, rerank
from service.servicer import (
    _ENVELOPE_BYTES,
    TRUNCATIONS,
    EmbeddingServicer,
    _deadline,
    _enum,
    check_text_fields,
    request_id_for,
)


async def rerank_rpc(
    core: Embedder, request: pb.RerankRequest, context: grpc.aio.ServicerContext
) -> pb.RerankResponse:
    check_text_fields(request)
    job = RerankJob(
        query=request.query,
        documents=tuple(request.documents),
        top_n=request.top_n if request.HasField("top_n") else None,
        task=request.task or None,
        instruction=request.instruction or None,
        truncation=_enum(TRUNCATIONS, request.truncation, "truncation"),
        deadline=_deadline(context),
        request_id=request_id_for(request),
        model=request.model or None,  # an unknown name: ModelNotFound (NOT_FOUND) from the registry
    )
    result = await rerank(core, job)
    u, t = result.usage, result.timings
    return pb.RerankResponse(
        results=[
            pb.RerankResult(
                index=r.index,
                relevance_score=r.score,
                document=request.documents[r.index] if request.return_documents else "",
            )
            for r in result.ranked
        ],
        usage=pb.Usage(
            input_tokens=u.input_tokens, total_tokens=u.total_tokens, truncated_inputs=u.truncated_inputs
        ),
        model=result.model,
        request_id=result.request_id,
        timings=pb.Timings(
            queue_ms=t.queue_ms, tokenize_ms=t.tokenize_ms, inference_ms=t.inference_ms, total_ms=t.total_ms
        ),
    )


# Bytes of one RerankResult besides its document text: index, score, tags and lengths.
_PER_RESULT_BYTES = 16


def check_response_size(request: pb.RerankRequest, max_bytes: int) -> None:
    """Echoed documents plus per-result fields can outgrow a request that was just under the limit:
    refuse before computing an answer that could not be sent (as ``Embed`` does)."""
    if not request.return_documents:
        return
    size = _ENVELOPE_BYTES + sum(len(d.encode()) + _PER_RESULT_BYTES for d in request.documents)
    if size > max_bytes:
        raise TooManyInputs(
            f"the answer with return_documents would be about {size} bytes, over the {max_bytes}-byte "
            "message limit; set return_documents=false (results carry each document's index) or send "
            "fewer documents",
            field="return_documents",
        )


class RerankingServicer(EmbeddingServicer):
    """``EmbeddingServicer`` plus the ``Rerank`` RPC."""

    @maps_errors
    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        check_response_size(request, self._max_bytes)
        return await rerank_rpc(self._core, request, context)
