"""Reloading the API keys file and the TLS files while serving: on change (polled) and on SIGHUP.

Why poll content hashes rather than watch inotify: a Kubernetes Secret volume updates by swapping
a symlink to a new directory, which file watchers see on the directory and not on the file; a
hash of what ``open(path)`` reads every few seconds sees every way a file can change, costs a few
small reads, and needs no extra dependency. A reload is all or nothing: a file that cannot be
used (unreadable, empty keys file, key not matching the certificate, expired certificate) leaves
the old material serving, logs an error naming the file and counts
``embed_credentials_reload_failures_total{file=…}`` (and sets ``embed_credentials_reload_failing``
to 1 until a good file arrives) so an alert can watch it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from service.auth import ApiKeyError, ApiKeys
from service.logs import add_redaction
from service.tls import TlsConfigError, TlsMaterial

log = logging.getLogger(__name__)


class CredentialMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reloads = Counter(
            "embed_credentials_reloads",
            "Credential files reloaded after a change, by file.",
            ["file"],
            registry=registry,
        )
        self.failures = Counter(
            "embed_credentials_reload_failures",
            "Changed credential files that could not be used (the old material stays), by file.",
            ["file"],
            registry=registry,
        )
        self.failing = Gauge(
            "embed_credentials_reload_failing",
            "1 while the newest version of a credential file is unusable, else 0, by file.",
            ["file"],
            registry=registry,
        )


def _digest(paths: Sequence[Path]) -> str:
    """Content hash of the files; an unreadable file hashes as its error, so it counts as a change."""
    h = hashlib.sha256()
    for path in paths:
        try:
            h.update(path.read_bytes())
        except OSError as exc:
            h.update(f"\0unreadable:{type(exc).__name__}".encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class _Watched:
    """One unit that reloads together (the keys file; the TLS certificate, key and CA)."""

    what: str
    paths: tuple[Path, ...]
    load: Callable[[], None]  # raises ApiKeyError / TlsConfigError, keeping the old material
    digest: str = ""
    failing: Path | None = None


class CredentialWatcher:
    """Checks the credential files every ``interval_s`` seconds (0: only on SIGHUP)."""

    def __init__(
        self,
        keys: ApiKeys,
        keys_file: Path | None,
        tls: TlsMaterial | None,
        metrics: CredentialMetrics,
        interval_s: float,
    ) -> None:
        self._metrics = metrics
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._units: list[_Watched] = []
        if keys_file is not None:
            path = keys_file

            def reload_keys() -> None:
                fresh = ApiKeys.from_file(path)
                add_redaction(fresh.secrets())
                keys.replace(fresh)
                log.info("API keys reloaded", extra={"file": str(path), "api_keys": len(fresh)})

            self._units.append(_Watched("API keys file", (keys_file,), reload_keys))
        if tls is not None:
            material = tls
            files = tls.files

            def reload_tls() -> None:
                if material.reload():
                    log.info("TLS material reloaded", extra={"file": str(files.cert)})

            paths = (files.cert, files.key, *([files.client_ca] if files.client_ca is not None else []))
            self._units.append(_Watched("TLS files", paths, reload_tls))
        for unit in self._units:  # what was loaded at start-up is the baseline
            unit.digest = _digest(unit.paths)
            for p in unit.paths:
                metrics.failing.labels(str(p)).set(0)

    def check(self, *, force: bool = False) -> None:
        """Reload every unit whose files changed since the last attempt (all of them if ``force``)."""
        for unit in self._units:
            digest = _digest(unit.paths)
            if digest == unit.digest and not force:
                continue
            unit.digest = digest  # a bad version is reported once, not every poll
            try:
                unit.load()
            except (ApiKeyError, TlsConfigError) as exc:
                path = exc.path if isinstance(exc, TlsConfigError) else unit.paths[0]
                log.error("%s not reloaded, the old material stays in use: %s", unit.what, exc)
                self._metrics.failures.labels(str(path)).inc()
                if unit.failing is not None and unit.failing != path:
                    self._metrics.failing.labels(str(unit.failing)).set(0)
                self._metrics.failing.labels(str(path)).set(1)
                unit.failing = path
                continue
            for p in unit.paths:
                self._metrics.reloads.labels(str(p)).inc()
            if unit.failing is not None:
                self._metrics.failing.labels(str(unit.failing)).set(0)
                unit.failing = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                self.check()
            except Exception:  # a bug here must not end rotation for the life of the process
                log.exception("credential check failed")

    def start(self) -> None:
        """Poll (when an interval is set) and reload on SIGHUP; on the running loop."""
        if not self._units:
            return
        loop = asyncio.get_running_loop()
        if self._interval_s > 0 and self._task is None:
            self._task = loop.create_task(self._poll(), name="credential-watcher")
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not main thread
            loop.add_signal_handler(signal.SIGHUP, lambda: self.check(force=True))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
