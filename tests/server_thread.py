"""Run an async context manager (an in-process server) on its own event loop in a daemon thread.

Synchronous tests (grpc's sync stubs, the client package, hypothesis) need a server whose loop is not
theirs. One implementation for every suite's harness (``rel_harness.ThreadedServer``,
``svc_harness.ThreadedServing``); ``tests/`` is on ``sys.path`` through its conftest.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Generic, TypeVar

T = TypeVar("T")


class ServerThread(Generic[T]):
    def __init__(
        self, open_server: Callable[[], AbstractAsyncContextManager[T]], *, name: str, start_timeout_s: float
    ) -> None:
        self._open = open_server
        self._timeout = start_timeout_s
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.value: T | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            async with self._open() as value:
                self.value = value
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def __enter__(self) -> T:
        self._thread.start()
        if not self._ready.wait(self._timeout) or self.value is None:
            raise RuntimeError(f"in-process server did not start: {self._error!r}")
        return self.value

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
