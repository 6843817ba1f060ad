"""The output: a Parquet dataset directory that is always consistent on disk, so it can resume.

Layout (``pyarrow.parquet.read_table(out)`` reads the parts and skips the ``_`` files)::

    part-00000.parquet …   id (string), embedding (fixed_size_list<float32>[dim]),
                           token_count (uint32), truncated (bool)
    _model.json            the model the vectors came from (sidecar)
    _errors.jsonl          rows the server refused: id, row, status, reason
    _progress.json         committed state: input rows handled, parts, errors file length

A part is written to a temporary name and renamed, then ``_progress.json`` is replaced: a run
killed at any point leaves the last committed state, and a resume deletes whatever came after it
(an orphan part, error lines past the committed length) before continuing from ``rows_done``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

PROGRESS = "_progress.json"
MODEL = "_model.json"
ERRORS = "_errors.jsonl"


class OutputError(Exception):
    """The output directory cannot be used as asked (exists without --resume, other model…)."""


@dataclass
class Progress:
    rows_done: int = 0
    parts: int = 0
    errors_bytes: int = 0
    vectors: int = 0
    errors: int = 0
    finished: bool = False


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Sink:
    def __init__(self, out: Path, model: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
        self.out = out
        self.dims = int(model["dimensions"])
        existing = out.exists() and any(out.iterdir())
        if existing and overwrite:
            shutil.rmtree(out)
            existing = False
        if existing and not (out / PROGRESS).is_file():
            raise OutputError(f"{out} exists and is not an embed-bulk output; choose another --out")
        if existing and not resume:
            raise OutputError(f"{out} already holds output: pass --resume to continue it or --overwrite")
        out.mkdir(parents=True, exist_ok=True)
        self.progress = self._load(model) if existing else Progress()
        _replace(out / MODEL, json.dumps(model, indent=1, sort_keys=True) + "\n")
        self._errors = (out / ERRORS).open("ab")
        self._ids: list[str] = []
        self._vectors: list[npt.NDArray[np.float32]] = []
        self._tokens: list[npt.NDArray[np.uint32]] = []
        self._truncated: list[npt.NDArray[np.bool_]] = []
        self._pending_rows_done = self.progress.rows_done
        self._pending_errors = 0
        if not existing:
            self._commit_state()

    def _load(self, model: dict[str, Any]) -> Progress:
        progress = Progress(**json.loads((self.out / PROGRESS).read_text()))
        if (self.out / MODEL).is_file():
            before = json.loads((self.out / MODEL).read_text())
            for key in ("bundle_sha256", "dimensions", "input_type", "task", "instruction", "truncation"):
                if before.get(key) != model.get(key):
                    raise OutputError(
                        f"cannot resume: {key} was {before.get(key)!r}, now {model.get(key)!r} "
                        "(vectors from different models or options must not mix); use --overwrite"
                    )
        for path in self.out.iterdir():  # whatever a killed run wrote after its last commit
            if path.name.endswith(".tmp") or (
                path.name.startswith("part-") and self._part_no(path) >= progress.parts
            ):
                path.unlink()
        errors = self.out / ERRORS
        if errors.exists():
            with errors.open("r+b") as f:
                f.truncate(progress.errors_bytes)
        progress.finished = False
        return progress

    @staticmethod
    def _part_no(path: Path) -> int:
        try:
            return int(path.name.split("-", 1)[1].split(".", 1)[0])
        except (IndexError, ValueError):
            return -1

    @property
    def buffered_rows(self) -> int:
        return len(self._ids)

    @property
    def buffered_bytes(self) -> int:
        return len(self._ids) * self.dims * 4

    def add(
        self,
        ids: list[str],
        vectors: npt.NDArray[np.float32],
        token_counts: npt.NDArray[np.uint32],
        truncated: npt.NDArray[np.bool_],
        rows_done: int,
    ) -> None:
        """Buffer a chunk's vectors; ``rows_done`` is the input position after the chunk."""
        if len(ids):
            self._ids.extend(ids)
            self._vectors.append(vectors)
            self._tokens.append(token_counts)
            self._truncated.append(truncated)
        self._pending_rows_done = rows_done

    def error(self, row_id: str, row: int, status: str, reason: str) -> None:
        line = json.dumps({"id": row_id, "row": row, "status": status, "reason": reason}) + "\n"
        self._errors.write(line.encode())
        self._pending_errors += 1

    def commit(self) -> None:
        """Write the buffered rows as a new part (if any) and record the new state."""
        if self._ids:
            self._write_part()
        self._errors.flush()
        os.fsync(self._errors.fileno())
        self.progress.rows_done = self._pending_rows_done
        self.progress.errors_bytes = self._errors.tell()
        self.progress.errors += self._pending_errors
        self._pending_errors = 0
        self._commit_state()

    def _write_part(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        flat = np.concatenate(self._vectors).reshape(-1)
        table = pa.table(
            {
                "id": pa.array(self._ids, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), self.dims),
                "token_count": pa.array(np.concatenate(self._tokens), pa.uint32()),
                "truncated": pa.array(np.concatenate(self._truncated), pa.bool_()),
            }
        )
        name = f"part-{self.progress.parts:05d}.parquet"
        tmp = self.out / (name + ".tmp")
        pq.write_table(table, tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.out / name)
        self.progress.parts += 1
        self.progress.vectors += len(self._ids)
        self._ids, self._vectors, self._tokens, self._truncated = [], [], [], []

    def _commit_state(self) -> None:
        _replace(self.out / PROGRESS, json.dumps(asdict(self.progress), indent=1) + "\n")

    def close(self, finished: bool) -> None:
        self.commit()
        self.progress.finished = finished
        self._commit_state()
        self._errors.close()
