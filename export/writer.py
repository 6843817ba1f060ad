"""Staging and publishing a bundle so a failure never leaves one that looks complete.

Everything is written into a hidden staging folder *next to* ``--out`` (same filesystem, so the
final step is an atomic rename). ``manifest.json`` — the file the service looks for — is written
last, after every hash is computed, and the folder only takes its final name after that. Any
exception removes the staging folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bundle.manifest import MANIFEST_NAME, file_sha256
from export.errors import OutputError


def check_output(out: Path, overwrite: bool) -> None:
    """Fail fast (before minutes of export) when ``out`` cannot be produced."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"--out {out} already exists and is not empty; pass --overwrite to replace it")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {parent}: {exc.strerror or exc}") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {parent} (permission denied)")


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A staging folder next to ``out``; removed unless :func:`publish` moved it into place."""
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"cannot write to {out.parent}: {exc.strerror or exc}") from exc
    try:
        yield stage
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def hash_files(stage: Path) -> dict[str, str]:
    """sha256 of every file in the bundle (relative POSIX paths), manifest excluded."""
    return {
        p.relative_to(stage).as_posix(): file_sha256(p)
        for p in sorted(stage.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def publish(stage: Path, out: Path) -> None:
    """Move the finished ``stage`` to ``out``, replacing an old bundle only at the very end."""
    if not (stage / MANIFEST_NAME).is_file():
        raise OutputError(f"internal error: refusing to publish {stage} without {MANIFEST_NAME}")
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; a bundle is read by the service's user
    old: Path | None = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        stage.rename(out)
    except OSError as exc:
        if old is not None:
            old.rename(out)
        raise OutputError(f"cannot move the finished bundle to {out}: {exc.strerror or exc}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
