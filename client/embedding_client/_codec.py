"""Pure request/response logic shared by the sync and asyncio clients (no I/O here).

Vectors travel packed (little-endian float32 bytes) and are decoded with one ``numpy.frombuffer``
per response: repeated floats cost a Python float object per dimension on both ends.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import grpc
import numpy as np
import numpy.typing as npt

from embedding_client.errors import ServerError
from embedding_client.pb.embedding.v1 import embedding_pb2 as pb

InputType = Literal["document", "query"]
Truncation = Literal["none", "end", "start"]
Vectors = npt.NDArray[np.float32]

_INPUT_TYPES = {"document": pb.INPUT_TYPE_DOCUMENT, "query": pb.INPUT_TYPE_QUERY}
_TRUNCATIONS = {
    None: pb.TRUNCATION_UNSPECIFIED,
    "none": pb.TRUNCATION_NONE,
    "end": pb.TRUNCATION_END,
    "start": pb.TRUNCATION_START,
}
# Bytes a request/response spends beyond the texts or vectors themselves (ids, model name,
# usage, timings) and per item (field tags, lengths, index, token counts): generous on purpose,
# a chunk that is slightly too small costs nothing, one that is too big is refused.
_ENVELOPE = 4096
_PER_TEXT = 16
_PER_VECTOR = 48


@dataclass(frozen=True)
class EmbedParams:
    """The per-call options of ``embed`` (everything but the texts)."""

    input_type: InputType = "document"
    task: str | None = None
    instruction: str | None = None
    normalize: bool | None = None
    truncation: Truncation | None = None

    def __post_init__(self) -> None:
        if self.input_type not in _INPUT_TYPES:
            raise ValueError(f"input_type must be 'document' or 'query', not {self.input_type!r}")
        if self.truncation not in _TRUNCATIONS:
            raise ValueError(f"truncation must be None, 'none', 'end' or 'start', not {self.truncation!r}")


@dataclass(frozen=True)
class EmbedResult:
    """Vectors (n, dim) float32 in input order, plus what the server reported per input."""

    vectors: Vectors
    token_counts: npt.NDArray[np.uint32]
    truncated: npt.NDArray[np.bool_]

    @staticmethod
    def concat(parts: Sequence[EmbedResult], dims: int) -> EmbedResult:
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return EmbedResult(np.empty((0, dims), np.float32), np.empty(0, np.uint32), np.empty(0, np.bool_))
        return EmbedResult(
            np.concatenate([p.vectors for p in parts]),
            np.concatenate([p.token_counts for p in parts]),
            np.concatenate([p.truncated for p in parts]),
        )


@dataclass(frozen=True)
class ModelInfo:
    """What the server serves and its limits (``raw`` is the full ``GetModelInfoResponse``)."""

    model: str
    model_id: str
    dimensions: int
    max_input_tokens: int
    precision: str
    bundle_sha256: str
    tasks: dict[str, str]
    default_task: str
    max_inputs_per_request: int
    max_message_bytes: int
    raw: pb.GetModelInfoResponse = field(repr=False, compare=False)

    @staticmethod
    def from_proto(info: pb.GetModelInfoResponse) -> ModelInfo:
        return ModelInfo(
            model=info.model,
            model_id=info.model_id,
            dimensions=info.dimensions,
            max_input_tokens=info.max_input_tokens,
            precision=info.precision,
            bundle_sha256=info.bundle_sha256,
            tasks={t.name: t.instruction for t in info.tasks},
            default_task=info.default_task,
            max_inputs_per_request=info.limits.max_inputs_per_request or 256,
            max_message_bytes=info.limits.max_message_bytes or 4 << 20,
            raw=info,
        )


@dataclass(frozen=True)
class Tokenized:
    """One input as the model sees it: ids with special tokens and instruction, after truncation."""

    ids: list[int]
    token_count: int
    truncated: bool
    dropped_tokens: int
    tokens: list[str]


def new_request_id() -> str:
    return uuid.uuid4().hex


def texts_list(texts: Iterable[str]) -> list[str]:
    if isinstance(texts, str | bytes):
        raise TypeError("texts must be a list of strings, not a single string")
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
    return out


def embed_request(
    texts: Sequence[str], params: EmbedParams, request_id: str, model: str = ""
) -> pb.EmbedRequest:
    request = pb.EmbedRequest(
        model=model,
        inputs=texts,
        input_type=_INPUT_TYPES[params.input_type],
        task=params.task or "",
        instruction=params.instruction or "",
        truncation=_TRUNCATIONS[params.truncation],
        encoding=pb.ENCODING_FLOAT32,
        request_id=request_id,
    )
    if params.normalize is not None:
        request.normalize = params.normalize
    return request


def tokenize_request(
    texts: Sequence[str], params: EmbedParams, request_id: str, return_tokens: bool, model: str = ""
) -> pb.TokenizeRequest:
    return pb.TokenizeRequest(
        model=model,
        inputs=texts,
        input_type=_INPUT_TYPES[params.input_type],
        task=params.task or "",
        instruction=params.instruction or "",
        truncation=_TRUNCATIONS[params.truncation],
        request_id=request_id,
        return_tokens=return_tokens,
    )


def tokenized(response: pb.TokenizeResponse) -> list[Tokenized]:
    return [
        Tokenized(list(t.ids), t.token_count, t.truncated, t.dropped_tokens, list(t.tokens))
        for t in sorted(response.inputs, key=lambda t: t.index)
    ]


def _text_bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def chunks(texts: Sequence[str], info: ModelInfo) -> list[tuple[int, int]]:
    """``[start, end)`` ranges that each fit one request: input count, request and response size."""
    budget = info.max_message_bytes - _ENVELOPE
    per_vector = info.dimensions * 4 + _PER_VECTOR
    ranges: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, text in enumerate(texts):
        cost = _text_bytes(text) + _PER_TEXT
        n = i - start
        full = n >= info.max_inputs_per_request or (n + 1) * per_vector > budget or size + cost > budget
        if n and full:
            ranges.append((start, i))
            start, size = i, 0
        size += cost
    if start < len(texts) or not texts:
        ranges.append((start, len(texts)))
    return ranges


def _protocol_error(message: str, request_id: str) -> ServerError:
    return ServerError(message, status=grpc.StatusCode.INTERNAL, request_id=request_id)


def decode(embeddings: Sequence[pb.Embedding], n: int, dims: int, request_id: str) -> EmbedResult:
    """Rows in input order from (possibly partial) packed float32 embeddings, checked for shape."""
    if len(embeddings) != n:
        raise _protocol_error(f"server returned {len(embeddings)} embeddings for {n} inputs", request_id)
    if any(len(e.packed) != dims * 4 for e in embeddings):
        raise _protocol_error(f"server returned a vector that is not {dims} packed float32", request_id)
    # bytearray: one copy, and the array is writable (callers normalise or quantise in place).
    vectors = np.frombuffer(bytearray().join(e.packed for e in embeddings), dtype="<f4")
    return EmbedResult(
        vectors.astype(np.float32, copy=False).reshape(n, dims),
        np.fromiter((e.token_count for e in embeddings), np.uint32, n),
        np.fromiter((e.truncated for e in embeddings), np.bool_, n),
    )


def decode_response(response: pb.EmbedResponse, n: int, request_id: str) -> EmbedResult:
    if response.encoding != pb.ENCODING_FLOAT32:
        raise _protocol_error("server ignored the float32 packed encoding", request_id)
    return decode(response.embeddings, n, response.dimensions, request_id)


class StreamAssembler:
    """Joins the parts of split ``EmbedStream`` answers back into one result per request."""

    def __init__(self) -> None:
        self._parts: list[pb.Embedding] = []
        self._index = 0

    def add(self, response: pb.EmbedResponse, n: int, request_id: str) -> EmbedResult | None:
        """The whole request's result on its ``last`` part, else None (keeps the part)."""
        if response.request_index != self._index:
            raise _protocol_error(
                f"stream answered request {response.request_index}, expected {self._index}", request_id
            )
        if response.encoding != pb.ENCODING_FLOAT32:
            raise _protocol_error("server ignored the float32 packed encoding", request_id)
        self._parts.extend(response.embeddings)
        if not response.last:
            return None
        parts, self._parts = self._parts, []
        self._index += 1
        return decode(parts, n, response.dimensions, request_id)
