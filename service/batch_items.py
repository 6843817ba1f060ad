"""What the batcher keeps per request, per queued input and per runtime call.

Why apart from the scheduling code: these are plain records shared by the event loop (admission,
delivery) and the worker thread (the runtime call); ``service/batcher.py`` holds the policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from service.domain import FloatArray


@dataclass(frozen=True)
class BatchRecord:
    """One runtime call as tracing sees it (``service/tracing.py``): times on ``time.monotonic()``."""

    batch_id: int
    start: float
    end: float
    inputs: int
    tokens: int  # real tokens
    padded_tokens: int


@dataclass(frozen=True)
class BatchOutput:
    """A request's vectors in input order, plus where its time went and the batches that served it."""

    vectors: FloatArray  # [n, dim], L2-normalised
    norms: FloatArray  # [n]
    queue_ms: float
    inference_ms: float
    batches: tuple[BatchRecord, ...] = ()


@dataclass(eq=False)
class Request:
    ids: Sequence[Sequence[int]]
    future: asyncio.Future[BatchOutput]
    deadline: float | None
    admitted: float
    remaining: int
    request_id: str = ""
    items: list[Item] = field(default_factory=list)
    vectors: FloatArray | None = None
    norms: FloatArray | None = None
    first_start: float | None = None
    last_end: float = 0.0
    batches: list[BatchRecord] = field(default_factory=list)
    # Set on the event loop, read by the worker thread: a plain bool is enough (GIL, monotonic).
    dropped: bool = False

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass(eq=False)
class Item:
    request: Request
    index: int
    length: int
    seq: int
    gone: bool = False  # taken into a batch or dropped (PendingQueue bookkeeping)


@dataclass
class Done:
    """What the worker hands back for one batch."""

    computed: list[Item] = field(default_factory=list)
    expired: list[Item] = field(default_factory=list)
    vectors: FloatArray | None = None
    norms: FloatArray | None = None
    error: BaseException | None = None
    start: float = 0.0
    end: float = 0.0
    tokens: int = 0  # cost-model tokens of the runtime call(s)
    record: BatchRecord | None = None  # made once, on the event loop, when the batch is delivered
