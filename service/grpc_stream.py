"""``EmbedStream``'s engine: read ahead, compute concurrently, answer strictly in order, lose nothing.

Why its own module: a bidirectional stream has more ways to end than a unary call, and each of
them once lost answers or left a task behind. The rules this module keeps:

* **Every answer computed before a failure is sent, then the failure's status**, whatever failed
  (an undecodable message, an invalid field, a request over a limit, a refusal) and whenever it
  arrives relative to the earlier requests' computation. Failures are entries in the same ordered
  queue as the answers, so the writer reaches them only after everything before them.
* **Read-ahead adapts to admission.** Up to :data:`WINDOW` requests compute at once. A request the
  batcher refuses as overloaded while this stream still has other work in flight waits for that
  work and is retried, and reading stops meanwhile (HTTP/2 flow control then pushes back on the
  client): a lone stream on an idle server always completes. A request refused with nothing of its
  own stream in flight is refused like a unary call, so the queue bound holds for everyone.
* **The status goes out once the client stopped writing** (or went quiet): after a failure the rest
  of the client's messages are read and discarded, bounded by :data:`DRAIN_IDLE_S` of silence and
  :data:`DRAIN_MAX_S` in all. A grpc.aio client whose write races the server's final status reports
  ``INTERNAL: Internal error from Core`` instead of that status (grpc/grpc#36066); see
  docs/reliability.md.
* **Nothing outlives the stream**: the reader and every computation are cancelled when it ends,
  and every task's exception is retrieved (no "Task exception was never retrieved").
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from service.errors import EmbeddingError, Overloaded

# Requests of one stream computing (or answered and not yet written) at once.
WINDOW = 32
# After a failure: stop discarding the client's messages after this much silence, or this long.
DRAIN_IDLE_S = 0.25
DRAIN_MAX_S = 5.0

Req = TypeVar("Req")
Resp = TypeVar("Resp")
# Turns request number ``index`` into its answer messages (validation, computation, packing).
Answer = Callable[[Req, int], Awaitable[list[Resp]]]


@dataclass(frozen=True)
class _Failed:
    """The stream ends here, after every earlier answer."""

    error: BaseException


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a finished task's exception as seen; the writer reports the ones that matter."""
    if not task.cancelled():
        task.exception()


class EmbedStreamRun(Generic[Req, Resp]):
    """One ``EmbedStream`` call; iterate :meth:`responses` exactly once."""

    def __init__(self, requests: AsyncIterator[Req], answer: Answer[Req, Resp]) -> None:
        self._requests = requests.__aiter__()
        self._answer = answer
        self._order: asyncio.Queue[asyncio.Task[list[Resp]] | _Failed | None] = asyncio.Queue()
        self._pending: dict[int, asyncio.Task[list[Resp]]] = {}  # started and not finished
        self._open = 0  # started and not yet written
        self._stalled: set[asyncio.Task[Any] | None] = set()  # refused as overloaded, waiting
        self._failed = False  # no new work: something failed, or the stream is ending
        self._changed = asyncio.Condition()
        self._reads = 0

    async def responses(self) -> AsyncIterator[Resp]:
        reader = asyncio.ensure_future(self._read())
        reader.add_done_callback(_retrieve)
        try:
            while (entry := await self._order.get()) is not None:
                if isinstance(entry, _Failed):
                    raise entry.error
                try:
                    answers = await entry
                finally:
                    self._open -= 1
                    await self._notify()
                for response in answers:
                    yield response
            await reader  # a clean end of the request stream
        except Exception:
            await self._stop()
            await self._drain(reader)
            raise
        finally:
            self._failed = True
            reader.cancel()
            for task in self._pending.values():
                task.cancel()  # the client left or a request failed: drop queued work

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _stop(self) -> None:
        self._failed = True
        await self._notify()

    async def _read(self) -> None:
        index = 0
        while True:
            try:
                request = await self._requests.__anext__()
            except StopAsyncIteration:
                break
            except EmbeddingError as exc:  # an undecodable message; the messages after it still arrive
                self._reads += 1
                if not self._failed:
                    self._order.put_nowait(_Failed(exc))
                    await self._stop()
                continue
            except Exception as exc:  # the transport itself failed: nothing more to read
                if not self._failed:
                    self._order.put_nowait(_Failed(exc))
                await self._stop()
                return
            self._reads += 1
            async with self._changed:
                await self._changed.wait_for(
                    lambda: self._failed or (self._open < WINDOW and not self._stalled)
                )
            if self._failed:
                continue  # draining: read and discard
            task = asyncio.ensure_future(self._run(request, index))
            task.add_done_callback(_retrieve)
            self._pending[index] = task
            task.add_done_callback(functools.partial(self._finished, index))
            self._open += 1
            self._order.put_nowait(task)
            index += 1
        self._order.put_nowait(None)

    def _finished(self, index: int, _: asyncio.Future[Any]) -> None:
        self._pending.pop(index, None)

    async def _run(self, request: Req, index: int) -> list[Resp]:
        me = asyncio.current_task()
        try:
            while True:
                try:
                    return await self._answer(request, index)
                except Overloaded:
                    # This stream's other work that is not itself waiting: once it is done, its
                    # tokens have left the queue. (A later request may have been admitted first.)
                    others = [t for t in self._pending.values() if t is not me and t not in self._stalled]
                    if not others or self._failed:
                        raise
                    await self._stall_until_done(others, me)
        except Exception:
            await self._stop()  # answers after this one would be discarded: read no further work
            raise

    async def _stall_until_done(
        self, others: list[asyncio.Task[list[Resp]]], me: asyncio.Task[Any] | None
    ) -> None:
        """Wait for ``others``. Each stalled task waits only for tasks not stalled when it stalled,
        so the waits can never form a cycle."""
        self._stalled.add(me)
        try:
            await asyncio.wait(others)
        finally:
            self._stalled.discard(me)
            await self._notify()

    async def _drain(self, reader: asyncio.Future[None]) -> None:
        """Let the client finish writing (discarding) before the status goes out; bounded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_MAX_S
        seen = -1
        while not reader.done() and self._reads != seen and loop.time() < deadline:
            seen = self._reads
            await asyncio.wait({reader}, timeout=DRAIN_IDLE_S)
