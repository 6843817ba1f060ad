"""Input rows, streamed in file order: JSONL (one object per line) or Parquet.

Rows are numbered by their position in the file (every JSONL line counts, blank or not), which is
what makes ``--resume`` exact: the output records how many input rows it has fully handled, and a
rerun skips that many without keeping any ids in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_READ_ROWS = 4096


@dataclass(frozen=True)
class Row:
    """One input row: its position, id and text, or why it cannot be embedded at all."""

    index: int
    id: str
    text: str | None
    problem: str | None = None


class Source:
    def __init__(self, path: Path, text_field: str, id_field: str, fmt: str | None = None) -> None:
        self.path = path
        self.text_field = text_field
        self.id_field = id_field
        self.format = fmt or ("parquet" if path.suffix in {".parquet", ".pq"} else "jsonl")
        if self.format not in {"jsonl", "parquet"}:
            raise ValueError(f"unknown input format {self.format!r} (jsonl or parquet)")
        if not path.is_file():
            raise FileNotFoundError(f"input {path} does not exist")

    def total(self) -> int:
        """Rows in the file (Parquet: from the footer; JSONL: newlines, read in 1 MiB blocks)."""
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(self.path).metadata.num_rows)
        count, last = 0, b"\n"
        with self.path.open("rb") as f:
            while block := f.read(1 << 20):
                count += block.count(b"\n")
                last = block[-1:]
        return count + (last != b"\n")

    def rows(self, skip: int = 0) -> Iterator[Row]:
        return self._parquet(skip) if self.format == "parquet" else self._jsonl(skip)

    def _row(self, index: int, record: Any) -> Row:
        if not isinstance(record, dict):
            return Row(index, str(index), None, "not a JSON object")
        raw_id = record.get(self.id_field)
        row_id = str(index) if raw_id is None else str(raw_id)
        if raw_id is None:
            return Row(index, row_id, None, f"missing id field {self.id_field!r}")
        text = record.get(self.text_field)
        if not isinstance(text, str):
            return Row(index, row_id, None, f"field {self.text_field!r} is missing or not a string")
        return Row(index, row_id, text)

    def _jsonl(self, skip: int) -> Iterator[Row]:
        with self.path.open("r", encoding="utf-8", errors="replace") as f:
            for index, line in enumerate(f):
                if index < skip or not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield Row(index, str(index), None, f"invalid JSON: {exc.msg}")
                    continue
                yield self._row(index, record)

    def _parquet(self, skip: int) -> Iterator[Row]:
        import pyarrow.parquet as pq

        file = pq.ParquetFile(self.path)
        names = set(file.schema_arrow.names)
        for field in (self.id_field, self.text_field):
            if field not in names:
                raise ValueError(f"{self.path} has no column {field!r} (columns: {sorted(names)})")
        index = 0
        for group in range(file.num_row_groups):
            rows = file.metadata.row_group(group).num_rows
            if index + rows <= skip:  # whole row groups are skipped unread
                index += rows
                continue
            for batch in file.iter_batches(
                _READ_ROWS, row_groups=[group], columns=[self.id_field, self.text_field]
            ):
                ids, texts = batch.column(0).to_pylist(), batch.column(1).to_pylist()
                for row_id, text in zip(ids, texts, strict=True):
                    if index >= skip:
                        yield self._row(index, {self.id_field: row_id, self.text_field: text})
                    index += 1
