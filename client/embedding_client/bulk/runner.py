"""The bulk pipeline: read chunks, keep many ``Embed`` calls in flight, write results in order.

Why unary calls and not one ``EmbedStream``: a stream is pinned to one connection (one replica),
while independent unary calls are spread by round_robin over every replica behind the target.
Order is restored on the way out (results are written strictly in input order, which is what
lets the output record a single "rows done" position), and memory is bounded by the number of
chunks in flight plus one output part.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice

from embedding_client._codec import EmbedParams, EmbedResult
from embedding_client.aio import AsyncEmbeddingClient
from embedding_client.bulk.sink import Sink
from embedding_client.bulk.source import Row
from embedding_client.errors import EmbeddingError, InvalidInput, PermissionDenied, Unauthenticated

_FIELD = re.compile(r"^inputs\[(\d+)\]$")


class Stalled(Exception):
    """No chunk completed for ``stall_timeout_s``: the run stops instead of retrying forever."""


class Fatal(Exception):
    """An error no retry can fix (credentials): the run stops at once."""


@dataclass(frozen=True)
class Plan:
    params: EmbedParams = field(default_factory=EmbedParams)
    batch_size: int = 64
    concurrency: int = 16
    stall_timeout_s: float = 300.0
    part_rows: int = 100_000
    part_bytes: int = 64 << 20
    part_seconds: float = 30.0


@dataclass
class Chunk:
    rows: list[Row]  # embeddable rows, in input order
    bad: list[Row]  # rows refused before sending (no text, bad JSON…)
    end: int  # input position just after the chunk


@dataclass
class Done:
    ids: list[str]
    result: EmbedResult
    errors: list[tuple[Row, str, str]] = field(default_factory=list)  # (row, status, reason)


class _Clock:
    def __init__(self, stall_timeout_s: float) -> None:
        self.stall_timeout_s = stall_timeout_s
        self.last_progress = time.monotonic()

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    def stalled(self) -> bool:
        return time.monotonic() - self.last_progress > self.stall_timeout_s


def chunks(rows: Iterator[Row], batch_size: int) -> Iterator[Chunk]:
    while batch := list(islice(rows, batch_size)):
        good = [r for r in batch if r.problem is None]
        yield Chunk(good, [r for r in batch if r.problem is not None], batch[-1].index + 1)


class Runner:
    def __init__(self, client: AsyncEmbeddingClient, sink: Sink, plan: Plan, dims: int) -> None:
        self.client = client
        self.sink = sink
        self.plan = plan
        self.dims = dims
        self.clock = _Clock(plan.stall_timeout_s)
        self.last_error: EmbeddingError | None = None

    async def run(
        self, rows: Iterator[Row], stop: asyncio.Event, on_chunk: Callable[[int, int], None]
    ) -> bool:
        """Embed every row (until ``stop``); True when the input was exhausted."""
        source = chunks(rows, self.plan.batch_size)
        window: deque[tuple[Chunk, asyncio.Task[Done]]] = deque()
        exhausted = False
        last_commit = time.monotonic()
        rows_before = self.sink.progress.rows_done
        try:
            while True:
                running = sum(1 for _, t in window if not t.done())
                while not (exhausted or stop.is_set()) and running < self.plan.concurrency:
                    if len(window) >= 2 * self.plan.concurrency:
                        break
                    chunk = next(source, None)
                    if chunk is None:
                        exhausted = True
                        break
                    window.append((chunk, asyncio.ensure_future(self._embed(chunk))))
                    running += 1
                if not window:
                    break
                await asyncio.wait([t for _, t in window], return_when=asyncio.FIRST_COMPLETED)
                while window and window[0][1].done():
                    chunk, task = window.popleft()
                    done = task.result()  # Stalled / Fatal propagate
                    self._write(chunk, done)
                    on_chunk(chunk.end - rows_before, int(done.result.token_counts.sum()))
                    rows_before = chunk.end
                    if (
                        self.sink.buffered_rows >= self.plan.part_rows
                        or self.sink.buffered_bytes >= self.plan.part_bytes
                        or time.monotonic() - last_commit >= self.plan.part_seconds
                    ):
                        self.sink.commit()
                        last_commit = time.monotonic()
        finally:
            for _, task in window:
                task.cancel()
        return exhausted

    def _write(self, chunk: Chunk, done: Done) -> None:
        for row in chunk.bad:
            self.sink.error(row.id, row.index, "INVALID_INPUT_ROW", row.problem or "")
        for row, status, reason in done.errors:
            self.sink.error(row.id, row.index, status, reason)
        r = done.result
        self.sink.add(done.ids, r.vectors, r.token_counts, r.truncated, chunk.end)

    async def _embed(self, chunk: Chunk) -> Done:
        rows = list(chunk.rows)
        errors: list[tuple[Row, str, str]] = []
        while rows:
            try:
                result = await self._attempt([r.text or "" for r in rows])
            except InvalidInput as exc:
                found = _FIELD.match(exc.field or "")
                if found and int(found.group(1)) < len(rows):  # drop exactly the refused row
                    errors.append((rows.pop(int(found.group(1))), "INVALID_ARGUMENT", exc.message))
                elif len(rows) == 1:
                    errors.append((rows.pop(), "INVALID_ARGUMENT", exc.message))
                else:  # refused without naming an input: find the culprits one by one
                    return await self._one_by_one(rows, errors)
                continue
            self.clock.progressed()
            return Done([r.id for r in rows], result, errors)
        self.clock.progressed()
        return Done([], EmbedResult.concat([], self.dims), errors)

    async def _one_by_one(self, rows: list[Row], errors: list[tuple[Row, str, str]]) -> Done:
        kept: list[Row] = []
        parts: list[EmbedResult] = []
        for row in rows:
            try:
                parts.append(await self._attempt([row.text or ""]))
                kept.append(row)
            except InvalidInput as exc:
                errors.append((row, "INVALID_ARGUMENT", exc.message))
        self.clock.progressed()
        return Done([r.id for r in kept], EmbedResult.concat(parts, self.dims), errors)

    async def _attempt(self, texts: list[str]) -> EmbedResult:
        """One chunk, retried with jittered back-off on transient errors until the run stalls.

        gRPC already retried UNAVAILABLE / RESOURCE_EXHAUSTED a few times inside the call; this
        outer loop rides out longer outages (a rolling restart) without losing the run.
        """
        backoff = 0.5
        while True:
            try:
                return await self.client.embed_detailed(texts, self.plan.params)
            except (Unauthenticated, PermissionDenied) as exc:
                raise Fatal(str(exc)) from None
            except InvalidInput:
                raise
            except EmbeddingError as exc:
                self.last_error = exc
                if self.clock.stalled():
                    raise Stalled(
                        f"no progress for {self.plan.stall_timeout_s:.0f}s; last error: {exc}"
                    ) from None
                await asyncio.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, 10.0)
