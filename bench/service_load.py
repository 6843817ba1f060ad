"""Scenarios ``service``, ``batching`` and ``coldstart`` (issue 6 §2, §3, §7): the real server process.

Why a subprocess server and a ``grpc.aio`` load generator of our own: it is what clients see
(HTTP/2 framing, protobuf, the batcher, the worker thread), it counts gRPC status codes (h2load
cannot), and it needs nothing beyond grpcio. The load is closed-loop and bounded: N clients, each
sending its next request when the previous one returned, for a fixed number of requests.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench import _models
from bench._common import Section, fmt_ms, percentile, round_robin, stats, table
from bench.tokenization import texts


def bundle(model: str, precision: str) -> Path:
    """Export (once) a service bundle with the project's exporter."""
    from export.api import export_bundle

    out = _models.CACHE / "bundles" / f"{model}-{precision}"
    if not (out / "manifest.json").exists():
        source: str | Path = (
            "builtin:all-MiniLM-L6-v2" if model == "minilm" else _models.checkpoint_dir(_models.TINY)
        )
        export_bundle(source, out, precision, overwrite=True)  # type: ignore[arg-type]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_metrics(port: int, *prefixes: str) -> dict[str, float]:
    """The server's Prometheus samples whose line starts with one of ``prefixes``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefixes):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@contextmanager
def server(bundle_dir: Path, **env: str) -> Iterator[tuple[int, float]]:
    """Start ``python -m service`` on a free port (result cache off unless ``env`` says otherwise);
    yield (port, seconds from spawn to SERVING)."""
    with server_process(bundle_dir, **env) as (port, took, _):
        yield port, took


@contextmanager
def server_process(bundle_dir: Path, **env: str) -> Iterator[tuple[int, float, subprocess.Popen[str]]]:
    """:func:`server`, also yielding the process (its pid, for ``/proc`` CPU accounting)."""
    port = _free_port()
    environ = {
        **os.environ,
        "EMBED_MODEL_DIR": str(bundle_dir),
        "EMBED_PORT": str(port),
        "EMBED_HOST": "127.0.0.1",
        "EMBED_LOG_LEVEL": "warning",
        "EMBED_INTRA_OP_THREADS": "2",
        # These scenarios measure the model path and repeat their requests: a result cache would
        # answer the repeats without it. The cache scenario turns it on explicitly.
        "EMBED_CACHE_BYTES": "0",
        **env,
    }
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        took = _wait_serving(port, proc, started)
        yield port, took, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_serving(port: int, proc: subprocess.Popen[str], started: float, timeout: float = 180.0) -> float:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.perf_counter() - started < timeout:
            if proc.poll() is not None:
                tail = (proc.stderr.read() if proc.stderr else "")[-300:]
                raise RuntimeError(f"server exited rc {proc.returncode}: {tail}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - started
            except grpc.RpcError:
                pass
            time.sleep(0.02)
    raise TimeoutError(f"not SERVING after {timeout:.0f} s")


def _request(inputs: list[str]) -> Any:
    from service.pb.embedding.v1 import embedding_pb2 as pb

    return pb.EmbedRequest(inputs=inputs, encoding=pb.ENCODING_FLOAT32)


async def closed_loop(
    port: int,
    payloads: list[list[str]],
    clients: int,
    *,
    on_start: Callable[[], object] | None = None,
    on_end: Callable[[], object] | None = None,
) -> tuple[float, list[float], Counter[str]]:
    """``clients`` concurrent callers share ``payloads``; returns (wall s, latencies s, status counts).

    ``on_start`` / ``on_end`` are called right before the first and right after the last timed
    request (after the warm-up call, before the channel closes): the window a caller may meter.
    """
    import grpc

    from service.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc

    queue = list(reversed(payloads))
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        await stub.Embed(_request(payloads[0]))  # connection + warm-up

        async def client() -> None:
            while queue:
                inputs = queue.pop()
                start = time.perf_counter()
                try:
                    await stub.Embed(_request(inputs), timeout=60)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
                latencies.append(time.perf_counter() - start)

        if on_start is not None:
            on_start()
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
        if on_end is not None:
            on_end()
        return wall, latencies, codes


LoadRun = tuple[float, list[float], Counter[str]]


def load_rows(results: Mapping[Any, list[LoadRun]], n: int) -> list[list[object]]:
    """One table row per variant: req/s (median over runs), × the first variant, p50/p95/p99, codes."""
    rows: list[list[object]] = []
    base = None
    for variant, runs in results.items():
        lat = [x for r in runs for x in r[1]]
        rps = n / stats([r[0] for r in runs]).median
        base = base or rps
        rows.append(
            [
                variant,
                f"{rps:.0f}",
                f"**{rps / base:.2f}×**",
                fmt_ms(percentile(lat, 50)),
                fmt_ms(percentile(lat, 95)),
                fmt_ms(percentile(lat, 99)),
                dict(sum((r[2] for r in runs), Counter())),
            ]
        )
    return rows


def run_batching(rounds: int, quick: bool) -> Section:
    section = Section("batching", "Batching gain: concurrent single-text clients vs sequential (issue 6 §3)")
    path = bundle("minilm", "fp32")
    n = 200 if quick else 600
    payloads = [[t] for t in texts(n, 12, seed=3)]
    rows = []
    with server(path) as (port, _):
        results: dict[int, list[tuple[float, list[float], Counter[str]]]] = {c: [] for c in (1, 8, 32)}
        for _ in range(max(1, min(rounds, 3))):  # round-robin over concurrency levels
            for clients in results:
                results[clients].append(asyncio.run(closed_loop(port, payloads, clients)))
    rows += load_rows(results, n)
    section.add(
        f"Real all-MiniLM-L6-v2 fp32 bundle, `python -m service` (2 intra-op threads, defaults otherwise), "
        f"{n} single-text requests (≈ 8–14 tokens) per level, closed loop, `grpc.aio` client of our own, "
        f"{max(1, min(rounds, 3))} round-robin repetitions (throughput = median). Target: 32 clients ≥ 4× "
        "sequential. Client and server share the 2 cores.\n"
    )
    section.add(table(["clients", "req/s", "× sequential", "p50 ms", "p95 ms", "p99 ms", "status"], rows))
    return section


def run_service_vs_raw(rounds: int, quick: bool) -> Section:
    import onnxruntime as ort

    section = Section("service", "Service vs raw session, same model and shapes (issue 6 §2)")
    path = bundle("minilm", "fp32")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    rows = []
    with server(path) as (port, _):
        import grpc

        from service.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc

        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        stub = pb_grpc.EmbeddingServiceStub(channel)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see bench._models.session
        sess = ort.InferenceSession(str(path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        for batch, words in [(8, 60), (32, 60)] if not quick else [(8, 60)]:
            inputs = texts(batch, words, seed=batch)
            encs = tok.encode_batch(inputs)
            width = max(len(e.ids) for e in encs)
            ids = np.zeros((batch, width), np.int64)
            mask = np.zeros_like(ids)
            for r, e in enumerate(encs):
                ids[r, : len(e.ids)] = e.ids
                mask[r, : len(e.ids)] = 1
            request = _request(inputs)
            samples = round_robin(
                {
                    "raw session (pre-tokenised)": lambda i=ids, m=mask: sess.run(
                        None, {"input_ids": i, "attention_mask": m}
                    ),
                    "service (gRPC, tokenise + batch + pack)": lambda r=request: stub.Embed(r),
                },
                max(rounds, 5),
            )
            base = stats(samples["raw session (pre-tokenised)"]).median
            for name, values in samples.items():
                st = stats(values)
                rows.append(
                    [
                        f"{batch}×≤{width}",
                        name,
                        fmt_ms(st.median),
                        f"{st.spread_pct:.0f}%",
                        f"**{base / st.median:.2f}×**",
                    ]
                )
        channel.close()
    section.add(
        "Real all-MiniLM-L6-v2 fp32; the raw side runs the bundle's `model.onnx` on ids tokenised "
        "beforehand (2 threads, in the bench process); the service side is one unary `Embed` of the same "
        "texts (packed float32) to the server process. Throughput ratio = raw time / service time. "
        "Target ≥ 0.90.\n"
    )
    section.add(table(["batch×len", "path", "ms/request", "spread", "× raw throughput"], rows))
    return section


def run_coldstart(rounds: int, quick: bool) -> Section:
    section = Section("coldstart", "Cold start: process spawn to health SERVING, per precision (issue 6 §7)")
    cells = [("tiny", "fp32"), ("tiny", "fp16"), ("tiny", "int8"), ("minilm", "fp32"), ("minilm", "int8")]
    if quick:
        cells = cells[:1]
    paths = {}
    rows = []
    for cell in cells:
        try:
            paths[cell] = bundle(*cell)
        except Exception as exc:  # the exporter's precisions are another engineer's; report, don't crash
            rows.append([*cell, f"bundle export failed: {type(exc).__name__}: {str(exc)[:80]}", "", ""])
    samples: dict[tuple[str, str], list[float]] = {c: [] for c in paths}
    for _ in range(max(1, min(rounds, 3))):
        for cell, path in paths.items():
            try:
                with server(path) as (_, took):
                    samples[cell].append(took)
            except Exception as exc:
                rows.append([*cell, f"failed: {type(exc).__name__}: {str(exc)[:100]}", "", ""])
    for cell, values in samples.items():
        if values:
            st = stats(values)
            rows.append([*cell, f"{st.median:.2f}", f"{st.spread_pct:.0f}%", len(values)])
    section.add(
        "`python -m service` spawned with the bundle (self-test on, default settings), polled with "
        "grpc.health.v1 Check every 20 ms; includes interpreter start, imports, hash verification, "
        "session creation and the golden-vector self-test. Round-robin over cells.\n"
    )
    section.add(table(["model", "precision", "seconds to SERVING (median)", "spread", "n"], rows))
    return section
