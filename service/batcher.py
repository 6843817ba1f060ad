"""Dynamic batching: token-budget batches, length grouping, bounded admission, deadlines.

Why this shape (and not TEI's FIFO): a batch costs ``batch × longest`` padded tokens, so one
long text in a batch of short ones makes them all pay for it. The scheduler takes the *oldest*
queued input (so nothing starves) and fills the batch with the inputs nearest to it in length,
within ``max_batch_tokens`` and ``max_batch_size``, never mixing lengths far apart
(:func:`may_share_batch`). :class:`~service.cost.CostModel` is the single cost model (padded
tokens plus the quadratic attention term, and predicted activation memory). The queue is indexed by
length (:mod:`service.pending`), so forming a batch does not scan the backlog.

* Admission is bounded by queued tokens; past ``max_queue_tokens`` a request is refused at once
  with :class:`Overloaded` (RESOURCE_EXHAUSTED) instead of growing latency without bound. A request
  arriving at an empty queue is always admitted, so one large request cannot be refused forever.
* Inputs whose request was cancelled or whose deadline passed are dropped when the batch is
  formed *and again* in the worker right before the runtime call: expired work is never computed.
* A failing runtime call fails only the requests that had inputs in that batch.
* Work-conserving: when the runtime is idle, what is queued runs at once (a lone request never
  waits for company that may not come). While a batch runs, the inputs that arrive gather into
  the next batch for up to ``max_batch_wait_ms`` from the oldest one's arrival, or until the
  runtime frees up, whichever is first: waiting then costs nothing, the runtime is busy anyway.
* Pipelined: while batch N runs, batch N+1 is formed and waits in the worker's queue
  (two slots), so the runtime never idles on scheduling. One worker thread runs the runtime;
  the event loop only schedules.
* ``batch_invariant=False`` (the manifest says vectors depend on batch neighbours): each input
  runs alone, unpadded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.batch_items import BatchOutput, BatchRecord, Done, Item, Request
from service.cost import CostModel, batch_cost
from service.domain import FloatArray
from service.errors import DeadlineExceeded, Draining, EmbeddingError, Overloaded, RuntimeFailure
from service.pending import PendingQueue
from service.runtime import IntArray, Runtime
from service.watchdog import Progress

__all__ = ["BatchObserver", "BatchOutput", "Batcher", "Progress", "batch_cost", "may_share_batch"]

log = logging.getLogger("service.batcher")

PIPELINE_SLOTS = 2  # one batch running + one formed and waiting


def may_share_batch(shortest: int, longest: int) -> bool:
    """Whether inputs of these lengths may share a batch: the short ones would pay for padding.

    Within 2× of each other (or 16 tokens apart, where the difference is noise) they may; beyond
    that a separate runtime call is cheaper than padding, especially with quadratic attention.
    """
    return longest <= 2 * shortest or longest - shortest <= 16


# (inputs, real tokens, padded tokens); called from the worker thread, so it must be thread-safe.
BatchObserver = Callable[[int, int, int], None]

_RATE_WEIGHT = 0.2  # EWMA weight of the newest batch in the learned seconds-per-token


class Batcher:
    def __init__(
        self,
        runtime: Runtime,
        *,
        max_batch_tokens: int,
        cost: CostModel | None = None,
        max_padding_ratio: float = 1.0,
        max_batch_size: int,
        max_batch_wait_ms: float,
        max_queue_tokens: int,
        pad_id: int,
        batch_invariant: bool = True,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self._runtime = runtime
        self.max_batch_tokens = max_batch_tokens
        self._cost = cost or CostModel(max_batch_tokens=max_batch_tokens)
        self.max_padding_ratio = max_padding_ratio
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_batch_wait_ms / 1000.0
        self.max_queue_tokens = max_queue_tokens
        self._pad_id = pad_id
        self._batch_invariant = batch_invariant
        self._on_batch = on_batch
        self._pending: PendingQueue[Item] = PendingQueue()
        self._seq = itertools.count()
        self._batch_ids = itertools.count(1)
        self._in_flight = 0
        self._closing = False
        # Set on every arrival and whenever a batch finishes: what the scheduler's waits wake on.
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._slots = asyncio.Semaphore(PIPELINE_SLOTS)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-runtime")
        self._task: asyncio.Task[None] | None = None
        # Written by the worker thread, read by the watchdog on the loop: single assignments.
        self._running: tuple[float, int] | None = None  # (started, cost-model tokens)
        self._seconds_per_token: float | None = None
        self._last_progress = time.monotonic()

    # --- public ------------------------------------------------------------------------------
    @property
    def queued_tokens(self) -> int:
        return self._pending.tokens

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def progress(self) -> Progress:
        """A snapshot for the watchdog: is the runtime making progress on the work it holds?"""
        now = time.monotonic()
        running = self._running
        rate = self._seconds_per_token
        has_work = bool(self._pending) or self._in_flight > 0
        return Progress(
            scheduler_alive=self._task is None or not self._task.done() or self._closing,
            running_for=None if running is None else now - running[0],
            predicted_s=None if running is None or rate is None else rate * running[1],
            stuck_for=now - self._last_progress if has_work and running is None else 0.0,
        )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._schedule(), name="batcher")

    async def submit(
        self, ids: Sequence[Sequence[int]], deadline: float | None = None, *, request_id: str = ""
    ) -> BatchOutput:
        """Queue one request's inputs (model input ids); resolves when all are computed."""
        if self._closing:
            raise Draining("the server is shutting down; retry on another replica")
        tokens, queued = sum(len(x) for x in ids), self._pending.tokens
        if queued and queued + tokens > self.max_queue_tokens:
            raise Overloaded(
                f"server queue is full ({queued} tokens queued, limit {self.max_queue_tokens}); "
                "retry with back-off"
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise DeadlineExceeded("deadline passed before the request was queued")
        request = Request(ids, loop.create_future(), deadline, now, remaining=len(ids), request_id=request_id)
        request.future.add_done_callback(functools.partial(self._on_done, request))
        if not self._pending and self._in_flight == 0:
            self._last_progress = now  # idle time is not a stall
        for index, seq_ids in enumerate(ids):
            item = Item(request, index, len(seq_ids), next(self._seq))
            request.items.append(item)
            self._pending.add(item)
        self._idle.clear()
        self._wake.set()
        return await request.future

    async def drain(self) -> None:
        """Refuse new work; return when every accepted input has been computed or dropped."""
        self._closing = True
        await self._idle.wait()

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for item in self._pending.items():
            self._fail(item.request, Draining("the server stopped before this request was computed"))
        # A batch still running finishes in the background and resolves its requests; one waiting
        # for the worker is cancelled and its requests fail with Draining (see _finished).
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- scheduling (event loop) -------------------------------------------------------------
    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wake.clear()
                self._check_idle()
                await self._wake.wait()
                continue
            await self._slots.acquire()
            await self._wait_to_fill()
            batch = self._form()
            if not batch:
                self._slots.release()
                continue
            self._in_flight += 1
            future = loop.run_in_executor(self._executor, self._compute, batch)
            future.add_done_callback(functools.partial(self._finished, batch))

    async def _wait_to_fill(self) -> None:
        """Let the next batch gather company only while the runtime is busy (work-conserving).

        An idle runtime takes what is queued at once. While one runs, wait until a batch is full,
        the runtime frees up, or max_batch_wait has passed since the oldest input arrived.
        """
        while (oldest := self._pending.oldest()) is not None and not self._full():
            if self._in_flight == 0:
                return
            left = oldest.request.admitted + self.max_wait_s - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            try:
                # Not wait_for: on 3.11 it swallows a cancel (close()) that races the wake-up.
                async with asyncio.timeout(left):
                    await self._wake.wait()
            except TimeoutError:
                return

    def _full(self) -> bool:
        return len(self._pending) >= self.max_batch_size or self._pending.tokens >= self.max_batch_tokens

    def _form(self) -> list[Item]:
        """Oldest live input first, then the nearest lengths that fit the budget and may share."""
        now = time.monotonic()
        oldest = self._pending.oldest()
        while oldest is not None and self._dead(oldest, now):
            oldest = self._pending.oldest()
        if oldest is None:
            return []
        self._pending.remove(oldest)
        batch, shortest, longest = [oldest], oldest.length, oldest.length
        real = oldest.length
        if not self._batch_invariant:
            return batch
        for length, items in self._pending.by_distance(oldest.length):
            low, high = min(shortest, length), max(longest, length)
            if len(batch) >= self.max_batch_size:
                break
            if not may_share_batch(low, high):
                continue  # this length cannot join; a nearer-to-the-middle one still might
            live = [item for item in items if not self._dead(item, now)]
            take = self._how_many(len(batch), real, high, length, len(live))
            if take == 0:
                continue
            for item in live[:take]:
                self._pending.remove(item)
                batch.append(item)
            shortest, longest, real = low, high, real + take * length
        return batch

    def _how_many(self, size: int, real: int, longest: int, length: int, available: int) -> int:
        """How many inputs of ``length`` may join a batch of ``size`` inputs / ``real`` tokens.

        Bounded by the batch size, the cost model and the padding cap. Adding inputs of the
        batch's longest length *lowers* the padded fraction, so the largest count that passes is
        searched for rather than stopping at the first input that does not.
        """
        take = min(available, self.max_batch_size - size)
        while take > 0:
            padded = batch_cost(size + take, longest)
            wasted = padded - real - take * length
            if self._cost.fits(size + take, longest) and wasted <= self.max_padding_ratio * padded:
                return take
            take -= 1
        return 0

    def _dead(self, item: Item, now: float) -> bool:
        """Drop a queued input whose request was cancelled, failed or ran out of time."""
        request = item.request
        if request.dropped or request.future.done():
            self._pending.remove(item)
            return True
        if request.expired(now):
            self._fail(request, DeadlineExceeded("deadline passed while queued; not computed"))
            return True
        return False

    def _on_done(self, request: Request, future: asyncio.Future[BatchOutput]) -> None:
        if future.cancelled():  # the client went away: free its queue space now
            self._fail(request, None)

    def _finished(self, batch: list[Item], future: asyncio.Future[Done]) -> None:
        self._slots.release()
        self._in_flight -= 1
        self._wake.set()  # a batch gathering company may now run at once
        self._last_progress = time.monotonic()
        if future.cancelled():  # close() dropped a batch that was waiting for the worker
            for item in batch:
                self._fail(item.request, Draining("the server stopped before this request was computed"))
            self._check_idle()
            return
        done = future.result()  # _compute never raises: errors come back in done.error
        if done.error is None and done.tokens > 0 and done.end > done.start:
            rate = (done.end - done.start) / done.tokens
            old = self._seconds_per_token
            self._seconds_per_token = rate if old is None else old + _RATE_WEIGHT * (rate - old)
        for item in done.expired:
            if not item.request.future.done():
                self._fail(item.request, DeadlineExceeded("deadline passed while queued; not computed"))
        if done.error is not None:
            ids = sorted({item.request.request_id for item in done.computed})
            log.error(
                "runtime failed on a batch of %d inputs (request_ids=%s)",
                len(done.computed),
                ",".join(ids),
                exc_info=done.error,
            )
            for item in done.computed:
                self._fail(item.request, RuntimeFailure(f"runtime failure: {done.error!r}"))
        elif done.vectors is not None and done.norms is not None:
            real = sum(item.length for item in done.computed)
            longest = max(item.length for item in done.computed)
            padded = longest * len(done.computed) if self._batch_invariant else real
            done.record = BatchRecord(
                next(self._batch_ids), done.start, done.end, len(done.computed), real, padded
            )
            for row, item in enumerate(done.computed):
                self._deliver(item, done.vectors[row], done.norms[row], done)
        self._check_idle()

    def _deliver(self, item: Item, vector: FloatArray, norm: np.float32, done: Done) -> None:
        request = item.request
        if request.future.done():
            return
        if request.vectors is None or request.norms is None:
            request.vectors = np.empty((len(request.ids), vector.shape[0]), dtype=np.float32)
            request.norms = np.empty(len(request.ids), dtype=np.float32)
        request.vectors[item.index] = vector
        request.norms[item.index] = norm
        request.first_start = (
            done.start if request.first_start is None else min(request.first_start, done.start)
        )
        request.last_end = max(request.last_end, done.end)
        if done.record is not None and (not request.batches or request.batches[-1] is not done.record):
            request.batches.append(done.record)  # a request's inputs in one batch arrive together
        request.remaining -= 1
        if request.remaining == 0:
            request.future.set_result(
                BatchOutput(
                    request.vectors,
                    request.norms,
                    queue_ms=(request.first_start - request.admitted) * 1000.0,
                    inference_ms=(request.last_end - request.first_start) * 1000.0,
                    batches=tuple(request.batches),
                )
            )

    def _fail(self, request: Request, error: EmbeddingError | None) -> None:
        """Fail a request (``None``: it was cancelled) and remove its inputs still queued."""
        request.dropped = True
        for item in request.items:
            self._pending.remove(item)
        if error is not None and not request.future.done():
            request.future.set_exception(error)

    def _check_idle(self) -> None:
        if not self._pending and self._in_flight == 0:
            self._idle.set()

    # --- compute (worker thread) -------------------------------------------------------------
    def _compute(self, batch: list[Item]) -> Done:
        done = Done()
        now = time.monotonic()
        for item in batch:
            if item.request.dropped:
                continue
            (done.expired if item.request.expired(now) else done.computed).append(item)
        if not done.computed:
            return done
        done.start = time.monotonic()
        try:
            if self._batch_invariant:
                done.vectors, done.norms = self._run(
                    [item.request.ids[item.index] for item in done.computed], done
                )
            else:
                parts = [self._run([item.request.ids[item.index]], done) for item in done.computed]
                done.vectors = np.concatenate([p[0] for p in parts])
                done.norms = np.concatenate([p[1] for p in parts])
        except Exception as exc:  # any runtime error fails this batch only
            done.error = exc
        done.end = time.monotonic()
        return done

    def _run(self, seqs: list[Sequence[int]], done: Done) -> tuple[FloatArray, FloatArray]:
        """Right-pad to the longest sequence and call the runtime once."""
        longest = max(len(s) for s in seqs)
        input_ids: IntArray = np.full((len(seqs), longest), self._pad_id, dtype=np.int64)
        mask: IntArray = np.zeros((len(seqs), longest), dtype=np.int64)
        for row, seq in enumerate(seqs):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        if self._on_batch is not None:
            self._on_batch(len(seqs), sum(len(s) for s in seqs), input_ids.size)
        tokens = self._cost.tokens(len(seqs), longest)
        done.tokens += tokens
        self._last_progress = time.monotonic()
        self._running = (self._last_progress, tokens)
        try:
            vectors, norms = self._runtime.run(input_ids, mask)
        finally:
            self._running = None
        if vectors.shape[0] != len(seqs) or norms.shape[0] != len(seqs):
            raise RuntimeError(f"runtime returned {vectors.shape[0]} vectors for {len(seqs)} inputs")
        return vectors, norms
