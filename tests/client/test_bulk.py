"""``embed-bulk`` as a subprocess against an in-process server on a real port.

The server's runtime is the reliability suite's slow numpy twin (a fixed capacity), so a run is
long enough to interrupt: progress is watched through the output's committed state, never timed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from client_support import words
from rel_harness import Live, ThreadedServer
from rel_toy import CountingRuntime

from embedding_client import EmbeddingClient

ROWS = 1500
BAD = {"r-empty": "", "r-long": words(40)}  # refused by the server (truncation none)
NO_TEXT = "r-notext"


def _corpus(path: Path) -> dict[str, str]:
    """Good rows (mixed lengths) plus rows the server refuses and one without a text field."""
    texts: dict[str, str] = {}
    with path.open("w") as f:
        for i in range(ROWS):
            row_id = f"r{i}"
            if i == 700:
                f.write(json.dumps({"id": NO_TEXT, "body": "no text field"}) + "\n")
            if i in (300, 1200):
                bad_id = "r-empty" if i == 300 else "r-long"
                f.write(json.dumps({"id": bad_id, "text": BAD[bad_id]}) + "\n")
            texts[row_id] = words(1 + (i * 11) % 29, start=i)
            f.write(json.dumps({"id": row_id, "text": texts[row_id]}) + "\n")
    return texts


def _embed_bulk(*args: str) -> subprocess.Popen[str]:
    script = Path(sys.executable).parent / "embed-bulk"
    return subprocess.Popen(
        [str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != "EMBED_API_KEY"},
    )  # fmt: skip


def _progress(out: Path) -> dict[str, int]:
    try:
        return json.loads((out / "_progress.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"parts": 0, "rows_done": 0}


def _wait_parts(out: Path, proc: subprocess.Popen[str], parts: int, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while _progress(out)["parts"] < parts:
        assert proc.poll() is None, f"embed-bulk ended early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "embed-bulk made no progress"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def slow_server(client_bundle: Path) -> Iterator[Live]:
    # 0.05 s per batch of ≤ 16 inputs: ~1500 rows take several seconds, long enough to interrupt.
    with ThreadedServer(client_bundle, CountingRuntime(delay_s=0.05), max_batch_size=16) as live:
        yield live


@pytest.mark.slow
def test_interrupted_and_killed_runs_resume_to_exactly_one_vector_per_id(
    slow_server: Live, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    texts = _corpus(corpus)
    out = tmp_path / "out"
    common = [str(corpus), "--out", str(out), "--target", slow_server.grpc_target, "--batch-size", "8",
              "--concurrency", "4", "--rows-per-part", "100", "--truncation", "none"]  # fmt: skip

    first = _embed_bulk(*common)  # SIGINT: in-flight work finishes, the output is consistent
    _wait_parts(out, first, 2)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert "--resume" in err
    state = _progress(out)
    assert 0 < state["rows_done"] < ROWS and not state["finished"]

    again = _embed_bulk(*common)  # an existing output is never overwritten by accident
    assert again.wait(60) == 1 and "--resume" in again.communicate()[1]

    second = _embed_bulk(*common, "--resume")  # SIGKILL: nothing gets to clean up
    _wait_parts(out, second, state["parts"] + 2)
    second.kill()
    second.wait(30)
    assert _progress(out)["rows_done"] < ROWS

    third = _embed_bulk(*common, "--resume")
    _, err = third.communicate(timeout=600)
    assert third.returncode == 0, err
    assert _progress(out)["finished"]

    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(texts) and len(ids) == len(set(ids))  # exactly one vector per id
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 16)
    with EmbeddingClient(slow_server.grpc_target) as client:
        direct = client.embed_detailed([texts[i] for i in ids])
    np.testing.assert_allclose(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                               direct.vectors, atol=1e-5)  # fmt: skip
    assert table.column("token_count").to_pylist() == direct.token_counts.tolist()
    assert not any(table.column("truncated").to_pylist())

    errors = [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == sorted([*BAD, NO_TEXT])  # once each, across 3 runs
    by_id = {e["id"]: e for e in errors}
    assert by_id["r-long"]["status"] == "INVALID_ARGUMENT" and "token" in by_id["r-long"]["reason"]
    model = json.loads((out / "_model.json").read_text())
    assert model["dimensions"] == 16 and len(model["bundle_sha256"]) == 64 and model["precision"]


def test_parquet_input_and_progress_bar(live: Live, tmp_path: Path) -> None:
    ids = list(range(100, 160))
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"doc": ids, "body": [words(1 + i % 9, start=i) for i in ids]}), source)
    run = _embed_bulk(str(source), "--out", str(tmp_path / "out"), "--target", live.grpc_target,
                      "--text-field", "body", "--id-field", "doc", "--batch-size", "7")  # fmt: skip
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert "rows/s" in err and "tokens/s" in err and "60/60" in err
    table = pq.read_table(tmp_path / "out")
    assert table.column("id").to_pylist() == [str(i) for i in ids]


def test_no_progress_stops_with_a_clear_message(client_bundle: Path, tmp_path: Path) -> None:
    runtime = CountingRuntime()
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": words(3, start=i)}) + "\n" for i in range(20)))
    with ThreadedServer(client_bundle, runtime) as live:
        runtime.fail = lambda rows: True  # every batch fails (INTERNAL) from now on
        run = _embed_bulk(str(corpus), "--out", str(tmp_path / "out"), "--target", live.grpc_target,
                          "--stall-timeout", "3", "--quiet")  # fmt: skip
        _, err = run.communicate(timeout=300)
    assert run.returncode == 1, err
    assert "no progress for 3s" in err and "INTERNAL" in err and "--resume" in err


def test_unreachable_server_is_a_clear_start_error(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": 1, "text": "w1"}\n')
    run = _embed_bulk(
        str(corpus), "--out", str(tmp_path / "out"), "--target", "127.0.0.1:1", "--timeout", "20"
    )
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1 and "cannot start" in err and "UNAVAILABLE" in err, err
