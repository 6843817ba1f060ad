"""Overload soak: ``embed-serve`` as a subprocess, driven at ~2× its measured capacity on loopback.

Usage::

    python -m bench.soak [--model-dir bundles/all-MiniLM-L6-v2] [--factor 2] [--duration 20]
                         [--max-calls 4000] [--max-queue-tokens 16384] [--sigterm]

Phases (all bounded in count and time, 127.0.0.1 only):

1. **calibrate** — closed loop, ``--concurrency`` clients for ``--calibrate`` seconds: capacity in
   requests/s (each request ``--inputs`` texts of ``--words`` words).
2. **overload** — open loop at ``factor × capacity`` for ``--duration`` seconds (at most
   ``--max-calls`` calls), alternating gRPC ``Embed`` and HTTP ``/v1/embeddings``. Every call must
   end OK or RESOURCE_EXHAUSTED / 429 within ``--hang-guard`` seconds; OK answers are checked
   (count, dimension, finite). The server's RSS is sampled with psutil every 20 ms.
3. **sigterm** (``--sigterm``) — SIGTERM under the same load: exit status and time, and how
   calls ended (OK, refused UNAVAILABLE while draining, connection refused after exit).

The RSS bound (see docs/reliability.md): ``rss_ready + 2 × max_queue_tokens × 1 KiB + 64 MiB``,
with ``rss_ready`` read after one request shaped like the largest batch (arena at its peak).
The CI test ``tests/reliability/test_rel_overload.py`` imports :func:`drive` with small bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.pb.embedding.v1 import embedding_pb2 as pb
from service.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc

KIB = 1024
MIB = 1024 * 1024
# Per queued token: the request text (UTF-8 and as a Python str), the gRPC/HTTP buffers, the
# tokenizer's Encoding (ids, offsets, tokens) and the id tuples in the batcher. Measured well
# below 1 KiB on MiniLM; the bound uses 1 KiB, doubled for requests in flight past the queue.
BYTES_PER_QUEUED_TOKEN = 1 * KIB
FIXED_SLACK = 64 * MIB  # ORT arena growth to the largest batch shape, thread stacks, allocator slack

_SENTENCE = (
    "search systems embed queries and documents into vectors so that nearby vectors mean related texts "
    "the service batches requests by length and refuses work it cannot queue"
)
WORDS = _SENTENCE.split()


def rss_bound(rss_ready: int, max_queue_tokens: int) -> int:
    return rss_ready + 2 * max_queue_tokens * BYTES_PER_QUEUED_TOKEN + FIXED_SLACK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_cmd() -> list[str]:
    script = Path(sys.executable).parent / "embed-serve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service"]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    stderr: Path

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def rss(self) -> int:
        try:
            return int(psutil.Process(self.proc.pid).memory_info().rss)
        except psutil.Error:
            return 0


def start_server(model_dir: Path, stderr: Path, extra: list[str], timeout_s: float = 120.0) -> Server:
    grpc_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBED_")}
    args = [
        *serve_cmd(),
        "--model-dir", str(model_dir),
        "--port", str(grpc_port),
        "--http-port", str(http_port),
        "--log-level", "warning",
        "--cache-bytes", "0",  # the RSS bound has no room for a result cache; repeats must run
        *extra,
    ]  # fmt: skip
    with stderr.open("wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=env)
    server = Server(proc, grpc_port, http_port, stderr)
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"embed-serve exited: {stderr.read_text()[-2000:]}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return server
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("embed-serve did not become SERVING")


class RssSampler:
    """Samples a process's RSS every ``period_s`` in a thread; ``peak`` is the maximum seen."""

    def __init__(self, pid: int, period_s: float = 0.02) -> None:
        self._proc = psutil.Process(pid)
        self._period = period_s
        self._stop = threading.Event()
        self.peak = 0
        self.samples = 0
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, int(self._proc.memory_info().rss))
                self.samples += 1
            except psutil.Error:
                return
            self._stop.wait(self._period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def texts_for(rng: random.Random, inputs: int, words: int) -> list[str]:
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(max(1, words // 2), words)))
        for _ in range(inputs)
    ]


@dataclass
class Outcome:
    api: str
    status: str  # OK, RESOURCE_EXHAUSTED, UNAVAILABLE_DRAINING, UNAVAILABLE_CONNECT, HANG, other
    latency_s: float
    detail: str = ""


@dataclass
class LoadResult:
    offered_rps: float
    duration_s: float
    calls: int
    counts: dict[str, int] = field(default_factory=dict)
    ok_rps: float = 0.0
    p50_ok_s: float = 0.0
    p99_ok_s: float = 0.0
    max_latency_s: float = 0.0
    bad_answers: int = 0
    unexpected: list[str] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _classify_grpc(exc: grpc.aio.AioRpcError) -> str:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        if "shutting down" in details:
            return "UNAVAILABLE_DRAINING"
        if "connect" in details.lower() or "refused" in details.lower():
            return "UNAVAILABLE_CONNECT"
    return code.name if code != grpc.StatusCode.UNAVAILABLE else f"UNAVAILABLE: {details[:80]}"


def _vectors_ok(vectors: list[list[float]], count: int, dims: int) -> bool:
    return len(vectors) == count and all(len(v) == dims and all(math.isfinite(x) for x in v) for v in vectors)


async def drive(
    grpc_target: str,
    http_url: str,
    *,
    rate_rps: float,
    duration_s: float,
    max_calls: int,
    inputs: int,
    words: int,
    dims: int,
    hang_guard_s: float = 30.0,
    seed: int = 0,
    stop_after: float | None = None,
    on_tick: object = None,
) -> tuple[LoadResult, list[Outcome]]:
    """Open-loop load: one call every ``1 / rate_rps`` s, alternating gRPC and HTTP."""
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    channel = grpc.aio.insecure_channel(grpc_target)
    stub = pb_grpc.EmbeddingServiceStub(channel)
    # One connection per request: a keep-alive connection that the server closes while shutting
    # down can race a new request on it (a reset that says nothing about accepted work).
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=hang_guard_s))

    async def grpc_call(texts: list[str]) -> None:
        started = time.perf_counter()
        try:
            reply = await stub.Embed(pb.EmbedRequest(inputs=texts), timeout=hang_guard_s)
            good = _vectors_ok([list(e.values) for e in reply.embeddings], len(texts), dims)
            outcomes.append(Outcome("grpc", "OK" if good else "BAD_ANSWER", time.perf_counter() - started))
        except grpc.aio.AioRpcError as exc:
            status = "HANG" if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else _classify_grpc(exc)
            outcomes.append(Outcome("grpc", status, time.perf_counter() - started, exc.details() or ""))

    async def http_call(texts: list[str]) -> None:
        started = time.perf_counter()
        try:
            async with session.post(f"{http_url}/v1/embeddings", json={"input": texts}) as response:
                body = await response.json(content_type=None)
                if response.status == 200:
                    vectors = [d["embedding"] for d in body["data"]]
                    status = "OK" if _vectors_ok(vectors, len(texts), dims) else "BAD_ANSWER"
                elif response.status == 429:
                    status = (
                        "RESOURCE_EXHAUSTED" if response.headers.get("Retry-After") else "429_NO_RETRY_AFTER"
                    )
                elif response.status == 503 and "shutting down" in json.dumps(body):
                    status = "UNAVAILABLE_DRAINING"
                else:
                    status = f"HTTP_{response.status}"
                outcomes.append(Outcome("http", status, time.perf_counter() - started))
        except (aiohttp.ClientConnectorError, ConnectionRefusedError):
            outcomes.append(Outcome("http", "UNAVAILABLE_CONNECT", time.perf_counter() - started))
        except TimeoutError:
            outcomes.append(Outcome("http", "HANG", time.perf_counter() - started))
        except aiohttp.ClientError as exc:
            outcomes.append(
                Outcome(
                    "http", f"HTTP_ERROR {type(exc).__name__}: {exc}"[:120], time.perf_counter() - started
                )
            )

    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    began = loop.time()
    interval = 1.0 / rate_rps
    try:
        for n in range(max_calls):
            at = began + n * interval
            if at - began >= duration_s:
                break
            # on_tick fires once, at stop_after seconds or half-way through max_calls if sooner.
            if (
                stop_after is not None
                and (at - began >= stop_after or n >= max_calls // 2)
                and callable(on_tick)
            ):
                on_tick()
                on_tick = None
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            texts = texts_for(rng, inputs, words)
            call = grpc_call(texts) if n % 2 == 0 else http_call(texts)
            tasks.append(asyncio.ensure_future(call))
        sent_s = loop.time() - began
        await asyncio.wait_for(asyncio.gather(*tasks), hang_guard_s * 2)
    finally:
        await session.close()
        await channel.close()
    elapsed = loop.time() - began
    counts = Counter(o.status for o in outcomes)
    ok_latencies = [o.latency_s for o in outcomes if o.status == "OK"]
    result = LoadResult(
        offered_rps=rate_rps,
        duration_s=round(sent_s, 3),
        calls=len(outcomes),
        counts=dict(counts),
        ok_rps=round(counts["OK"] / elapsed, 1) if elapsed else 0.0,
        p50_ok_s=round(_percentile(ok_latencies, 0.5), 4),
        p99_ok_s=round(_percentile(ok_latencies, 0.99), 4),
        max_latency_s=round(max((o.latency_s for o in outcomes), default=0.0), 4),
        bad_answers=counts["BAD_ANSWER"],
        unexpected=sorted(
            {f"{o.api}:{o.status}" for o in outcomes if o.status not in ("OK", "RESOURCE_EXHAUSTED")}
        ),
    )
    return result, outcomes


async def calibrate(
    grpc_target: str, *, concurrency: int, seconds: float, inputs: int, words: int, seed: int = 1
) -> float:
    """Closed loop: requests/s the server completes with ``concurrency`` clients always waiting."""
    rng = random.Random(seed)
    done = 0
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        end = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < end:
                try:
                    await stub.Embed(pb.EmbedRequest(inputs=texts_for(rng, inputs, words)), timeout=60)
                    done += 1
                except grpc.aio.AioRpcError as exc:  # the queue is smaller than the clients' work
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    await asyncio.sleep(0.01)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


async def fill_arena(grpc_target: str, batch: int, words: int) -> None:
    """One request shaped like the largest batch the budget allows, so ONNX Runtime's arena has
    grown to its peak before ``rss_ready`` is read (that growth depends on max_batch_tokens and
    the model's width, not on load; see docs/reliability.md)."""
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)) for i in range(batch)]
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        await stub.Embed(pb.EmbedRequest(inputs=texts, truncation=pb.TRUNCATION_END), timeout=300)


