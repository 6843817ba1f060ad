"""``EmbeddingServicer``: proto ⇄ domain types, nothing else.

Why thin: every rule (limits, instruction policy, truncation, readiness) lives in the core, so
the HTTP facade cannot drift from gRPC. Handlers raise :mod:`service.errors` exceptions and the
``maps_errors`` decorators (service/grpc_status.py) turn them into status codes from the one table.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import struct_pb2

from service.domain import EmbedJob, EmbedResult, Encoding, InputType, ModelInfo, TokenizeJob, Truncation
from service.encoding import check_encoding, pack, packed_size
from service.errors import InvalidInput, TooManyInputs
from service.grpc_status import call_request_id, maps_errors, maps_stream_errors
from service.grpc_stream import EmbedStreamRun
from service.logs import REQUEST_ID_CHARS, REQUEST_ID_MAX_CHARS, is_safe_request_id, new_request_id
from service.models import ModelRegistry
from service.pb.embedding.v1 import embedding_pb2 as pb
from service.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc

INPUT_TYPES: dict[int, InputType] = {
    pb.INPUT_TYPE_UNSPECIFIED: "document",
    pb.INPUT_TYPE_QUERY: "query",
    pb.INPUT_TYPE_DOCUMENT: "document",
}
TRUNCATIONS: dict[int, Truncation | None] = {
    pb.TRUNCATION_UNSPECIFIED: None,
    pb.TRUNCATION_NONE: "none",
    pb.TRUNCATION_END: "end",
    pb.TRUNCATION_START: "start",
}
ENCODINGS: dict[int, Encoding] = {
    pb.ENCODING_UNSPECIFIED: "values",
    pb.ENCODING_VALUES: "values",
    pb.ENCODING_FLOAT32: "float32",
    pb.ENCODING_FLOAT16: "float16",
    pb.ENCODING_INT8: "int8",
    pb.ENCODING_BINARY: "binary",
}
ENCODING_ENUM: dict[Encoding, int] = {
    "values": pb.ENCODING_VALUES,
    "float32": pb.ENCODING_FLOAT32,
    "float16": pb.ENCODING_FLOAT16,
    "int8": pb.ENCODING_INT8,
    "binary": pb.ENCODING_BINARY,
}
TRUNCATION_ENUM = {"none": pb.TRUNCATION_NONE, "end": pb.TRUNCATION_END, "start": pb.TRUNCATION_START}

# Room for everything in an EmbedResponse except the embeddings (usage, timings, ids).
_ENVELOPE_BYTES = 1024
# Bytes around one Embedding besides its vector: index, counts, flags, tags and lengths.
_PER_EMBEDDING_BYTES = 32


def _enum(table: dict[int, Any], value: int, name: str) -> Any:
    if value not in table:
        raise InvalidInput(f"{name}={value} is not a known value", field=name)
    return table[value]


# Free text that is echoed, logged or put into error messages is capped before any work, so a client
# cannot make the server compute for nothing (an answer too big to send) or write megabytes into a
# log line. Task names are identifiers; instructions are a sentence or two in every bundle we know.
TASK_MAX_CHARS = 128
INSTRUCTION_MAX_CHARS = 8192


def check_text_fields(request: pb.EmbedRequest | pb.TokenizeRequest | pb.RerankRequest) -> None:
    """Refuse an unsafe ``request_id`` or an oversized ``task``/``instruction`` (never echoing them)."""
    rid = request.request_id
    if rid and not is_safe_request_id(rid):
        raise InvalidInput(
            f"request_id must be 1-{REQUEST_ID_MAX_CHARS} characters of {REQUEST_ID_CHARS} "
            f"(got {len(rid)} characters); omit it to get a generated one",
            field="request_id",
        )
    if len(request.task) > TASK_MAX_CHARS:
        raise InvalidInput(
            f"task names are at most {TASK_MAX_CHARS} characters (got {len(request.task)}); "
            "GetModelInfo lists the bundle's tasks",
            field="task",
        )
    if len(request.instruction) > INSTRUCTION_MAX_CHARS:
        raise InvalidInput(
            f"instruction is at most {INSTRUCTION_MAX_CHARS} characters (got {len(request.instruction)})",
            field="instruction",
        )


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:  # no deadline is reported as "very far away"
        return None
    return time.monotonic() + float(remaining)


def request_id_for(
    request: pb.EmbedRequest | pb.TokenizeRequest | pb.RerankRequest, index: int | None = None
) -> str:
    """The client's id, else the call's (chosen at the edge); stream message ``i`` gets ``<call>.<i>``."""
    if request.request_id:
        return request.request_id
    call = call_request_id.get() or new_request_id()
    return call if index is None else f"{call}.{index}"


def to_job(
    request: pb.EmbedRequest, context: grpc.aio.ServicerContext, index: int | None = None
) -> tuple[EmbedJob, Encoding]:
    check_text_fields(request)
    encoding: Encoding = _enum(ENCODINGS, request.encoding, "encoding")
    normalize = request.normalize if request.HasField("normalize") else True
    check_encoding(encoding, normalize=normalize)
    dimensions = request.dimensions if request.HasField("dimensions") else None
    if dimensions == 0:
        raise InvalidInput("dimensions must be at least 1 (omit it for all dimensions)", field="dimensions")
    job = EmbedJob(
        texts=tuple(request.inputs),
        token_ids=tuple(tuple(t.ids) for t in request.token_inputs),
        input_type=_enum(INPUT_TYPES, request.input_type, "input_type"),
        task=request.task or None,
        instruction=request.instruction or None,
        normalize=normalize,
        dimensions=dimensions,
        truncation=_enum(TRUNCATIONS, request.truncation, "truncation"),
        deadline=_deadline(context),
        request_id=request_id_for(request, index),
        model=request.model or None,
    )
    return job, encoding


def _embedding_messages(result: EmbedResult, encoding: Encoding) -> list[pb.Embedding]:
    blobs = pack(result.vectors, encoding) if encoding != "values" else None
    out = []
    for index, tokenized in enumerate(result.inputs):
        message = pb.Embedding(
            index=index,
            token_count=tokenized.token_count,
            truncated=tokenized.truncated,
            dropped_tokens=tokenized.dropped_tokens,
        )
        if blobs is None:
            message.values.extend(result.vectors[index].tolist())
        else:
            message.packed = blobs[index]
        out.append(message)
    return out


def to_responses(
    result: EmbedResult, encoding: Encoding, *, request_index: int = 0, max_bytes: int | None = None
) -> list[pb.EmbedResponse]:
    """One response, or several when ``max_bytes`` would be passed (offset/count/part/last say which)."""
    embeddings = _embedding_messages(result, encoding)
    budget = (
        None
        if max_bytes is None
        else max_bytes - _ENVELOPE_BYTES - len(result.request_id) - len(result.model)
    )
    groups: list[list[pb.Embedding]] = [[]]
    size = 0
    for message in embeddings:
        cost = message.ByteSize() + 6  # field tag + length varint
        if budget is not None and groups[-1] and size + cost > budget:
            groups.append([])
            size = 0
        groups[-1].append(message)
        size += cost
    responses, offset = [], 0
    for part, group in enumerate(groups):
        last = part == len(groups) - 1
        response = pb.EmbedResponse(
            embeddings=group,
            model=result.model,
            request_id=result.request_id,
            dimensions=result.dimensions,
            encoding=ENCODING_ENUM[encoding],  # type: ignore[arg-type]  # proto enum values are ints
            request_index=request_index,
            offset=offset,
            count=len(group),
            part=part,
            last=last,
        )
        if last:
            u, t = result.usage, result.timings
            response.usage.CopyFrom(
                pb.Usage(
                    input_tokens=u.input_tokens,
                    total_tokens=u.total_tokens,
                    truncated_inputs=u.truncated_inputs,
                )
            )
            response.timings.CopyFrom(
                pb.Timings(
                    queue_ms=t.queue_ms,
                    tokenize_ms=t.tokenize_ms,
                    inference_ms=t.inference_ms,
                    total_ms=t.total_ms,
                )
            )
        responses.append(response)
        offset += len(group)
    return responses


def info_message(info: ModelInfo) -> pb.GetModelInfoResponse:
    validation = struct_pb2.Struct()
    validation.update(info.validation)
    lim, st = info.limits, info.self_test
    return pb.GetModelInfoResponse(
        model=info.model,
        model_id=info.model_id,
        source_kind=info.source_kind,
        source_id=info.source_id,
        source_revision=info.source_revision or "",
        family=info.family,
        model_type=info.model_type,
        dimensions=info.dimensions,
        max_input_tokens=info.max_input_tokens,
        pooling=info.pooling,
        attention=info.attention,
        precision=info.precision,
        execution_providers=list(info.execution_providers),
        bundle_sha256=info.bundle_sha256,
        tasks=[pb.Task(name=k, instruction=v) for k, v in sorted(info.tasks.items())],
        default_task=info.default_task or "",
        query_template=info.query_template or "",
        limits=pb.Limits(
            max_inputs_per_request=lim.max_inputs_per_request,
            max_input_tokens=lim.max_input_tokens,
            max_batch_tokens=lim.max_batch_tokens,
            max_batch_size=lim.max_batch_size,
            max_queue_tokens=lim.max_queue_tokens,
            max_message_bytes=lim.max_message_bytes,
            default_truncation=TRUNCATION_ENUM[lim.default_truncation],
            allow_dimensions=lim.allow_dimensions,
        ),
        validation=validation,
        self_test=pb.SelfTest(
            ran=st.ran,
            passed=st.passed,
            vectors=st.vectors,
            min_cosine=st.min_cosine,
            threshold=st.threshold,
            message=st.message,
        ),
        batch_invariant=info.batch_invariant,
        matryoshka=info.matryoshka,
        encodings=[ENCODING_ENUM[e] for e in info.encodings],  # type: ignore[misc]
    )


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(self, core: ModelRegistry, max_message_bytes: int) -> None:
        # The registry: ``embed``/``tokenize``/``model_info`` pick the model the request names.
        self._core = core
        self._max_bytes = max_message_bytes

    def _check_unary_size(self, job: EmbedJob, encoding: Encoding) -> None:
        """Refuse before computing a unary answer that could not be sent (streams split instead)."""
        dims = job.dimensions or self._core.get(job.model).dimensions
        per_input = packed_size(encoding, dims) + _PER_EMBEDDING_BYTES
        fits = max(1, (self._max_bytes - _ENVELOPE_BYTES) // per_input)
        if job.count > fits:
            raise TooManyInputs(
                f"{job.count} vectors of {dims} dims ({encoding}) would exceed the {self._max_bytes}-byte "
                f"message limit (at most {fits} fit); use EmbedStream, fewer inputs or a packed encoding",
                field="inputs",
            )

    @maps_errors
    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        job, encoding = to_job(request, context)
        self._check_unary_size(job, encoding)
        result = await self._core.embed(job)
        (response,) = to_responses(result, encoding)
        return response

    @maps_stream_errors
    async def EmbedStream(
        self, request_iterator: AsyncIterator[pb.EmbedRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EmbedResponse]:
        """Answers in request order; the rules (no lost answer, flow control) are in grpc_stream."""

        async def answer(request: pb.EmbedRequest, index: int) -> list[pb.EmbedResponse]:
            job, encoding = to_job(request, context, index)
            result = await self._core.embed(job)
            return to_responses(result, encoding, request_index=index, max_bytes=self._max_bytes)

        async for response in EmbedStreamRun(request_iterator, answer).responses():
            yield response

    @maps_errors
    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        check_text_fields(request)
        job = TokenizeJob(
            texts=tuple(request.inputs),
            input_type=_enum(INPUT_TYPES, request.input_type, "input_type"),
            task=request.task or None,
            instruction=request.instruction or None,
            truncation=_enum(TRUNCATIONS, request.truncation, "truncation"),
            request_id=request_id_for(request),
            return_tokens=request.return_tokens,
            model=request.model or None,
        )
        result = await self._core.tokenize(job)
        inputs = [
            pb.TokenizedInput(
                index=i,
                ids=list(t.ids),
                token_count=t.token_count,
                truncated=t.truncated,
                dropped_tokens=t.dropped_tokens,
                tokens=list(result.tokens[i]) if result.tokens else [],
            )
            for i, t in enumerate(result.inputs)
        ]
        return pb.TokenizeResponse(
            inputs=inputs, model=result.model, total_tokens=result.total_tokens, request_id=result.request_id
        )

    @maps_errors
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return info_message(self._core.model_info(request.model or None))

    @maps_errors
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[info_message(info) for info in self._core.model_infos()],
            default_model=self._core.default.model_name,
            aliases=[pb.ModelAlias(alias=a, model=m) for a, m in sorted(self._core.aliases().items())],
        )
