"""``AsyncEmbeddingClient``: the asyncio client (grpc.aio), same surface as ``EmbeddingClient``."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from itertools import islice
from typing import Any

import grpc

from embedding_client import _codec as codec
from embedding_client._codec import EmbedParams, EmbedResult, InputType, ModelInfo, Tokenized, Truncation
from embedding_client._wire import (
    HEALTH_METHOD,
    HealthStatus,
    decode_health_response,
    encode_health_request,
    identity,
)
from embedding_client.client import DEFAULT_TIMEOUT_S, _Base, _params
from embedding_client.errors import from_rpc_error
from embedding_client.options import RetryPolicy, TLSConfig
from embedding_client.pb.embedding.v1 import embedding_pb2 as pb
from embedding_client.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc


class AsyncEmbeddingClient(_Base):
    """Asyncio client over one ``grpc.aio`` channel; create and use it inside one event loop."""

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
            self._channel = grpc.aio.insecure_channel(self.target, self._options)
        else:
            self._channel = grpc.aio.secure_channel(self.target, credentials, self._options)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._health = self._channel.unary_unary(
            HEALTH_METHOD, request_serializer=identity, response_deserializer=identity
        )
        self._info_lock = asyncio.Lock()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any, request_id: str = "") -> Any:
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata())
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, request_id) from None

    async def model_info(self, *, refresh: bool = False) -> ModelInfo:
        async with self._info_lock:
            if self._info is None or refresh:
                response = await self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(model=self.model))
                self._info = ModelInfo.from_proto(response)
            return self._info

    async def health(self, service: str = "embedding.v1.EmbeddingService") -> HealthStatus:
        return decode_health_response(await self._call(self._health, encode_health_request(service)))

    async def tokenize(
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
        return codec.tokenized(await self._call(self._stub.Tokenize, request, rid))

    async def embed(
        self,
        texts: Iterable[str],
        *,
        input_type: InputType = "document",
        task: str | None = None,
        instruction: str | None = None,
        normalize: bool | None = None,
        truncation: Truncation | None = None,
    ) -> codec.Vectors:
        params = _params(input_type, task, instruction, normalize, truncation)
        return (await self.embed_detailed(texts, params)).vectors

    async def embed_queries(
        self, texts: Iterable[str], *, task: str | None = None, **kw: Any
    ) -> codec.Vectors:
        return await self.embed(texts, input_type="query", task=task, **kw)

    async def embed_documents(self, texts: Iterable[str], **kw: Any) -> codec.Vectors:
        return await self.embed(texts, input_type="document", **kw)

    async def embed_detailed(self, texts: Iterable[str], params: EmbedParams | None = None) -> EmbedResult:
        params = params or EmbedParams()
        items = codec.texts_list(texts)
        info = await self.model_info()
        if not items:
            return EmbedResult.concat([], info.dimensions)
        base = codec.new_request_id()
        ranges = codec.chunks(items, info)
        if len(ranges) == 1:
            return await self._embed_one(items, params, base)
        slots = asyncio.Semaphore(self.max_in_flight)

        async def one(i: int, start: int, end: int) -> EmbedResult:
            async with slots:
                return await self._embed_one(items[start:end], params, f"{base}-{i}")

        tasks = [asyncio.ensure_future(one(i, s, e)) for i, (s, e) in enumerate(ranges)]
        try:
            return EmbedResult.concat(await asyncio.gather(*tasks), info.dimensions)
        finally:
            for task in tasks:
                task.cancel()

    async def _embed_one(self, items: list[str], params: EmbedParams, rid: str) -> EmbedResult:
        response = await self._call(
            self._stub.Embed, codec.embed_request(items, params, rid, self.model), rid
        )
        return codec.decode_response(response, len(items), rid)

    async def embed_stream(
        self,
        texts: Iterable[str] | AsyncIterable[str],
        *,
        batch_size: int = 32,
        max_in_flight: int = 8,
        input_type: InputType = "document",
        task: str | None = None,
        instruction: str | None = None,
        normalize: bool | None = None,
        truncation: Truncation | None = None,
    ) -> AsyncIterator[codec.Vectors]:
        """See ``EmbeddingClient.embed_stream``; ``texts`` may also be an async iterable."""
        params = _params(input_type, task, instruction, normalize, truncation)
        async for result in self.stream_detailed(
            texts, params, batch_size=batch_size, max_in_flight=max_in_flight
        ):
            yield result.vectors

    async def stream_detailed(
        self,
        texts: Iterable[str] | AsyncIterable[str],
        params: EmbedParams | None = None,
        *,
        batch_size: int = 32,
        max_in_flight: int = 8,
    ) -> AsyncIterator[EmbedResult]:
        if batch_size < 1 or max_in_flight < 1:
            raise ValueError("batch_size and max_in_flight must be at least 1")
        if isinstance(texts, str | bytes):
            raise TypeError("texts must be an iterable of strings, not a single string")
        params = params or EmbedParams()
        slots = asyncio.Semaphore(max_in_flight)
        sent: deque[tuple[int, str]] = deque()
        base = codec.new_request_id()
        failure: list[BaseException] = []

        async def requests() -> AsyncIterator[pb.EmbedRequest]:
            try:
                async for index, batch in _batches(texts, batch_size):
                    await slots.acquire()
                    rid = f"{base}-{index}"
                    sent.append((len(batch), rid))
                    yield codec.embed_request(batch, params, rid, self.model)
            except Exception as exc:  # surfaced after the stream ends
                failure.append(exc)

        call = self._stub.EmbedStream(requests(), metadata=self._metadata())
        assembler = codec.StreamAssembler()
        try:
            async for response in call:
                n, rid = sent[0]
                result = assembler.add(response, n, rid)
                if result is not None:
                    sent.popleft()
                    slots.release()
                    yield result
        except grpc.RpcError as exc:
            if failure:
                raise failure[0] from None
            raise from_rpc_error(exc, sent[0][1] if sent else base) from None
        finally:
            call.cancel()
        if failure:
            raise failure[0]


async def _batches(
    texts: Iterable[str] | AsyncIterable[str], batch_size: int
) -> AsyncIterator[tuple[int, list[str]]]:
    index = 0
    if isinstance(texts, AsyncIterable):
        batch: list[str] = []
        async for text in texts:
            batch.append(text)
            if len(batch) == batch_size:
                yield index, codec.texts_list(batch)
                index, batch = index + 1, []
        if batch:
            yield index, codec.texts_list(batch)
        return
    it = iter(texts)
    while batch := list(islice(it, batch_size)):
        yield index, codec.texts_list(batch)
        index += 1
