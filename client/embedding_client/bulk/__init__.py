"""``embed-bulk``: embed a JSONL or Parquet corpus into a resumable Parquet dataset (extra ``bulk``)."""
