"""The liveness watchdog: health reflects a runtime that makes progress, not just a state flag.

Why: a runtime call that never returns (a wedged CUDA kernel, a deadlocked provider thread) used
to leave health SERVING, so Kubernetes never restarted the pod while every request timed out.
The watchdog polls the batcher's :class:`Progress` and reports a stall when

* a runtime call has run longer than ``max(watchdog_stall_s, watchdog_factor × predicted)``,
  where *predicted* is the cost model's tokens for that call times the seconds per token the
  batcher learned from the calls that finished (an EWMA); before any call finished only the
  floor applies;
* work is queued but no runtime call started or finished for ``watchdog_stall_s`` (the worker
  stopped taking work);
* the batch scheduler task died.

The core turns health NOT_SERVING while stalled (gRPC health for ``""`` and the service, HTTP
``/health`` 503, so the chart's liveness probe fails and the pod restarts), logs why and counts
it in metrics; when calls complete again, health returns to SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("service.watchdog")


@dataclass(frozen=True)
class Progress:
    """A batcher snapshot, in seconds."""

    scheduler_alive: bool
    running_for: float | None  # the runtime call in progress, if any
    predicted_s: float | None  # its predicted duration (learned rate × cost-model tokens)
    stuck_for: float  # queued work, no runtime call started or finished for this long (0: none)


@dataclass(frozen=True)
class Stall:
    kind: str  # metric label: slow_call | no_progress | scheduler_died
    reason: str


def diagnose(progress: Progress, *, floor_s: float, factor: float) -> Stall | None:
    """Whether ``progress`` shows a stalled runtime, and why in words an operator can act on."""
    if not progress.scheduler_alive:
        return Stall("scheduler_died", "the batch scheduler task stopped; no work can run")
    if progress.running_for is not None:
        predicted = progress.predicted_s
        limit = max(floor_s, factor * predicted) if predicted is not None else floor_s
        if progress.running_for > limit:
            expected = f"predicted {predicted:.3f}s" if predicted is not None else "no prediction yet"
            return Stall(
                "slow_call",
                f"a runtime call has been running for {progress.running_for:.1f}s ({expected}, "
                f"limit {limit:.1f}s = max(watchdog_stall_s, watchdog_factor × predicted)); "
                "the runtime looks wedged",
            )
        return None
    if progress.stuck_for > floor_s:
        return Stall(
            "no_progress",
            f"work has been queued for {progress.stuck_for:.1f}s with no runtime call started "
            f"(watchdog_stall_s={floor_s:g}); the runtime worker stopped taking work",
        )
    return None


class Watchdog:
    """Polls ``read()`` and calls ``on_change(stall or None)`` whenever the verdict changes."""

    def __init__(
        self,
        read: Callable[[], Progress],
        on_change: Callable[[Stall | None], None],
        *,
        floor_s: float,
        factor: float,
    ) -> None:
        self._read = read
        self._on_change = on_change
        self._floor_s = floor_s
        self._factor = factor
        self._interval = min(1.0, floor_s / 4)
        self._task: asyncio.Task[None] | None = None
        self.stall: Stall | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="watchdog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.check()

    def check(self) -> None:
        stall = diagnose(self._read(), floor_s=self._floor_s, factor=self._factor)
        if (stall is None) != (self.stall is None):
            self.stall = stall
            self._on_change(stall)
