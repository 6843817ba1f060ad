"""``EmbeddingClient``: the synchronous client (one channel, thread-safe, a context manager)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, TypeVar

import grpc

from embedding_client import _codec as codec
from embedding_client._codec import EmbedParams, EmbedResult, InputType, ModelInfo, Tokenized, Truncation
from embedding_client._wire import (
    HEALTH_METHOD,
    HealthStatus,
    decode_health_response,
    encode_health_request,
    identity,
    trace_metadata,
)
from embedding_client.errors import EmbeddingError, from_rpc_error
from embedding_client.options import (
    RetryPolicy,
    TLSConfig,
    call_metadata,
    channel_options,
    normalize_target,
)
from embedding_client.pb.embedding.v1 import embedding_pb2 as pb
from embedding_client.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 60.0


class _Base:
    """Construction shared by both clients: options, metadata, the cached model info."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None,
        tls: TLSConfig | bool | None,
        timeout: float | None,
        retries: RetryPolicy | None,
        load_balancing: str,
        max_in_flight: int,
        model: str | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.target = normalize_target(target)
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self._tls = TLSConfig() if tls is True else (tls or None)
        self._options = channel_options(retries, load_balancing, tls=self._tls)
        self._auth = call_metadata(api_key)
        self._info: ModelInfo | None = None
        # The served model (name or alias) every call of this client names; "" is the default model.
        self.model = model or ""

    def _credentials(self) -> grpc.ChannelCredentials | None:
        return self._tls.credentials() if self._tls is not None else None

    def _metadata(self) -> list[tuple[str, str]]:
        return [*self._auth, *trace_metadata()]


def _params(
    input_type: InputType,
    task: str | None,
    instruction: str | None,
    normalize: bool | None,
    truncation: Truncation | None,
) -> EmbedParams:
    return EmbedParams(input_type, task, instruction, normalize, truncation)