def machine() -> str:
    return (
        f"{platform.node()} · {platform.processor() or platform.machine()} · {os.cpu_count()} CPUs visible · "
        f"{round(psutil.virtual_memory().total / 2**30)} GiB · Python {platform.python_version()}"
    )


async def _main(args: argparse.Namespace) -> dict[str, object]:
    stderr = Path(tempfile.mkdtemp(prefix="soak-")) / "embed-serve.stderr"
    extra = ["--max-queue-tokens", str(args.max_queue_tokens), "--grace-period-s", str(args.grace)]
    server = start_server(args.model_dir, stderr, extra)
    report: dict[str, object] = {
        "machine": machine(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
    }
    try:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            info = await pb_grpc.EmbeddingServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
        dims = info.dimensions
        lim = info.limits
        await fill_arena(
            server.grpc_target, lim.max_batch_size, max(1, lim.max_batch_tokens // lim.max_batch_size)
        )
        rss_ready = server.rss()
        capacity = await calibrate(
            server.grpc_target,
            concurrency=args.concurrency,
            seconds=args.calibrate,
            inputs=args.inputs,
            words=args.words,
        )
        rate = args.factor * capacity
        with RssSampler(server.proc.pid) as sampler:
            result, _ = await drive(
                server.grpc_target, server.http_url, rate_rps=rate, duration_s=args.duration,
                max_calls=args.max_calls, inputs=args.inputs, words=args.words, dims=dims,
            )  # fmt: skip
        bound = rss_bound(rss_ready, args.max_queue_tokens)
        report.update(
            model=info.model,
            capacity_rps=round(capacity, 1),
            overload=asdict(result),
            rss_ready_mib=round(rss_ready / MIB, 1),
            rss_peak_mib=round(sampler.peak / MIB, 1),
            rss_bound_mib=round(bound / MIB, 1),
            rss_samples=sampler.samples,
            rss_ok=sampler.peak <= bound,
        )
        if args.sigterm:
            began: list[float] = []

            def term() -> None:
                began.append(time.monotonic())
                server.proc.send_signal(signal.SIGTERM)

            result, _ = await drive(
                server.grpc_target, server.http_url, rate_rps=rate, duration_s=args.duration,
                max_calls=args.max_calls, inputs=args.inputs, words=args.words, dims=dims,
                stop_after=args.duration / 2, on_tick=term,
            )  # fmt: skip
            code = await asyncio.to_thread(server.proc.wait, args.grace + 30)
            report["sigterm"] = {
                "load": asdict(result),
                "exit_code": code,
                "exit_after_s": round(time.monotonic() - began[0], 2) if began else None,
                "grace_period_s": args.grace,
            }
    finally:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
            server.proc.wait(60)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("bundles/all-MiniLM-L6-v2"))
    parser.add_argument("--factor", type=float, default=2.0, help="offered load / measured capacity")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of overload (upper bound)")
    parser.add_argument("--max-calls", type=int, default=4000, help="upper bound on calls per phase")
    parser.add_argument("--calibrate", type=float, default=5.0, help="seconds of closed-loop calibration")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--inputs", type=int, default=8, help="texts per request")
    parser.add_argument("--words", type=int, default=48, help="max words per text")
    parser.add_argument("--max-queue-tokens", type=int, default=4096)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--sigterm", action="store_true", help="also SIGTERM the server under load")
    args = parser.parse_args(argv)
    report = asyncio.run(_main(args))
    print(json.dumps(report, indent=1))
    overload = report.get("overload", {})
    ok = bool(report.get("rss_ok")) and not overload.get("unexpected")  # type: ignore[union-attr]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
