"""The batcher with fake runtimes: budget, grouping, admission, deadlines, cancellation, failures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest
from svc_toy import FakeRuntime, reference

from service import errors
from service.batcher import Batcher, batch_cost

pytestmark = pytest.mark.asyncio


def make(runtime: FakeRuntime, **overrides: float) -> Batcher:
    options = {
        "max_batch_tokens": 64,
        "max_batch_size": 8,
        "max_batch_wait_ms": 5.0,
        "max_queue_tokens": 10_000,
        "pad_id": 0,
    }
    options.update(overrides)
    batcher = Batcher(runtime, **options)  # type: ignore[arg-type]
    batcher.start()
    return batcher


def seqs(length: int, count: int, first: int = 5) -> list[list[int]]:
    return [[first + (i + j) % 50 for j in range(length)] for i in range(count)]


async def wait_until(predicate: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_results_in_order_and_budget_respected(fake_runtime: FakeRuntime) -> None:
    batcher = make(fake_runtime)
    requests = [seqs(n, 5, first=n) for n in (3, 17, 9, 30, 1, 12)]
    outs = await asyncio.gather(*(batcher.submit(r) for r in requests))
    for request, out in zip(requests, outs, strict=True):
        want, norms = reference(fake_runtime.table, request)
        np.testing.assert_allclose(out.vectors, want, atol=1e-6)
        np.testing.assert_allclose(out.norms, norms, rtol=1e-6)
    for batch, padded in fake_runtime.calls:
        assert batch <= 8 and (batch == 1 or batch_cost(batch, padded) <= 64)
    assert sum(len(x) for x in fake_runtime.lengths) == 30
    await batcher.close()


async def test_short_inputs_do_not_pay_for_long_ones(fake_runtime: FakeRuntime) -> None:
    batcher = make(fake_runtime, max_batch_tokens=256, max_batch_size=16, max_batch_wait_ms=20)
    mixed: list[Sequence[int]] = []
    for i in range(8):  # interleaved arrival: short, long, short, long…
        mixed += [seqs(2, 1, first=i)[0], seqs(28, 1, first=i)[0]]
    await batcher.submit(mixed)
    for lengths in fake_runtime.lengths:
        assert max(lengths) - min(lengths) <= 1, f"mixed lengths in one batch: {lengths}"
    await batcher.close()


async def test_overload_refuses_instead_of_queueing(fake_runtime: FakeRuntime) -> None:
    fake_runtime.gate = threading.Event()
    batcher = make(fake_runtime, max_queue_tokens=40, max_batch_wait_ms=0)
    running = asyncio.ensure_future(batcher.submit(seqs(10, 1)))
    await asyncio.to_thread(fake_runtime.started.wait, 5)
    batcher._slots = asyncio.Semaphore(0)  # hold further batches in the queue for this test
    queued = asyncio.ensure_future(batcher.submit(seqs(10, 3)))  # 30 tokens queued
    await wait_until(lambda: batcher.queued_tokens == 30)
    with pytest.raises(errors.Overloaded, match="queue is full"):
        await batcher.submit(seqs(11, 1))
    batcher._slots.release()
    batcher._slots.release()
    fake_runtime.gate.set()
    await asyncio.gather(running, queued)
    await batcher.close()


async def test_expired_and_cancelled_work_is_never_computed(fake_runtime: FakeRuntime) -> None:
    fake_runtime.gate = threading.Event()
    batcher = make(fake_runtime, max_batch_wait_ms=0, max_batch_size=1)
    first = asyncio.ensure_future(batcher.submit([[5, 6, 7]]))
    await asyncio.to_thread(fake_runtime.started.wait, 5)
    expiring = asyncio.ensure_future(batcher.submit([[60, 61]], deadline=time.monotonic() + 0.05))
    cancelled = asyncio.ensure_future(batcher.submit([[62, 63]]))
    survivor = asyncio.ensure_future(batcher.submit([[64, 65]]))
    await asyncio.sleep(0.1)
    cancelled.cancel()
    fake_runtime.gate.set()
    await first
    with pytest.raises(errors.DeadlineExceeded):
        await expiring
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await survivor
    assert [60, 61] not in fake_runtime.rows_seen and [62, 63] not in fake_runtime.rows_seen
    assert [64, 65] in fake_runtime.rows_seen
    await batcher.close()


async def test_failing_batch_fails_only_its_own_requests(toy_table: np.ndarray) -> None:
    runtime = FakeRuntime(toy_table, fail=lambda ids: bool((ids == 66).any()))
    batcher = make(runtime, max_batch_size=1)
    bad = batcher.submit([[66, 7]])
    good = batcher.submit([[8, 9]])
    results = await asyncio.gather(bad, good, return_exceptions=True)
    assert isinstance(results[0], errors.RuntimeFailure)
    assert not isinstance(results[1], BaseException)
    assert (await batcher.submit([[10]])).vectors.shape == (1, 16)  # the batcher carries on
    await batcher.close()


async def test_not_batch_invariant_runs_each_input_alone_unpadded(fake_runtime: FakeRuntime) -> None:
    batcher = make(fake_runtime, batch_invariant=False)  # type: ignore[arg-type]
    await batcher.submit([[5] * 3, [6] * 9, [7] * 5])
    assert sorted(fake_runtime.calls) == [(1, 3), (1, 5), (1, 9)]
    await batcher.close()


async def test_next_batch_is_formed_while_one_runs(fake_runtime: FakeRuntime) -> None:
    fake_runtime.gate = threading.Event()
    batcher = make(fake_runtime, max_batch_wait_ms=0, max_batch_size=2)
    first = asyncio.ensure_future(batcher.submit(seqs(4, 2)))
    await asyncio.to_thread(fake_runtime.started.wait, 5)
    second = asyncio.ensure_future(batcher.submit(seqs(4, 2)))
    await wait_until(lambda: batcher.queue_depth == 0)  # formed and handed to the worker already
    assert len(fake_runtime.calls) == 1  # …while the first batch is still running
    third = asyncio.ensure_future(batcher.submit(seqs(4, 2)))
    await asyncio.sleep(0.05)
    assert batcher.queue_depth == 2  # only two slots: one running, one waiting
    fake_runtime.gate.set()
    await asyncio.gather(first, second, third)
    await batcher.close()


# A batch wait far longer than any test runs: were it honoured, these tests would time out.
LONG_WAIT_MS = 600_000.0


async def test_idle_runtime_runs_a_lone_request_at_once(fake_runtime: FakeRuntime) -> None:
    """Work-conserving: nothing is running, so waiting for company would only add latency."""
    batcher = make(fake_runtime, max_batch_wait_ms=LONG_WAIT_MS)
    out = await asyncio.wait_for(batcher.submit(seqs(4, 1)), timeout=30)
    assert out.vectors.shape[0] == 1 and fake_runtime.calls == [(1, 4)]
    await asyncio.wait_for(batcher.submit(seqs(4, 2)), timeout=30)  # idle again after a batch
    assert fake_runtime.calls[1:] == [(2, 4)]
    await batcher.close()


async def test_work_gathers_while_the_runtime_is_busy_and_runs_when_it_frees(
    fake_runtime: FakeRuntime,
) -> None:
    fake_runtime.gate = threading.Event()
    batcher = make(fake_runtime, max_batch_wait_ms=LONG_WAIT_MS)
    first = asyncio.ensure_future(batcher.submit(seqs(4, 1)))
    await asyncio.to_thread(fake_runtime.started.wait, 5)
    rest = [asyncio.ensure_future(batcher.submit(seqs(4, 1, first=i))) for i in range(3)]
    await wait_until(lambda: batcher.queue_depth == 3)
    await asyncio.sleep(0.1)
    assert batcher.queue_depth == 3  # busy runtime: the next batch waits for company…
    fake_runtime.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *rest), timeout=30)  # …only until it frees up
    assert fake_runtime.calls == [(1, 4), (3, 4)]
    await batcher.close()


async def test_close_fails_waiting_work_instead_of_hanging(fake_runtime: FakeRuntime) -> None:
    fake_runtime.gate = threading.Event()
    batcher = make(fake_runtime, max_batch_wait_ms=0, max_batch_size=1)
    running = asyncio.ensure_future(batcher.submit([[5]]))
    await asyncio.to_thread(fake_runtime.started.wait, 5)
    formed = asyncio.ensure_future(batcher.submit([[6]]))  # formed, waiting for the worker
    queued = asyncio.ensure_future(batcher.submit([[7]]))  # still in the queue
    await wait_until(lambda: batcher.queue_depth == 1)
    await batcher.close()
    fake_runtime.gate.set()
    assert (await running).vectors.shape == (1, 16)
    for pending in (formed, queued):
        with pytest.raises(errors.Draining):
            await asyncio.wait_for(pending, 5)


async def test_drain_finishes_accepted_work_and_refuses_new(toy_table: np.ndarray) -> None:
    runtime = FakeRuntime(toy_table, delay_s=0.05)
    batcher = make(runtime)
    accepted = asyncio.ensure_future(batcher.submit(seqs(5, 3)))
    await asyncio.sleep(0)
    await batcher.drain()
    assert accepted.done() and accepted.result().vectors.shape == (3, 16)
    with pytest.raises(errors.Draining):
        await batcher.submit(seqs(5, 1))
    await batcher.close()


class _It:
    def __init__(self, length: int, seq: int) -> None:
        self.length, self.seq, self.gone = length, seq, False


async def test_pending_queue_order_and_lazy_removal() -> None:
    from service.pending import PendingQueue

    q: PendingQueue[_It] = PendingQueue()
    items = [_It(n, i) for i, n in enumerate([10, 4, 12, 10, 7, 13])]
    for it in items:
        q.add(it)
    assert q.tokens == 56 and len(q) == 6 and q.oldest() is items[0]
    order = [(length, [it.seq for it in group]) for length, group in q.by_distance(10)]
    assert order == [(10, [0, 3]), (12, [2]), (7, [4]), (13, [5]), (4, [1])]
    q.remove(items[0])
    q.remove(items[0])  # idempotent
    assert q.oldest() is items[1] and q.tokens == 46 and len(q) == 5
    assert [(n, [it.seq for it in g]) for n, g in q.by_distance(11)][:2] == [(10, [3]), (12, [2])]


async def test_cancelled_request_frees_queue_space_at_once(fake_runtime: FakeRuntime) -> None:
    fake_runtime.gate = threading.Event()  # a busy runtime keeps the next request queued
    batcher = make(
        fake_runtime, max_batch_wait_ms=LONG_WAIT_MS, max_batch_tokens=10_000, max_batch_size=10_000
    )
    running = asyncio.ensure_future(batcher.submit(seqs(5, 1)))
    await asyncio.to_thread(fake_runtime.started.wait, 5)
    waiting = asyncio.ensure_future(batcher.submit(seqs(5, 4)))
    await wait_until(lambda: batcher.queued_tokens == 20)
    waiting.cancel()
    await wait_until(lambda: batcher.queued_tokens == 0 and batcher.queue_depth == 0)
    fake_runtime.gate.set()
    await running
    assert fake_runtime.calls == [(1, 5)]  # the cancelled request was never computed
    await batcher.close()


async def test_forming_from_a_large_queue_is_cheap(fake_runtime: FakeRuntime) -> None:
    # Not started: the scheduler must not drain the queue while it is being filled.
    batcher = Batcher(
        fake_runtime,
        max_batch_tokens=4096,
        max_batch_size=8,
        max_batch_wait_ms=0,
        max_queue_tokens=10**9,
        pad_id=0,
    )
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 512, size=20_000)
    futures = [asyncio.ensure_future(batcher.submit([[5] * int(n)])) for n in lengths]
    await wait_until(lambda: batcher.queue_depth == 20_000)
    started = time.perf_counter()
    batch = batcher._form()
    elapsed = time.perf_counter() - started
    assert len(batch) == 8 and max(b.length for b in batch) - min(b.length for b in batch) <= 1
    # Sorting the whole queue per batch (the naive way) takes tens of ms here; the index, well under 10.
    assert elapsed < 0.01, f"forming one batch from 20k queued inputs took {elapsed * 1000:.1f} ms"
    print(f"formed a batch from 20k queued inputs in {elapsed * 1000:.2f} ms")
    for f in futures:
        f.cancel()
    await batcher.close()
    assert batcher.queue_depth == 0


async def test_padding_cap_bounds_every_batch(fake_runtime: FakeRuntime) -> None:
    """A mixed workload: no runtime call pays more than max_padding_ratio of padding."""
    batcher = make(fake_runtime, max_batch_tokens=4096, max_batch_size=32, max_batch_wait_ms=30)
    batcher.max_padding_ratio = 0.15
    lengths = [3 + (i * 7) % 29 for i in range(60)]  # 3..31 tokens, interleaved
    await asyncio.gather(*(batcher.submit(seqs(n, 1, first=n)) for n in lengths))
    await batcher.close()
    assert sorted(x for call in fake_runtime.lengths for x in call) == sorted(lengths)
    assert len(fake_runtime.calls) < len(lengths)  # it still batches
    for (batch, padded), real in zip(fake_runtime.calls, fake_runtime.lengths, strict=True):
        assert batch * padded - sum(real) <= 0.15 * batch * padded, (batch, padded, real)