class EmbeddingClient(_Base):
    """Synchronous client over one gRPC channel.

    ``target`` is ``host:port`` (resolved through ``dns:///`` so round_robin spreads calls over
    every replica address) or any gRPC target URI. ``timeout`` is each call's deadline in
    seconds, retries included; ``retries=None`` disables gRPC retries. ``model`` names the served
    model (or alias) every call of this client uses, for servers with several; unset: the default.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        tls: TLSConfig | bool | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retries: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen, shared safely
        load_balancing: str = "round_robin",
        max_in_flight: int = 4,
        model: str | None = None,
    ) -> None:
        super().__init__(
            target,
            model=model,
            api_key=api_key,
            tls=tls,
            timeout=timeout,
            retries=retries,
            load_balancing=load_balancing,
            max_in_flight=max_in_flight,
        )
        credentials = self._credentials()
        if credentials is None:
            self._channel = grpc.insecure_channel(self.target, self._options)
        else:
            self._channel = grpc.secure_channel(self.target, credentials, self._options)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._health = self._channel.unary_unary(
            HEALTH_METHOD, request_serializer=identity, response_deserializer=identity
        )
        self._info_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- calls -------------------------------------------------------------------------------------
    def _call(self, method: Any, request: Any, request_id: str = "") -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata())
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, request_id) from None

    def model_info(self, *, refresh: bool = False) -> ModelInfo:
        """The served model and its limits; fetched once per client unless ``refresh``."""
        with self._info_lock:
            if self._info is None or refresh:
                self._info = ModelInfo.from_proto(
                    self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(model=self.model))
                )
            return self._info

    def health(self, service: str = "embedding.v1.EmbeddingService") -> HealthStatus:
        """``grpc.health.v1`` status of ``service`` ("" for the whole server)."""
        return decode_health_response(self._call(self._health, encode_health_request(service)))

    def tokenize(
        self,
        texts: Iterable[str],
        *,
        input_type: InputType = "document",
        task: str | None = None,
        instruction: str | None = None,
        truncation: Truncation | None = None,
        return_tokens: bool = False,
    ) -> list[Tokenized]:
        params = _params(input_type, task, instruction, None, truncation)
        rid = codec.new_request_id()
        request = codec.tokenize_request(codec.texts_list(texts), params, rid, return_tokens, self.model)
        return codec.tokenized(self._call(self._stub.Tokenize, request, rid))

    def embed(
        self,
        texts: Iterable[str],
        *,
        input_type: InputType = "document",
        task: str | None = None,
        instruction: str | None = None,
        normalize: bool | None = None,
        truncation: Truncation | None = None,
    ) -> codec.Vectors:
        """Vectors of shape (len(texts), dim), float32, rows in input order.

        Lists longer than the server's ``max_inputs_per_request`` (or its message size) are
        split into several requests, up to ``max_in_flight`` of them at a time.
        """
        params = _params(input_type, task, instruction, normalize, truncation)
        return self.embed_detailed(texts, params).vectors

    def embed_queries(self, texts: Iterable[str], *, task: str | None = None, **kw: Any) -> codec.Vectors:
        return self.embed(texts, input_type="query", task=task, **kw)

    def embed_documents(self, texts: Iterable[str], **kw: Any) -> codec.Vectors:
        return self.embed(texts, input_type="document", **kw)

    def embed_detailed(self, texts: Iterable[str], params: EmbedParams | None = None) -> EmbedResult:
        """Like :meth:`embed`, plus each input's token count and truncated flag."""
        params = params or EmbedParams()
        items = codec.texts_list(texts)
        info = self.model_info()
        if not items:
            return EmbedResult.concat([], info.dimensions)
        base = codec.new_request_id()
        ranges = codec.chunks(items, info)
        if len(ranges) == 1:
            return self._embed_one(items, params, base)
        pending: deque[tuple[Any, int, str]] = deque()
        parts: list[EmbedResult] = []
        try:
            for i, (start, end) in enumerate(ranges):
                rid = f"{base}-{i}"
                request = codec.embed_request(items[start:end], params, rid, self.model)
                future = self._stub.Embed.future(request, timeout=self.timeout, metadata=self._metadata())
                pending.append((future, end - start, rid))
                if len(pending) >= self.max_in_flight:
                    parts.append(self._result(*pending.popleft()))
            while pending:
                parts.append(self._result(*pending.popleft()))
        finally:
            for future, _, _ in pending:
                future.cancel()
        return EmbedResult.concat(parts, info.dimensions)

    def _embed_one(self, items: list[str], params: EmbedParams, rid: str) -> EmbedResult:
        response = self._call(self._stub.Embed, codec.embed_request(items, params, rid, self.model), rid)
        return codec.decode_response(response, len(items), rid)

    @staticmethod
    def _result(future: Any, n: int, rid: str) -> EmbedResult:
        try:
            response = future.result()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, rid) from None
        return codec.decode_response(response, n, rid)

    def embed_stream(
        self,
        texts: Iterable[str],
        *,
        batch_size: int = 32,
        max_in_flight: int = 8,
        input_type: InputType = "document",
        task: str | None = None,
        instruction: str | None = None,
        normalize: bool | None = None,
        truncation: Truncation | None = None,
    ) -> Iterator[codec.Vectors]:
        """One (batch, dim) array per ``batch_size`` texts, in input order, over ``EmbedStream``.

        ``texts`` may be any iterable (a generator over a file of any size): it is read only as
        answers come back, at most ``max_in_flight`` batches ahead, so memory stays bounded and a
        slow server slows the reader down instead of filling a buffer. The stream has no deadline
        (it lasts as long as the iterable); stop early by closing the iterator.
        """
        params = _params(input_type, task, instruction, normalize, truncation)
        for result in self.stream_detailed(texts, params, batch_size=batch_size, max_in_flight=max_in_flight):
            yield result.vectors

    def stream_detailed(
        self,
        texts: Iterable[str],
        params: EmbedParams | None = None,
        *,
        batch_size: int = 32,
        max_in_flight: int = 8,
    ) -> Iterator[EmbedResult]:
        """:meth:`embed_stream` with token counts and truncated flags."""
        if batch_size < 1 or max_in_flight < 1:
            raise ValueError("batch_size and max_in_flight must be at least 1")
        params = params or EmbedParams()
        feeder = _Feeder(texts, params, batch_size, max_in_flight, self.model)
        call = self._stub.EmbedStream(iter(feeder), metadata=self._metadata())
        assembler = codec.StreamAssembler()
        try:
            for response in call:
                n, rid = feeder.sent[0]
                result = assembler.add(response, n, rid)
                if result is not None:
                    feeder.sent.popleft()
                    feeder.slots.release()
                    yield result
        except grpc.RpcError as exc:
            feeder.raise_failure()
            raise from_rpc_error(exc, feeder.sent[0][1] if feeder.sent else feeder.base) from None
        finally:
            feeder.stop.set()
            call.cancel()
        feeder.raise_failure()


class _Feeder:
    """The request side of a stream: reads ``batch_size`` texts only when a slot is free."""

    def __init__(
        self, texts: Iterable[str], params: EmbedParams, batch_size: int, max_in_flight: int, model: str = ""
    ) -> None:
        if isinstance(texts, str | bytes):
            raise TypeError("texts must be an iterable of strings, not a single string")
        self._texts = iter(texts)
        self._params = params
        self._model = model
        self._batch_size = batch_size
        self.slots = threading.Semaphore(max_in_flight)
        self.stop = threading.Event()
        self.sent: deque[tuple[int, str]] = deque()  # (inputs, request id) awaiting their answer
        self.base = codec.new_request_id()
        self._failure: BaseException | None = None

    def __iter__(self) -> Iterator[pb.EmbedRequest]:
        index = 0
        try:
            while True:
                while not self.slots.acquire(timeout=0.1):
                    if self.stop.is_set():
                        return
                if self.stop.is_set():
                    return
                batch = codec.texts_list(islice(self._texts, self._batch_size))
                if not batch:
                    return
                rid = f"{self.base}-{index}"
                self.sent.append((len(batch), rid))
                index += 1
                yield codec.embed_request(batch, self._params, rid, self._model)
        except BaseException as exc:  # surfaced to the caller by raise_failure
            self._failure = exc

    def raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            if isinstance(failure, EmbeddingError | TypeError | ValueError):
                raise failure
            raise EmbeddingError(f"reading the input failed: {failure!r}") from failure
