"""The batcher's queue: arrival order plus an index by length, so forming a batch is cheap.

Why not a list sorted per batch: at the admission bound (``max_queue_tokens`` of short texts) the
queue holds tens of thousands of inputs, and sorting them on the event loop for every batch
would stall every other request. Here the oldest input is O(1), and walking outwards from its
length touches only the lengths present and the inputs actually taken.

Removal is lazy in the per-length FIFOs (an item is marked ``gone`` and skipped later) and eager
in the arrival order and the token count, so admission control always sees the true backlog.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    length: int
    seq: int
    gone: bool


Q = TypeVar("Q", bound=Queued)


class PendingQueue(Generic[Q]):
    def __init__(self) -> None:
        self._order: dict[int, Q] = {}  # seq → item; insertion order is arrival order
        self._by_length: dict[int, deque[Q]] = {}
        self._lengths: list[int] = []  # sorted lengths that have a FIFO
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._order)

    def items(self) -> list[Q]:
        return list(self._order.values())

    def add(self, item: Q) -> None:
        self._order[item.seq] = item
        fifo = self._by_length.get(item.length)
        if fifo is None:
            fifo = self._by_length[item.length] = deque()
            bisect.insort(self._lengths, item.length)
        fifo.append(item)
        self.tokens += item.length

    def remove(self, item: Q) -> None:
        if item.gone:
            return
        item.gone = True
        del self._order[item.seq]
        self.tokens -= item.length

    def oldest(self) -> Q | None:
        return next(iter(self._order.values()), None)

    def by_distance(self, length: int) -> Iterator[tuple[int, Iterator[Q]]]:
        """(length, its live items oldest first) for the lengths present, nearest to ``length`` first.

        On equal distance the shorter length comes first (it cannot raise the batch's padding).
        Callers may remove items while iterating; they must not add.
        """
        self._compact()
        upper = bisect.bisect_left(self._lengths, length)
        lower = upper - 1
        while lower >= 0 or upper < len(self._lengths):
            below = length - self._lengths[lower] if lower >= 0 else None
            above = self._lengths[upper] - length if upper < len(self._lengths) else None
            if above is None or (below is not None and below <= above):
                chosen, lower = self._lengths[lower], lower - 1
            else:
                chosen, upper = self._lengths[upper], upper + 1
            yield chosen, (item for item in self._by_length[chosen] if not item.gone)

    def _compact(self) -> None:
        """Drop removed items from the heads of the FIFOs, and FIFOs that became empty."""
        empty = []
        for length, fifo in self._by_length.items():
            while fifo and fifo[0].gone:
                fifo.popleft()
            if not fifo:
                empty.append(length)
        for length in empty:
            del self._by_length[length]
            del self._lengths[bisect.bisect_left(self._lengths, length)]
